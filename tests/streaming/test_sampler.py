"""Per-stream sampling (what batched streaming builds on): at one stream it draws exactly what moshi draws,
and a stream's tokens never depend on the rows beside it."""

from __future__ import annotations

import pytest
import torch
from moshi.utils.sampling import sample_token as moshi_sample_token

from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt.streaming.sampler import StreamSampler, sample_token

SETTINGS = [(True, 0.8, 25, 0.0), (True, 0.7, 0, 0.0), (True, 1.0, 0, 0.9), (False, 0.8, 25, 0.0)]


@pytest.mark.parametrize("use_sampling, temp, top_k, top_p", SETTINGS)
def test_one_stream_draws_what_moshi_draws(use_sampling: bool, temp: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(40, 1, 1, 64, generator=torch.Generator().manual_seed(1)) * 3
    torch.manual_seed(1234)
    expected = [moshi_sample_token(step, use_sampling, temp, top_k, top_p) for step in logits]
    sampler = StreamSampler(1)
    sampler.reseed(0, 1234)
    ours = [sampler.sample_token(step, use_sampling, temp, top_k, top_p) for step in logits]
    assert [int(t) for t in ours] == [int(t) for t in expected]
    if use_sampling:  # a sampled stream, not argmax in disguise
        assert len({int(t) for t in ours}) > 5


def test_rows_do_not_depend_on_their_neighbours() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(30, 3, 1, 1, 64, generator=gen) * 2
    other = logits.clone()
    other[:, 1] = torch.randn(30, 1, 1, 64, generator=gen) * 2  # a different file beside stream 0 and 2

    def run(steps: torch.Tensor, seeds: list[int]) -> list[list[int]]:
        sampler = StreamSampler(len(seeds))
        for stream, seed in enumerate(seeds):
            sampler.reseed(stream, seed)
        return [sampler.sample_token(step, True, 0.8, 25).flatten().tolist() for step in steps]

    together = run(logits, [7, 8, 9])
    beside_other = run(other, [7, 8, 9])
    alone = {b: run(logits[:, b : b + 1], [seed]) for b, seed in ((0, 7), (2, 9))}
    for b in (0, 2):
        assert [step[b] for step in together] == [step[0] for step in alone[b]]
        assert [step[b] for step in beside_other] == [step[b] for step in together]
    assert [step[1] for step in beside_other] != [step[1] for step in together]
    with pytest.raises(ValueError, match="3 rows but 2"):
        sample_token(logits[0], True, 0.8, 25, 0.0, StreamSampler(2).generators)


def test_installed_sampler_leaves_the_runner_bit_identical(tiny_inplace, recordings) -> None:
    """The adapter reaches both of LMGen's sampling sites: seeded like `seed_all`, the run is
    the plain run; seeded otherwise, text and audio change."""
    runner = StreamingRunner(load_model(str(tiny_inplace.base), str(tiny_inplace.finetune)), seed=4242)
    pcm = read_audio(recordings[1])
    plain = runner.run(pcm)
    for seed, same in ((4242, True), (5, False)):
        sampler = StreamSampler(1)
        sampler.reseed(0, seed)
        with sampler.installed():
            ours = runner.run(pcm)
        assert (ours.text_tokens == plain.text_tokens and ours.pcm.tobytes() == plain.pcm.tobytes()) is same


def test_counter_noise_is_exponential_per_stream_and_advances_only_active_streams() -> None:
    sampler = StreamSampler(3, counter=True)
    for stream, seed in enumerate((7, 8, 7)):
        sampler.reseed(stream, seed)
    noise = sampler.counter.exponential(torch.Size([3, 20000]))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])  # seed decides
    assert abs(float(noise.mean()) - 1.0) < 0.03 and abs(float(noise.var()) - 1.0) < 0.06  # Exp(1)
    assert sampler.counter.draws.tolist() == [1, 1, 1]
    sampler.active = [True, False, True]
    again = sampler.counter.exponential(torch.Size([3, 4]))
    assert sampler.counter.draws.tolist() == [2, 1, 2]
    assert not torch.equal(again[0], noise[0, :4])  # a new draw, not the first one again
