"""What `score` reports: moshi-finetune's weighted loss, means, perplexity, buckets by position,
and token-weighted pooling over files (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moshi_ttt.report.scores import ScoreSummary, finetune_loss, pool, summarize

# -- the training loss and perplexity ---------------------------------------------------------------------


def test_finetune_loss_weights_as_moshi_finetune() -> None:
    PAD, EPAD = 3, 0
    nan = math.nan
    # Row 0 text, rows 1-2 audio; 4 frames.
    targets = np.array([[PAD, 17, EPAD, 0], [5, 6, 7, 8], [1, 2, -1, 4]])
    nll = np.array(
        [
            [1.0, 2.0, 4.0, nan],  # last text target not counted (its id 0 is EPAD's: no matter)
            [1.0, 3.0, nan, 2.0],
            [0.5, 1.5, nan, 5.0],
        ]
    )
    loss = finetune_loss(nll, targets, (PAD, EPAD), first_codebook_weight_multiplier=2.0, text_padding_weight=0.5)
    assert loss.text_loss == pytest.approx((0.5 * 1 + 2 + 0.5 * 4) / (0.5 + 1 + 0.5))
    assert loss.audio_loss == pytest.approx((2 * (1 + 3 + 2) + 0.5 + 1.5 + 5) / (2 * 3 + 3))
    assert loss.loss == pytest.approx(loss.text_loss + loss.audio_loss)
    # Defaults: padding weighs 0.5, the first codebook 1; leading dims pool like a batch.
    default = finetune_loss(np.stack([nll, nll]), np.stack([targets, targets]), (PAD, EPAD))
    assert default.text_loss == pytest.approx(loss.text_loss)
    assert default.audio_loss == pytest.approx((1 + 3 + 2 + 0.5 + 1.5 + 5) / 6)
    # A padding weight of 0 leaves padding out; no text at all leaves the total undefined.
    assert finetune_loss(nll, targets, (PAD, EPAD), text_padding_weight=0.0).text_loss == pytest.approx(2.0)
    no_text = nll.copy()
    no_text[0] = nan
    assert finetune_loss(no_text, targets, (PAD, EPAD)).loss is None


def test_summary_means_counts_perplexity_and_buckets() -> None:
    nan = math.nan
    # 3 rows (text, cb0, cb1), 5 frames; buckets of 2 frames (0.16 s).
    nll = np.array(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [1.0, 2.0, 3.0, 4.0, nan],
            [5.0, nan, 1.0, 1.0, nan],
        ],
        dtype=np.float32,
    )
    text_row = np.array([3, 7, 7, 0, 7])
    summary = summarize(nll, text_row, text_scored=False, text_padding_ids=(3, 0), bucket_seconds=0.16)
    assert "text" not in summary.nll and summary.frames == 5
    assert summary.count == {"cb0": 4, "cb1": 3, "audio": 7}
    assert summary.nll["cb0"] == pytest.approx(2.5) and summary.nll["cb1"] == pytest.approx(7 / 3)
    assert summary.nll["audio"] == pytest.approx(17 / 7)  # pooled over targets, not a mean of means
    assert summary.perplexity["audio"] == pytest.approx(math.exp(17 / 7))  # exp, never 2 **
    assert [(b.start_s, b.end_s) for b in summary.buckets] == [(0.0, 0.16), (0.16, 0.32), (0.32, 0.4)]
    assert [b.nll["audio"] for b in summary.buckets] == [pytest.approx(8 / 3), pytest.approx(9 / 4), None]
    with_text = summarize(nll, text_row, text_scored=True, text_padding_ids=(3, 0), bucket_seconds=60)
    assert with_text.count["text"] == 5 and with_text.nll["text"] == pytest.approx(1.0)
    assert with_text.weighted_loss.text_loss == pytest.approx(1.0)  # every text target has NLL 1


def test_pooled_scores_are_token_weighted_and_keep_the_long_files_tail() -> None:
    """Two files: the run's numbers count every target once (not a mean of the files' means),
    and buckets past the short file's end come from the long file alone."""
    short = np.full((2, 3), 1.0, dtype=np.float32)  # text + cb0, 3 frames
    long = np.full((2, 9), 4.0, dtype=np.float32)
    args = dict(text_scored=False, text_padding_ids=(3, 0), bucket_seconds=0.24)  # 3 frames a bucket
    a = summarize(short, np.zeros(3), **args)
    b = summarize(long, np.zeros(9), **args)
    pooled = pool([a, b])
    assert pooled.count["audio"] == 12 and pooled.nll["audio"] == pytest.approx((3 * 1 + 9 * 4) / 12)
    assert [bucket.nll["audio"] for bucket in pooled.buckets] == [pytest.approx(2.5), 4.0, 4.0]
    assert [bucket.count["audio"] for bucket in pooled.buckets] == [6, 3, 3]
    assert pooled.weighted_loss.audio_loss == pytest.approx(pooled.nll["audio"])
    # What a report stores reads back to the same pooling.
    again = pool([ScoreSummary.from_json(a.to_json()), ScoreSummary.from_json(b.to_json())])
    assert again == pooled
