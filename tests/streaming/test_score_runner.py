"""Audio in, scores out: `ScoreRunner` encodes each channel with Mimi as its own stream, lays the
codes out as the LM reads them (text, Moshi's channel, the user's) and scores exactly what
`LMModel.forward` scores on those codes, for stereo recordings and each mono user-stream policy,
B files at once as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.streaming.score_runner import ScoreInput, ScoreRunner
from moshi_ttt.streaming.scoring import forward_nll

FRAME = 1920


def audio(seconds: float, seed: int, channels: int) -> np.ndarray:
    """[C, n] noise with a different level per channel (Mimi codes differ between channels)."""
    gen = np.random.default_rng(seed)
    n = int(seconds * 24000)
    return (gen.standard_normal((channels, n)) * np.array([[0.3], [0.05]])[:channels]).astype(np.float32)


def frames_of(pcm: np.ndarray) -> list[np.ndarray]:
    return [pcm[:, i * FRAME : (i + 1) * FRAME] for i in range(pcm.shape[1] // FRAME)]


def encode_pair(model, moshi: np.ndarray, user: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi's codes of a slot's two channels, frame by frame, as one streaming batch of two rows
    (the runner's shape at batch size 1: Mimi's batched encoder rounds differently at other
    shapes, and a near-tie code may then flip); the user row is masked when it is None."""
    mimi, lm = model.mimi, model.lm
    rows = []
    with torch.no_grad(), mimi.streaming(2):
        mimi.set_exec_mask(torch.tensor([True, user is not None]))
        for index, frame in enumerate(frames_of(moshi[None])):
            batch = np.zeros((2, 1, FRAME), dtype=np.float32)
            batch[0, 0] = frame[0]
            if user is not None:
                batch[1, 0] = user[index * FRAME : (index + 1) * FRAME]
            rows.append(mimi.encode(torch.from_numpy(batch))[:, :, 0])
    codes = torch.stack(rows, dim=2)  # [2, Q, T]
    return codes[0, : lm.dep_q], codes[1, : lm.n_q - lm.dep_q]


def expected_codes(model, pcm: np.ndarray, user_stream: str, text: np.ndarray) -> torch.Tensor:
    """[K, T] as the definition lays them out, built independently of the runner."""
    if pcm.shape[0] > 1:
        moshi, user = encode_pair(model, pcm[0], pcm[1])
    elif user_stream == "silence":
        moshi, user = encode_pair(model, pcm[0], np.zeros_like(pcm[0]))
    else:
        moshi, user = encode_pair(model, pcm[0], None)
        user = moshi[: user.shape[0]] if user_stream == "copy" else torch.full_like(user, -1)
    return torch.cat([torch.from_numpy(text)[None, : moshi.shape[1]], moshi, user], dim=0)


def run(model, recordings, batch_size: int = 1, **kwargs):
    runner = ScoreRunner(model, batch_size, **kwargs)
    inputs = [(key, ScoreInput(iter(frames_of(pcm)), pcm.shape[1] // FRAME, text)) for key, pcm, text in recordings]
    return dict(runner.run(inputs))


@pytest.fixture(scope="module")
def ttt_model(tiny_inplace):
    return load_model(str(tiny_inplace.base), str(tiny_inplace.finetune))


@pytest.mark.parametrize("user_stream", ["silence", "copy", "none"])
def test_mono_user_stream_policy_is_what_is_scored(ttt_model, user_stream) -> None:
    pcm = audio(2.0, seed=1, channels=1)
    lm = ttt_model.lm
    pad = np.full(pcm.shape[1] // FRAME, lm.text_padding_token_id)
    got = run(ttt_model, [("a", pcm, None)], user_stream=user_stream)["a"]
    expected = forward_nll(lm, expected_codes(ttt_model, pcm, user_stream, pad)[None], score_text=False)[0]
    assert got.score.frames == pcm.shape[1] // FRAME and not got.score.score_text
    np.testing.assert_allclose(got.score.nll, expected.numpy(), atol=1e-5)
    assert np.array_equal(got.text_row, pad)


def test_stereo_takes_channel_1_as_the_user_and_scores_an_aligned_text_row(ttt_model) -> None:
    lm = ttt_model.lm
    pcm = audio(2.4, seed=2, channels=2)
    frames = pcm.shape[1] // FRAME
    text = np.random.default_rng(3).integers(4, lm.text_card, frames)
    got = run(ttt_model, [("a", pcm, text)], user_stream="none")["a"]  # the policy is for mono only
    expected = forward_nll(lm, expected_codes(ttt_model, pcm, "none", text)[None], score_text=True)[0]
    assert got.score.score_text and not np.isnan(got.score.nll[0, :-1]).all()
    np.testing.assert_allclose(got.score.nll, expected.numpy(), atol=1e-5)
    # Swapping the channels is another recording: the user channel is really read.
    swapped = run(ttt_model, [("a", pcm[::-1].copy(), text)])["a"]
    assert not np.allclose(np.nan_to_num(swapped.score.nll), np.nan_to_num(got.score.nll))


def test_three_slots_score_each_file_as_alone_in_them(ttt_model) -> None:
    """At a fixed batch size, neighbours change nothing (to float rounding: streams whose TTT
    chunks fill at the same step commit in one batched update)."""
    recordings = [
        (name, audio(seconds, seed, channels), None)
        for name, seconds, seed, channels in [("a", 1.2, 4, 1), ("b", 2.0, 5, 2), ("c", 0.4, 6, 1), ("d", 1.6, 7, 2)]
    ]
    together = run(ttt_model, recordings, batch_size=3)
    for key, pcm, text in recordings:
        alone = run(ttt_model, [(key, pcm, text)], batch_size=3)[key]
        np.testing.assert_allclose(together[key].score.nll, alone.score.nll, atol=1e-5, err_msg=key)
        assert [r.updates for r in together[key].score.ttt_layers] == [r.updates for r in alone.score.ttt_layers]
    assert together["b"].score.frames == 25 and all(r.updates > 0 for r in together["b"].score.ttt_layers)
