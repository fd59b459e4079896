"""Teacher-forced scoring: streamed per-target NLL equals moshi's `LMModel.forward` (past the
attention context), TTT adapts and reports as in infer, slots are independent, and the training
loss and perplexity are moshi-finetune's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from moshi.modules.transformer import set_attention_context

from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.report.scores import finetune_loss
from moshi_ttt.streaming.scoring import (
    CodeLayout,
    ScoreAccumulator,
    TeacherForcedScorer,
    check_codes,
    forward_nll,
    target_frames,
)
from moshi_ttt.ttt.mlp import TTTMLP

CONTEXT = 12  # frames of attention: every test sequence runs well past it


def stereo_codes(lm, length: int, seed: int, text: bool = True) -> torch.Tensor:
    """[K, T] codes as a two-channel recording gives them: a text row (words, PAD, EPAD), Moshi's
    audio, the user's audio, with some -1 (nothing there) in every kind of row."""
    gen = torch.Generator().manual_seed(seed)
    K = lm.num_codebooks
    codes = torch.randint(0, lm.card, (K, length), generator=gen)
    words = torch.randint(4, lm.text_card, (length,), generator=gen)
    pads = torch.tensor([lm.text_padding_token_id, lm.end_of_text_padding_id])[
        torch.randint(0, 2, (length,), generator=gen)
    ]
    codes[0] = torch.where(torch.rand(length, generator=gen) < 0.5, words, pads) if text else lm.text_padding_token_id
    holes = torch.rand(K, length, generator=gen) < 0.08
    return torch.where(holes, -1, codes)


def score(model, files, batch_size: int = 1, **kwargs) -> dict:
    """{key: FileScore} for [(key, codes, score_text)] through the streaming scorer."""
    return dict(TeacherForcedScorer(model, batch_size, **kwargs).run(files))


def reference(lm, codes: torch.Tensor, score_text: bool = True) -> np.ndarray:
    return forward_nll(lm, codes[None], score_text=score_text)[0].numpy()


def assert_same_scores(got: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert np.array_equal(np.isnan(got), np.isnan(expected)), "different targets scored"
    assert np.nanmax(np.abs(got - expected)) <= atol


def short_context(model):
    set_attention_context(model.lm.transformer, CONTEXT)
    return model


@pytest.fixture(scope="module")
def plain(tiny_inplace):
    return short_context(load_model(str(tiny_inplace.base)))


@pytest.fixture(scope="module", params=["inplace", "ttt-mlp"])
def ttt_paths(request, tiny_inplace, tiny_ttt_mlp):
    return tiny_inplace if request.param == "inplace" else tiny_ttt_mlp


@pytest.fixture(scope="module")
def ttt_model(ttt_paths):
    return short_context(load_model(str(ttt_paths.base), str(ttt_paths.finetune)))


# -- the definition: moshi's LMModel.forward ---------------------------------------------------------


def test_plain_scores_equal_lm_forward_past_the_context(plain) -> None:
    lm = plain.lm
    layout = CodeLayout.of(lm)
    assert layout.delays == tuple(lm.delays) and max(layout.delays) == 1  # the tiny model delays acoustics
    codes = stereo_codes(lm, 45, seed=0)
    expected = reference(lm, codes)
    got = score(plain, [("a", codes, True)])["a"]
    assert got.nll.shape == (1 + lm.dep_q, 45) and got.frames == 45
    assert_same_scores(got.nll, expected)
    # What counts, by moshi's masks: not -1, and t < T - d_k.
    for k in range(1 + lm.dep_q):
        counted = ~np.isnan(got.nll[k])
        assert counted.tolist() == [codes[k, t] >= 0 and t < 45 - lm.delays[k] for t in range(45)]
    # The sequence is past the context, and the context matters there.
    with torch.no_grad():
        set_attention_context(lm.transformer, None)
        unlimited = reference(lm, codes)
        set_attention_context(lm.transformer, CONTEXT)
    assert np.nanmax(np.abs(unlimited[:, CONTEXT + 2 :] - expected[:, CONTEXT + 2 :])) > 1e-3


def test_without_a_text_row_text_is_context_only(plain) -> None:
    lm = plain.lm
    for fill in (lm.text_padding_token_id, -1):  # --text-stream pad / none
        codes = stereo_codes(lm, 20, seed=1)
        codes[0] = fill
        got = score(plain, [("a", codes, False)])["a"].nll
        assert np.isnan(got[0]).all()
        assert_same_scores(got, reference(lm, codes, score_text=False))


def test_target_frames_is_the_delay_map() -> None:
    assert target_frames([0, 1, 5], [0, 0, 1, 2]).tolist() == [[0, 0, -1, -1], [1, 1, 0, -1], [5, 5, 4, 3]]


def test_accumulator_places_each_score_on_its_frame() -> None:
    acc = ScoreAccumulator(2)
    acc.add(np.array([1.0, 9.0]), np.array([0, -1]))
    acc.add(np.array([2.0, 3.0]), np.array([1, 0]))
    out = acc.array(3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])


def test_codes_out_of_range_are_refused(plain) -> None:
    layout = CodeLayout.of(plain.lm)
    codes = stereo_codes(plain.lm, 5, seed=2)
    check_codes(codes, layout)
    bad = codes.clone()
    bad[2, 3] = layout.card
    with pytest.raises(MoshiTTTError, match="row 2, frame 3"):
        check_codes(bad, layout)
    with pytest.raises(MoshiTTTError, match="codes must be"):
        check_codes(codes[1:], layout)


# -- TTT --------------------------------------------------------------------------------------------


def test_ttt_scores_equal_the_chunk_parallel_forward(ttt_model) -> None:
    """`LMModel.forward` runs the TTT layers' chunk-parallel path over the whole sequence; the
    streamed scores (fast weights adapting step by step) equal it, past the context, with a final
    partial chunk (37 = 4 chunks of 8 + 5)."""
    lm = ttt_model.lm
    codes = stereo_codes(lm, 37, seed=3)
    got = score(ttt_model, [("a", codes, True)])["a"]
    assert_same_scores(got.nll, reference(lm, codes))
    for report in got.ttt_layers:
        assert report.tokens == 37 and report.updates == math.ceil(37 / 8) and report.pending_tokens == 0
        assert report.drift > 0


def test_ttt_changes_the_scores_and_frozen_does_not_update(ttt_model) -> None:
    codes = stereo_codes(ttt_model.lm, 30, seed=4)
    adapted = score(ttt_model, [("a", codes, True)])["a"]
    frozen = score(ttt_model, [("a", codes, True)], ttt_enabled=False)["a"]
    assert all(r.updates == 0 and r.drift == 0.0 for r in frozen.ttt_layers)
    assert all(r.updates == 4 for r in adapted.ttt_layers)
    if ttt_model.ttt.variant == "inplace":  # outputs read W from before the chunk: the same until 8 tokens
        np.testing.assert_allclose(adapted.nll[:, :7], frozen.nll[:, :7], atol=1e-5)
    assert np.nanmax(np.abs(adapted.nll[:, 9:] - frozen.nll[:, 9:])) > 1e-4


def test_zero_learning_rate_is_the_model_without_updates(ttt_paths, plain) -> None:
    """In-Place at lr 0 is plain Moshi (W^(0) is the base down projection); TTT-MLP at lr 0 keeps
    its branch with fixed weights, i.e. the frozen model (plain Moshi needs alpha = 0)."""
    model = short_context(load_model(str(ttt_paths.base), str(ttt_paths.finetune)))
    codes = stereo_codes(model.lm, 26, seed=5)
    frozen = score(model, [("a", codes, True)], ttt_enabled=False)["a"].nll
    if model.ttt.variant == "inplace":
        model.ttt.learning_rate = 0.0
        expected = score(plain, [("a", codes, True)])["a"].nll
        assert_same_scores(frozen, expected)  # the frozen In-Place model is plain Moshi too
    else:
        for module in (m for m in model.lm.modules() if isinstance(m, TTTMLP)):
            module.base_lr = 0.0
        expected = frozen
        assert np.nanmax(np.abs(frozen - score(plain, [("a", codes, True)])["a"].nll)) > 1e-3
    assert_same_scores(score(model, [("a", codes, True)])["a"].nll, expected)


def test_timeline_is_reported(ttt_model) -> None:
    got = score(ttt_model, [("a", stereo_codes(ttt_model.lm, 20, seed=6), True)], timeline=True)["a"]
    for report in got.ttt_layers:
        assert [u.token for u in report.timeline] == [8, 16, 20]


# -- batching -----------------------------------------------------------------------------------------


def test_batch_of_three_equals_one_at_a_time(ttt_model) -> None:
    """Files of different lengths (one shorter than the delay, one shorter than a TTT chunk),
    text scored or not, more files than slots: each file's scores and TTT numbers are its own."""
    lm = ttt_model.lm
    lengths = [23, 1, 31, 6, 17]
    files = [(f"f{i}", stereo_codes(lm, n, seed=10 + i, text=i % 2 == 0), i % 2 == 0) for i, n in enumerate(lengths)]
    alone = score(ttt_model, files, batch_size=1)
    batched = score(ttt_model, files, batch_size=3)
    assert sorted(batched) == sorted(alone)
    for key, *_ in files:
        assert_same_scores(batched[key].nll, alone[key].nll)
        for a, b in zip(alone[key].ttt_layers, batched[key].ttt_layers):
            assert (a.tokens, a.updates, a.pending_tokens) == (b.tokens, b.updates, b.pending_tokens)
            assert b.drift == pytest.approx(a.drift, rel=1e-4, abs=1e-6)
    for key, codes, score_text in files:  # and alone is the definition
        assert_same_scores(alone[key].nll, reference(lm, codes, score_text))


def test_slots_step_independently(ttt_model) -> None:
    """Driven by hand: slot 0 idles (masked) for three steps in the middle of its file, then takes
    another file while slot 1 goes on; every file scores as it does alone."""
    lm = ttt_model.lm
    R = 1 + lm.dep_q
    long, short, last = stereo_codes(lm, 14, seed=20), stereo_codes(lm, 9, seed=21), stereo_codes(lm, 2, seed=22)
    queue = [short, last]
    scorer = TeacherForcedScorer(ttt_model, 2)
    sums = [ScoreAccumulator(R), ScoreAccumulator(R)]
    done = []
    with scorer:
        scorer.start(0, True)
        scorer.start(1, True)
        for t in range(14):
            idle = t in (2, 3, 4) or not scorer.busy(0)
            frames = torch.zeros(2, lm.num_codebooks, dtype=torch.long)
            frames[1] = long[:, t]
            if not idle:
                frames[0] = queue[0][:, scorer.steps(0)]
            step = scorer.step(frames, [not idle, True])
            if idle:
                assert np.isnan(step.nll[0].numpy()).all() and (step.frames[0] == -1).all()
            else:
                sums[0].add(step.nll[0].numpy(), step.frames[0])
            sums[1].add(step.nll[1].numpy(), step.frames[1])
            if scorer.busy(0) and scorer.steps(0) == queue[0].shape[1]:
                reports = scorer.finish(0)
                assert all(r.tokens == queue[0].shape[1] for r in reports)
                done.append((queue[0], sums[0].array(queue[0].shape[1])))
                queue.pop(0)
                sums[0] = ScoreAccumulator(R)
                if queue:
                    scorer.start(0, True)
        reports = scorer.finish(1)
    assert len(done) == 2 and all(r.tokens == 14 for r in reports)
    assert_same_scores(sums[1].array(14), reference(lm, long))
    for codes, nll in done:
        assert_same_scores(nll, reference(lm, codes))
    with pytest.raises(MoshiTTTError, match="not streaming"):
        scorer.start(0, True)


def test_scores_feed_the_loss(plain) -> None:
    """End to end on one file: the loss of the streamed scores is the loss of forward's."""
    lm = plain.lm
    codes = stereo_codes(lm, 25, seed=7)
    ids = (lm.text_padding_token_id, lm.end_of_text_padding_id)
    got = finetune_loss(score(plain, [("a", codes, True)])["a"].nll, codes[: 1 + lm.dep_q].numpy(), ids)
    expected = finetune_loss(reference(lm, codes), codes[: 1 + lm.dep_q].numpy(), ids)
    assert got.loss == pytest.approx(expected.loss, abs=1e-5)
