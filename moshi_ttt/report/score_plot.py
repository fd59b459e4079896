"""`moshi-ttt plot` of a `score` report: NLL versus position in the recording, the figure that says
whether TTT helps past the attention window.

Three panels share the position axis (the start of each `--bucket-seconds` bucket, in seconds):
text (when scored), Moshi's first (semantic) codebook cb0, and the acoustic codebooks cb1.. pooled.
Each curve is the report's token-weighted mean over every file reaching that bucket (the run's
totals, `report/scores.py`); a second report (`--compare`, e.g. the same folder with `--no-ttt`)
is drawn on the same axes. A dotted line marks the edge of the attention window (the context in
seconds, from the report's settings); the bottom panel shows how many audio targets each bucket
pooled, so a curve's far end, where few files reach, reads for what it is.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError
from .scores import TEXT, Bucket, ScoreSummary, pool

DPI = 100


@dataclass
class ScoredReport:
    label: str
    pooled: ScoreSummary
    context_s: float | None


def acoustic(bucket: Bucket) -> float | None:
    """Mean NLL over the acoustic codebooks (every codebook but cb0) of a bucket."""
    keys = [k for k in bucket.count if k.startswith("cb") and k != "cb0"]
    count = sum(bucket.count[k] for k in keys)
    return sum(bucket.total[k] for k in keys) / count if count else None


def load_scored_report(path: Path, data: dict, files: list[tp.Any]) -> ScoredReport:
    summaries = [f.scores for f in files if f.status in ("ok", "skipped") and f.scores is not None]
    pooled = pool(summaries)
    if pooled is None:
        raise MoshiTTTError("has no scored file", path)
    settings = data.get("settings") or {}
    score = settings.get("score") or {}
    ttt = settings.get("ttt") or {}
    state = "" if not ttt else " (TTT on)" if ttt.get("enabled", True) else " (TTT off)"
    name = Path(path).resolve()
    context = score.get("context_s")
    return ScoredReport(f"{name.parent.name}/{name.name}{state}", pooled, float(context) if context else None)


PANELS: list[tuple[str, tp.Callable[[Bucket], float | None]]] = [
    ("text NLL", lambda b: b.nll.get(TEXT)),
    ("cb0 NLL (semantic)", lambda b: b.nll.get("cb0")),
    ("cb1.. NLL (acoustic)", acoustic),
]


def plot_scores(reports: list[ScoredReport], output: Path, width: int, height: int | None) -> Path:
    """Draw the scored reports on shared axes into the PNG `output`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise MoshiTTTError("plotting needs matplotlib: pip install 'moshi-ttt[plot]'") from None
    panels = [p for p in PANELS if any(p[1](b) is not None for r in reports for b in r.pooled.buckets)]
    height = height or 220 * (len(panels) + 1) + 80
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(panels) + 1, 1, squeeze=False, sharex="col")[:, 0]
    colors = matplotlib.colormaps["tab10"]
    for index, report in enumerate(reports):
        buckets = report.pooled.buckets
        x = [b.start_s for b in buckets]
        for ax, (name, value) in zip(axes, panels):
            ax.plot(x, [value(b) for b in buckets], marker=".", color=colors(index), label=report.label)
            ax.set_ylabel(name, fontsize="small")
        axes[-1].step(x, [b.count.get("audio", 0) for b in buckets], where="post", color=colors(index))
    axes[-1].set_ylabel("audio targets\nper bucket", fontsize="small")
    axes[-1].set_xlabel("position in the recording (s, bucket start)", fontsize="small")
    contexts = {r.context_s for r in reports if r.context_s}
    for ax in axes:
        ax.grid(alpha=0.3)
        for context in contexts:
            ax.axvline(context, linestyle=":", color="black", alpha=0.7)
    if contexts:
        axes[0].text(
            min(contexts),
            1.0,
            " attention window's edge",
            transform=axes[0].get_xaxis_transform(),
            va="top",
            fontsize="x-small",
        )
    axes[0].legend(fontsize="x-small", loc="upper right")
    axes[0].set_title("NLL (nats) versus position, pooled over files", fontsize="medium")
    output = Path(output)
    figure.savefig(output, dpi=DPI)
    return output
