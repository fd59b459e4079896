"""`moshi-ttt plot`: what TTT did during each file of a report recorded with `--timeline` (a
`score` report is drawn as NLL versus position instead: `score_plot.py`).

One figure, a block of panels per file (rows) and one column per report (a second report with
`--compare`, e.g. the same inputs with `--no-ttt`, goes side by side, on shared axes):

- running drift ||W - W0|| of every TTT layer against time in the file (token * 0.08 s),
  clipped updates marked;
- each update's norm (In-Place: dashed, what it would have been without the clip);
- TTT-MLP: the inner loss on each mini-batch before (dashed) and after (solid) its step.

matplotlib (the `moshi-ttt[plot]` extra) is imported only when a figure is drawn, on the Agg
backend: no display needed.
"""

from __future__ import annotations

import json
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError
from .schema import REPORT_SCHEMA, SECONDS_PER_TOKEN, FileResult, LayerReport, UpdateRecord

DEFAULT_WIDTH, PANEL_HEIGHT = 1400, 260  # pixels; the default height grows with the panels
DPI = 100
LOSS_PANEL = "inner loss\n(dashed: before,\ndotted: at W0)"


@dataclass
class PlottedReport:
    """A report's files that carry a timeline, and a label for its column."""

    path: Path
    label: str
    files: list[FileResult]


def read_report(path: Path) -> tuple[dict, list[FileResult]]:
    """A report's JSON and its file entries; one line for anything that is not a report."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoshiTTTError(f"cannot read a moshi-ttt report ({type(exc).__name__})", path) from None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA or not isinstance(data.get("files"), list):
        raise MoshiTTTError("not a moshi-ttt report", path)
    try:
        files = [FileResult.from_json(entry) for entry in data["files"] if isinstance(entry, dict)]
    except TypeError as exc:
        raise MoshiTTTError(f"malformed report entry ({exc})", path) from None
    return data, files


def load_timeline_report(path: Path) -> PlottedReport:
    """Read a report and keep its files with TTT numbers; refuse one without any timeline."""
    data, files = read_report(path)
    files = [f for f in files if f.ttt is not None and f.ttt.layers]
    if not any(layer.timeline is not None for f in files for layer in f.ttt.layers):  # type: ignore[union-attr]
        raise MoshiTTTError("has no TTT timeline: rerun `moshi-ttt infer` with --timeline", path)
    ttt = (data.get("settings") or {}).get("ttt") or {}
    state = "" if not ttt else " (TTT on)" if ttt.get("enabled", True) else " (TTT off)"
    name = Path(path).resolve()
    return PlottedReport(Path(path), f"{name.parent.name}/{name.name}{state}", files)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_figure_path(output: Path, columns: tp.Sequence[PlottedReport]) -> None:
    """`plot` writes PNG figures and replaces nothing else: never a report it reads, an input or an
    output those reports list (by file identity, so links and other spellings count), nor any
    existing file that is not a PNG."""
    if output.suffix.lower() != ".png":
        raise MoshiTTTError("the figure is a PNG: name it .png", output)
    if output.is_dir():
        raise MoshiTTTError("is a folder; name the PNG to write", output)
    identity = _identity(output)
    if identity is None:
        return
    for column in columns:
        if _identity(column.path) == identity:
            raise MoshiTTTError("is the report being plotted; choose another name for the figure", output)
        for entry in column.files:
            for role, path in (("input", entry.input), ("output", entry.output)):
                if path is not None and _identity(Path(path)) == identity:
                    raise MoshiTTTError(f"is an {role} listed in {column.path}; choose another name", output)
    try:
        with open(output, "rb") as handle:
            head = handle.read(len(PNG_SIGNATURE))
    except OSError as exc:
        raise MoshiTTTError(f"cannot check what it holds ({exc.strerror or exc})", output) from None
    if head != PNG_SIGNATURE:
        raise MoshiTTTError("exists and is not a PNG figure; plot replaces only PNGs, choose another name", output)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def seconds(records: tp.Sequence[UpdateRecord]) -> list[float]:
    """When each update took effect, in seconds of the file (one token per 80 ms frame)."""
    return [r.token * SECONDS_PER_TOKEN for r in records]


def panels_of(files: tp.Sequence[FileResult]) -> list[str]:
    """The quantities drawn for these files: drift and update norms, inner loss if any has one."""
    has_loss = any(
        r.loss_before is not None
        for f in files
        for layer in f.ttt.layers  # type: ignore[union-attr]
        for r in layer.timeline or []
    )
    return ["drift", "update norm", *([LOSS_PANEL] if has_loss else [])]


def draw_layer(ax: tp.Any, panel: str, layer: LayerReport, color: tp.Any) -> None:
    """One layer's line(s) on one panel."""
    records = layer.timeline or []
    x = seconds(records)
    label = f"layer {layer.layer}"
    clipped = [r for r in records if r.clipped]
    if panel == "drift":
        ax.plot([0.0, *x], [0.0, *[r.drift for r in records]], color=color, label=label)
        ax.scatter(seconds(clipped), [r.drift for r in clipped], marker="x", color="red", zorder=3)
    elif panel == "update norm":
        ax.plot(x, [r.update_norm for r in records], color=color, marker=".", label=label)
        if any(r.update_norm_unclipped is not None for r in records):
            ax.plot(x, [r.update_norm_unclipped for r in records], color=color, linestyle="--", alpha=0.6)
        ax.scatter(seconds(clipped), [r.update_norm for r in clipped], marker="x", color="red", zorder=3)
    else:
        ax.plot(x, [r.loss_before for r in records], color=color, linestyle="--", alpha=0.7)
        ax.plot(x, [r.loss_after for r in records], color=color, label=label)
        if any(r.loss_initial is not None for r in records):  # l(W0; x): where TTT started from
            ax.plot(x, [r.loss_initial for r in records], color=color, linestyle=":", alpha=0.7)


def plot_reports(
    report: Path, output: Path, compare: Path | None = None, width: int = DEFAULT_WIDTH, height: int | None = None
) -> Path:
    """Draw `report` (and `compare` beside it) into the PNG `output`, `width` x `height` pixels
    (height default: PANEL_HEIGHT per panel). Returns `output`."""
    if width < 100 or (height is not None and height < 100):
        raise MoshiTTTError(f"the figure must be at least 100 x 100 pixels, got {width} x {height}")
    read = [(path, *read_report(path)) for path in [report, *([compare] if compare is not None else [])]]
    if any(f.scores is not None for _, _, files in read for f in files):  # `score` reports: NLL vs position
        from .score_plot import load_scored_report, plot_scores

        try:
            return plot_scores([load_scored_report(*entry) for entry in read], output, width, height)
        except OSError as exc:
            raise MoshiTTTError(f"cannot write the figure ({exc.strerror or exc})", output) from None
    columns = [load_timeline_report(report)] + ([load_timeline_report(compare)] if compare is not None else [])
    check_figure_path(Path(output), columns)
    names = list(dict.fromkeys(f.input for column in columns for f in column.files))
    panels = panels_of([f for column in columns for f in column.files])
    rows = len(names) * len(panels)
    height = height or max(PANEL_HEIGHT * rows + 80, 200)
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise MoshiTTTError("plotting needs matplotlib: pip install 'moshi-ttt[plot]'") from None

    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, len(columns), squeeze=False, sharex="row", sharey="row")
    colors = matplotlib.colormaps["tab10"]
    for c, column in enumerate(columns):
        by_input = {f.input: f for f in column.files}
        axes[0][c].set_title(column.label, fontsize="medium")
        for f_index, name in enumerate(names):
            result = by_input.get(name)
            for p_index, panel in enumerate(panels):
                ax = axes[f_index * len(panels) + p_index][c]
                ax.set_ylabel(panel, fontsize="small")
                ax.grid(alpha=0.3)
                if p_index == 0:
                    ax.text(0.01, 0.97, Path(name).name, transform=ax.transAxes, va="top", fontsize="small")
                if result is None or result.ttt is None:
                    ax.text(0.5, 0.5, "not in this report", transform=ax.transAxes, ha="center", alpha=0.6)
                    continue
                for l_index, layer in enumerate(result.ttt.layers):
                    draw_layer(ax, panel, layer, colors(l_index % 10))
                if not any(layer.timeline for layer in result.ttt.layers):
                    ax.text(0.5, 0.5, "no updates", transform=ax.transAxes, ha="center", alpha=0.6)
                elif p_index == 0:
                    ax.legend(fontsize="x-small", loc="lower right")
                if p_index == len(panels) - 1:
                    ax.set_xlabel("time in file (s)", fontsize="small")
    output = Path(output)
    try:
        figure.savefig(output, format="png", dpi=DPI)
    except OSError as exc:
        raise MoshiTTTError(f"cannot write the figure ({exc.strerror or exc})", output) from None
    return output
