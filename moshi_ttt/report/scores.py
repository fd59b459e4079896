"""What `score` reports of a recording: per-target NLL summarised by codebook, by position and as
moshi-finetune's training loss, and the same pooled over files. numpy only (no torch), so reports
can be read, merged and plotted without a model stack.

A file's scores are a `[1 + dep_q, T]` float32 array of NLL in nats (row 0 text, rows 1..dep_q
Moshi's audio codebooks cb0..; NaN where a target is not scored; see `streaming/scoring.py` for
what is scored). From it:

- `nll[key]` / `count[key]`: the mean NLL and the number of scored targets, for `text` (when
  scored), each codebook `cb0..cb{dep_q-1}`, and `audio` (pooled over every scored audio target);
- `perplexity[key] = exp(nll[key])` (a perplexity of a loss in nats; `2 ** loss` is not one);
- `weighted_loss`: `text_loss + audio_loss` as moshi-finetune's `compute_loss_with_mask` weighs
  them (`finetune_loss`), with the weighted sums kept so that files pool exactly;
- `buckets`: the same means over windows of `bucket_seconds` of the recording.

Pooled numbers (a run's totals, a plot's curves) are token-weighted: sums over every scored
target of every file, divided by their count, never truncated to the shortest file.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass, field

if tp.TYPE_CHECKING:
    import numpy as np

SECONDS_PER_FRAME = 0.08  # Moshi's frame: one LM step per 80 ms
AUDIO = "audio"
TEXT = "text"


def row_names(dep_q: int) -> list[str]:
    """Names of the score array's rows: text, then Moshi's codebooks."""
    return [TEXT, *(f"cb{k}" for k in range(dep_q))]


@dataclass
class Sums:
    """Summed NLL and counts per key: what pools exactly across files and buckets."""

    total: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, values: np.ndarray) -> None:
        import numpy as np

        scored = values[~np.isnan(values)]
        self.total[key] = self.total.get(key, 0.0) + float(scored.astype(np.float64).sum())
        self.count[key] = self.count.get(key, 0) + int(scored.size)

    def merge(self, other: Sums) -> None:
        for key, value in other.total.items():
            self.total[key] = self.total.get(key, 0.0) + value
            self.count[key] = self.count.get(key, 0) + other.count[key]

    def means(self) -> dict[str, float | None]:
        return {k: (self.total[k] / self.count[k] if self.count[k] else None) for k in self.total}


def array_sums(nll: np.ndarray, text_scored: bool) -> Sums:
    """Sums of a `[1 + dep_q, T']` slice: text (if scored), each codebook, and all audio."""

    sums = Sums()
    names = row_names(nll.shape[0] - 1)
    if text_scored:
        sums.add(TEXT, nll[0])
    for row, name in enumerate(names[1:], start=1):
        sums.add(name, nll[row])
    sums.add(AUDIO, nll[1:].reshape(-1))
    return sums


@dataclass
class Bucket:
    """Scores of the targets in `[start_s, end_s)` of the recording (by target frame)."""

    start_s: float
    end_s: float
    nll: dict[str, float | None]
    count: dict[str, int]
    # Summed NLL per key, for pooling across files (means alone would not pool).
    total: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightedLoss:
    """moshi-finetune's training loss over some targets (None where a term has no target), with
    the weighted sums that make it pool: `text_loss = text_sum / text_weight`, likewise audio."""

    text_loss: float | None
    audio_loss: float | None
    loss: float | None  # text_loss + audio_loss; None unless both exist (training never lacks text)
    text_sum: float = 0.0
    text_weight: float = 0.0
    audio_sum: float = 0.0
    audio_weight: float = 0.0

    @classmethod
    def from_sums(cls, text_sum: float, text_weight: float, audio_sum: float, audio_weight: float) -> WeightedLoss:
        text = text_sum / text_weight if text_weight else None
        audio = audio_sum / audio_weight if audio_weight else None
        return cls(
            text_loss=text,
            audio_loss=audio,
            loss=None if text is None or audio is None else text + audio,
            text_sum=text_sum,
            text_weight=text_weight,
            audio_sum=audio_sum,
            audio_weight=audio_weight,
        )


def finetune_loss(
    nll: np.ndarray,
    targets: np.ndarray,
    text_padding_ids: tp.Iterable[int],
    first_codebook_weight_multiplier: float = 1.0,
    text_padding_weight: float = 0.5,
    counted: np.ndarray | None = None,
) -> WeightedLoss:
    """`text_loss + audio_loss` as moshi-finetune's `compute_loss_with_mask` computes them.

    nll, targets [..., 1 + dep_q, T] (row 0 text, rows 1.. Moshi's audio; any leading dims are
    pooled, as training pools a batch); counted [..., 1 + dep_q, T] bool, default: where nll is
    not NaN. `text_padding_ids` are the checkpoint's (PAD, EPAD) ids. Each term is a weighted
    mean over its counted targets, `sum(w * nll) / sum(w)` with w = 1 per counted target, except:
    - text: w = text_padding_weight where the target is PAD or EPAD (training compares the
      target after zeroing the uncounted ones, so the EPAD id 0 matches those too, but their
      weight is already 0);
    - audio: w = first_codebook_weight_multiplier on Moshi's first (semantic) codebook.
    Only w > 0 enters the numerator; every w the denominator. Training sums the two terms
    (each averaged over its own targets), so text and audio weigh the same whatever their counts.
    """
    import numpy as np

    nll = np.asarray(nll, dtype=np.float64)
    targets = np.asarray(targets)
    counted = ~np.isnan(nll) if counted is None else np.asarray(counted, dtype=bool)
    weights = counted.astype(np.float64)  # [..., R, T]
    text_targets = np.where(counted[..., 0, :], targets[..., 0, :], 0)  # [..., T]
    text_weights = weights[..., 0, :].copy()  # [..., T]
    for token in set(text_padding_ids):
        text_weights[text_targets == token] *= text_padding_weight
    audio_weights = weights[..., 1:, :].copy()  # [..., dep_q, T]
    audio_weights[..., 0, :] *= first_codebook_weight_multiplier
    text_sum, text_weight = _weighted_sums(nll[..., 0, :], text_weights)
    audio_sum, audio_weight = _weighted_sums(nll[..., 1:, :], audio_weights)
    return WeightedLoss.from_sums(text_sum, text_weight, audio_sum, audio_weight)


def _weighted_sums(nll: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """`(sum(where(w > 0, nll * w, 0)), sum(w))`: loss.py's reduction, before its division."""
    import numpy as np

    positive = weights > 0
    return float(np.where(positive, np.where(positive, nll, 0.0) * weights, 0.0).sum()), float(weights.sum())


def perplexity(nll: float | None) -> float | None:
    """exp(mean NLL in nats); None where nothing was scored."""
    return None if nll is None else math.exp(nll)


@dataclass
class ScoreSummary:
    """A file's (or a run's pooled) scores; field names are the report schema's."""

    frames: int
    nll: dict[str, float | None]
    count: dict[str, int]
    perplexity: dict[str, float | None]
    weighted_loss: WeightedLoss
    buckets: list[Bucket]
    total: dict[str, float] = field(default_factory=dict)  # summed NLL per key (pooling)

    @classmethod
    def from_json(cls, data: dict) -> ScoreSummary:
        return cls(
            frames=int(data.get("frames", 0)),
            nll=dict(data.get("nll") or {}),
            count=dict(data.get("count") or {}),
            perplexity=dict(data.get("perplexity") or {}),
            weighted_loss=WeightedLoss(
                **(data.get("weighted_loss") or {"text_loss": None, "audio_loss": None, "loss": None})
            ),
            buckets=[Bucket(**b) for b in data.get("buckets") or []],
            total=dict(data.get("total") or {}),
        )

    def to_json(self) -> dict:
        return asdict(self)


def _summary(sums: Sums, frames: int, loss: WeightedLoss, buckets: list[Bucket]) -> ScoreSummary:
    means = sums.means()
    return ScoreSummary(
        frames=frames,
        nll=means,
        count=dict(sums.count),
        perplexity={k: perplexity(v) for k, v in means.items()},
        weighted_loss=loss,
        buckets=buckets,
        total=dict(sums.total),
    )


def summarize(
    nll: np.ndarray,
    text_row: np.ndarray,
    text_scored: bool,
    text_padding_ids: tp.Iterable[int],
    bucket_seconds: float,
    first_codebook_weight: float = 1.0,
    text_padding_weight: float = 0.5,
) -> ScoreSummary:
    """A file's summary from its score array. nll [1 + dep_q, T] (NaN: not scored); text_row [T]
    the text targets (for the padding weights; ignored when text is not scored)."""
    import numpy as np

    rows, frames = nll.shape
    targets = np.zeros_like(nll, dtype=np.int64)  # [R, T]: only the text targets matter for the weights
    targets[0] = np.asarray(text_row, dtype=np.int64)[:frames]
    loss = finetune_loss(nll, targets, text_padding_ids, first_codebook_weight, text_padding_weight)
    per_bucket = max(1, round(bucket_seconds / SECONDS_PER_FRAME))
    buckets = []
    for start in range(0, frames, per_bucket):
        part = array_sums(nll[:, start : start + per_bucket], text_scored)
        end = min(frames, start + per_bucket)
        buckets.append(
            Bucket(
                start_s=round(start * SECONDS_PER_FRAME, 3),
                end_s=round(end * SECONDS_PER_FRAME, 3),
                nll=part.means(),
                count=dict(part.count),
                total=dict(part.total),
            )
        )
    return _summary(array_sums(nll, text_scored), frames, loss, buckets)


def pool(summaries: tp.Sequence[ScoreSummary]) -> ScoreSummary | None:
    """Token-weighted pooling of files: every scored target of every file counts once; bucket i
    pools bucket i of every file that reaches it (longer files alone fill the later buckets)."""
    if not summaries:
        return None
    sums, frames = Sums(), 0
    text_sum = text_weight = audio_sum = audio_weight = 0.0
    by_bucket: dict[int, tuple[Bucket, Sums]] = {}
    for summary in summaries:
        sums.merge(Sums(dict(summary.total), dict(summary.count)))
        frames += summary.frames
        loss = summary.weighted_loss
        text_sum, text_weight = text_sum + loss.text_sum, text_weight + loss.text_weight
        audio_sum, audio_weight = audio_sum + loss.audio_sum, audio_weight + loss.audio_weight
        for index, bucket in enumerate(summary.buckets):
            first, bucket_sums = by_bucket.setdefault(index, (bucket, Sums()))
            bucket_sums.merge(Sums(dict(bucket.total), dict(bucket.count)))
            if bucket.end_s > first.end_s:
                by_bucket[index] = (bucket, bucket_sums)
    buckets = [
        Bucket(b.start_s, b.end_s, s.means(), dict(s.count), dict(s.total))
        for b, s in (by_bucket[i] for i in sorted(by_bucket))
    ]
    loss = WeightedLoss.from_sums(text_sum, text_weight, audio_sum, audio_weight)
    return _summary(sums, frames, loss, buckets)
