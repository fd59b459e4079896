"""Several recordings at once (issue 12): B slots through one model, each file's tokens, audio and
TTT numbers as the single-file runner gives them, whatever runs beside it."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_ttt.audio import read_audio
from moshi_ttt.batched import BatchedRunner
from moshi_ttt.model import load_model
from moshi_ttt.runner import StreamingRunner
from moshi_ttt.tiny import write_sample_recordings



@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, np.ndarray]:
    """Five lengths: one chunk or more, one shorter than a TTT chunk (7 steps < 8), one shorter
    than a frame (nothing to stream)."""
    paths = write_sample_recordings(tmp_path_factory.mktemp("batched"), seed=3,
                                    durations=(1.6, 2.4, 3.0, 0.5, 1.0))
    pcms = {path.name: read_audio(path) for path in paths}
    pcms["short.wav"] = pcms[paths[0].name][:1000]
    return pcms


@pytest.fixture(scope="module", params=["inplace", "ttt-mlp"])
def model(request, tiny_inplace, tiny_ttt_mlp):
    paths = tiny_inplace if request.param == "inplace" else tiny_ttt_mlp
    return load_model(str(paths.base), str(paths.finetune))


def alone(model, pcms: dict[str, np.ndarray], greedy: bool = False) -> dict:
    runner = StreamingRunner(model)
    runner.lm_gen.use_sampling = not greedy
    return {name: runner.run(pcm) for name, pcm in pcms.items()}


def batched(model, pcms: dict[str, np.ndarray], batch_size: int, greedy: bool = False,
            counter_noise: bool = False) -> dict:
    runner = BatchedRunner(model, batch_size, counter_noise=counter_noise)
    runner.lm_gen.use_sampling = not greedy
    results = dict(runner.run(pcms.items()))
    assert sorted(results) == sorted(pcms)
    return results


def test_one_slot_is_the_single_file_runner_bit_for_bit(model, files) -> None:
    """Sampled (not greedy): the per-stream generator draws what moshi's global one draws."""
    expected, got = alone(model, files), batched(model, files, 1)
    for name in files:
        assert got[name].text_tokens == expected[name].text_tokens, name
        assert got[name].text_steps == expected[name].text_steps, name  # timed transcripts line up
        assert got[name].pcm.tobytes() == expected[name].pcm.tobytes(), name
        assert (got[name].frames, got[name].steps) == (expected[name].frames, expected[name].steps)
        assert got[name].ttt_layers == expected[name].ttt_layers, name


def test_three_slots_give_every_file_its_single_file_result(model, files) -> None:
    """At B=3 the LM's matmuls run with 3 rows, which BLAS sums in another order than 1 row: the
    activations differ by ~1e-7. On this random tiny model that is enough to flip near-tie argmax
    picks of audio codes late in a file (and, sampled, one text token in one file), so text tokens
    are compared greedy and the TTT numbers to rounding; exact equality holds at a fixed batch
    size whatever the neighbours (next test)."""
    expected, got = alone(model, files, greedy=True), batched(model, files, 3, greedy=True)
    assert got["short.wav"].frames == 0 and got["short.wav"].text_tokens == []
    for name in files:
        want, have = expected[name], got[name]
        assert have.text_tokens == want.text_tokens, name
        assert len(have.pcm) == len(want.pcm), name
        assert (have.frames, have.steps) == (want.frames, want.steps), name
        for mine, theirs in zip(have.ttt_layers, want.ttt_layers, strict=True):
            assert (mine.tokens, mine.updates, mine.clipped_updates, mine.pending_tokens) == \
                (theirs.tokens, theirs.updates, theirs.clipped_updates, theirs.pending_tokens)
            assert mine.drift == pytest.approx(theirs.drift, rel=1e-2)
    assert len({tuple(r.text_tokens) for r in got.values() if r.text_tokens}) > 1  # files differ


@pytest.mark.parametrize("counter_noise", [False, True])
def test_a_file_does_not_depend_on_its_neighbours(model, files, counter_noise: bool) -> None:
    """Same batch size, other files beside it, another slot, sampled (with torch generators, and
    with the graph-safe counter noise used on GPU): the same tokens and audio bit for bit; the
    TTT numbers to rounding (streams whose chunks fill at the same step commit in one batched
    update, summed in another order)."""
    names = sorted(files)
    target = names[1]
    first = batched(model, {n: files[n] for n in (target, names[0], names[2])}, 3,
                    counter_noise=counter_noise)[target]
    second = batched(model, {n: files[n] for n in (names[3], names[4], target, names[0])}, 3,
                     counter_noise=counter_noise)[target]
    assert first.text_tokens == second.text_tokens
    assert first.pcm.tobytes() == second.pcm.tobytes()
    for mine, theirs in zip(first.ttt_layers, second.ttt_layers, strict=True):
        assert (mine.tokens, mine.updates, mine.clipped_updates) == (theirs.tokens, theirs.updates, theirs.clipped_updates)
        assert mine.drift == pytest.approx(theirs.drift, rel=1e-6)
