"""Rich rendering for the CLI: progress, per-file TTT tables, the run summary, inspect output."""

from __future__ import annotations

import contextlib
import os
import sys
import typing as tp
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from moshi_ttt.errors import printable
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.plan import Job
from moshi_ttt.report.schema import FileResult, Report

STATUS_STYLE = {"ok": "green", "failed": "bold red", "skipped": "yellow"}


def reopen_closed_standard_streams() -> None:
    """A standard stream started closed (`>&-`, `2>&-`): Python leaves it None, and the next file
    opened would take its descriptor, where any library's stray print would land. Point it at
    /dev/null instead, so output to it is simply dropped."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:
            with contextlib.suppress(OSError):
                os.fstat(fd)
                continue  # the descriptor is open (someone else set the stream None): leave it
            devnull = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


class SafeStream:
    """`sys.stdout` or `sys.stderr` (looked up at every write, so a test runner's capture is seen)
    for a console whose reader may go away: `moshi-ttt infer ... | head -1`, `--json | true`, a
    closed terminal, a full disk. A write or flush that fails drops that text and every later
    one (the stream's descriptor is pointed at /dev/null, so neither we nor the interpreter's
    flush at exit ever fail on it again) and never reaches the run: progress and tables just
    stop, the batch goes on, and the exit code still speaks of files only."""

    def __init__(self, name: str):
        self.name = name
        self.broken = False

    @property
    def stream(self) -> tp.TextIO:
        return getattr(sys, self.name)

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self._give_up()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._give_up()

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> tp.Any:
        return getattr(self.stream, name)

    def _give_up(self) -> None:
        self.broken = True
        silence(self.stream)


def silence(stream: tp.Any) -> None:
    """Point `stream`'s descriptor at /dev/null, so what is still buffered (and any later write
    by anyone) goes nowhere instead of failing at exit (Python's advice for a closed pipe)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def settle_streams() -> None:
    """Flush stdout and stderr before the interpreter does, silencing a stream whose reader is gone."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.flush()
        except (OSError, ValueError):
            silence(stream)


def shown(path: tp.Any) -> str:
    """A path as rich markup that prints it literally: control characters escaped (a newline or a
    terminal escape code in a file name must not break lines or drive the terminal), markup escaped."""
    return escape(printable(str(path)))


def ttt_table(result: FileResult) -> Table:
    table = Table(title=f"TTT layers: {shown(Path(result.input).name)}", title_justify="left")
    for column in ("layer", "tokens", "updates", "clipped", "pending", "||W0||", "||W_final||", "drift", "rel. drift"):
        table.add_column(column, justify="right")
    assert result.ttt is not None
    for layer in result.ttt.layers:
        table.add_row(
            str(layer.layer),
            str(layer.tokens),
            str(layer.updates),
            _clipped(layer.clipped_updates, layer.updates),
            str(layer.pending_tokens),
            f"{layer.norm_initial:.4g}",
            f"{layer.norm_final:.4g}",
            _number(layer.drift, "{:.4g}"),
            _number(layer.relative_drift, "{:.3%}"),
        )
    return table


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _clipped(clipped: int, updates: int) -> str:
    """Clip events, highlighted when clipping decides most updates (then tau, not the data, sets
    how far the weights move)."""
    text = str(clipped)
    return f"[bold yellow]{text}[/]" if updates and clipped * 2 > updates else text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


EXISTS = "exists"  # the reason a file is skipped when its output is there (batch._skip_existing)


def _line(result: FileResult) -> str:
    text = f"[{STATUS_STYLE[result.status]}]{result.status}[/] {shown(result.input)}"
    if result.status == "skipped" and result.output and (result.reason or "").startswith(EXISTS):
        # Say which output, and how to redo it.
        rest = tp.cast(str, result.reason)[len(EXISTS) :]
        redo = "" if "--redo-other" in rest else " (--overwrite redoes it)"
        text += f": {shown(result.output)} exists{shown(rest)}{redo}"
    elif result.reason:
        text += f": {shown(result.reason)}"
    elif result.status == "ok":
        text += f" -> {shown(result.output)} ({result.duration_s:.1f} s audio in {result.wall_s:.2f} s)"
    return text


class RichEvents:
    """Two bars (files, audio seconds) with ETA and the current file on a terminal; plain log
    lines otherwise. Per-file results print above the bars."""

    def __init__(self, console: Console, details: bool | None, errors: Console | None = None):
        self.console = console
        self.errors = errors or console
        self.details = details  # None: a per-layer table only when the run has a single file
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not self.live,
        )
        self.files_task = self.progress.add_task("files", total=None)
        self.audio_task = self.progress.add_task("audio s", total=None)
        self._audio_base = 0.0  # seconds of audio streamed in finished files
        # Files streaming now (several with --batch-size): index -> (seconds, share done).
        self._streaming: dict[int, tuple[float, float]] = {}
        self._finished = 0
        # Each job's seconds as planned (headers, manifest), corrected as files are read: the
        # audio bar's total, so it shows an ETA from the audio processed so far.
        self._planned: list[float | None] = []
        self._planned_total = 0.0

    def __enter__(self) -> RichEvents:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.progress.__exit__(*exc)

    def loading(self, what: str) -> tp.ContextManager[tp.Any]:
        return self.errors.status(f"loading {shown(what)}")

    def batch_started(self, durations: list[float | None]) -> None:
        self._planned = list(durations)
        self._planned_total = sum(d for d in self._planned if d is not None)
        self.progress.update(self.audio_task, total=round(self._planned_total, 1))

    def _set_planned(self, index: int, seconds: float) -> None:
        if index < len(self._planned):  # the total kept up to date, not summed again (10,000 files)
            self._planned_total += seconds - (self._planned[index] or 0.0)
            self._planned[index] = seconds
            self.progress.update(self.audio_task, total=round(self._planned_total, 1))

    def file_started(self, index: int, total: int, job: Job, audio_s: float) -> None:
        if self.details is None:
            self.details = total == 1
        self._streaming[index] = (audio_s, 0.0)
        self._set_planned(index, audio_s)  # the header's estimate, or unknown until read
        self.progress.update(
            self.files_task, total=total, completed=self._finished, description=f"files: {shown(job.input.name)}"
        )
        if not self.live:
            self.console.print(
                f"[{index + 1}/{total}] {shown(job.input)} ({audio_s:.1f} s)", highlight=False, soft_wrap=True
            )

    def batch_size_chosen(self, size: int, reason: str) -> None:
        if size > 1:
            self.errors.print(f"streaming {size} files at once ({reason})", highlight=False)

    def frames_done(self, index: int, done: int, total: int) -> None:
        if index in self._streaming:
            self._streaming[index] = (self._streaming[index][0], done / max(total, 1))
        if self.live:
            streaming = sum(seconds * share for seconds, share in self._streaming.values())
            self.progress.update(self.audio_task, completed=round(self._audio_base + streaming, 1))

    def file_warning(self, job: Job, message: str) -> None:
        _warn(self.errors, job, message)

    def run_warning(self, message: str) -> None:
        _warn_run(self.errors, message)

    def file_finished(self, index: int, total: int, result: FileResult) -> None:
        self._streaming.pop(index, None)
        self._finished += 1
        if result.status == "ok" and not result.from_earlier_run:
            self._audio_base += result.duration_s
        else:  # nothing streamed: out of the total, so the ETA counts only audio to process
            self._set_planned(index, 0.0)
        if self.live:
            self.progress.update(self.audio_task, completed=round(self._audio_base, 1))
        self.progress.update(self.files_task, total=total, completed=self._finished)
        # Without a terminal, one log line per file however long its paths (no wrapping at 80 columns).
        self.console.print(_line(result), highlight=False, soft_wrap=not self.live)
        if self.details and result.ttt is not None and not result.from_earlier_run:
            self.console.print(ttt_table(result))

    def report_failed(self, path: Path, reason: str) -> None:
        _report_failed(self.errors, path, reason)


def _warn(errors: Console, job: Job, message: str) -> None:
    errors.print(f"[yellow]warning:[/] {shown(job.input)}: {shown(message)}", highlight=False, soft_wrap=True)


def _warn_run(errors: Console, message: str) -> None:
    errors.print(f"[yellow]warning:[/] {shown(message)}", highlight=False, soft_wrap=True)


def _report_failed(errors: Console, path: Path, reason: str) -> None:
    errors.print(
        f"[bold red]error:[/] {shown(path)}: {shown(reason)}; the run goes on", highlight=False, soft_wrap=True
    )


class QuietEvents(SilentEvents):
    """--quiet: no progress or tables, but a failed file still gets its one line on stderr."""

    def __init__(self, errors: Console):
        self.errors = errors

    def file_finished(self, index: int, total: int, result: FileResult) -> None:
        if result.status == "failed":
            self.errors.print(_line(result), highlight=False, soft_wrap=True)

    def file_warning(self, job: Job, message: str) -> None:
        _warn(self.errors, job, message)

    def run_warning(self, message: str) -> None:
        _warn_run(self.errors, message)

    def report_failed(self, path: Path, reason: str) -> None:
        _report_failed(self.errors, path, reason)


def make_events(console: Console, errors: Console, quiet: bool, details: bool | None) -> tp.Any:
    return QuietEvents(errors) if quiet else RichEvents(console, details, errors)


SUMMARY_ROWS = 50  # a run of 10,000 files gets a table of this many rows, not 10,000


def rows_of(files: list[FileResult]) -> list[FileResult]:
    """The files the summary table shows: all of them up to SUMMARY_ROWS; beyond that the failed
    ones, then those made by another model, then the others, in report order within each."""
    if len(files) <= SUMMARY_ROWS:
        return files
    rank = {id(f): 0 if f.status == "failed" else 1 if "--redo-other" in (f.reason or "") else 2 for f in files}
    chosen = {id(f) for f in sorted(files, key=lambda f: rank[id(f)])[:SUMMARY_ROWS]}
    return [f for f in files if id(f) in chosen]


def summary(console: Console, report: Report, report_path: Path | None) -> None:
    table = Table(title="moshi-ttt run", title_justify="left")
    for column, justify in (
        ("file", "left"),
        ("status", "left"),
        ("audio s", "right"),
        ("updates", "right"),
        ("clipped", "right"),
        ("max rel. drift", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    files = report.all_files()
    shown_files = rows_of(files)
    if len(shown_files) < len(files):
        table.caption = (
            f"{len(shown_files)} of {len(files)} files (failed and foreign ones first): all are in the report"
        )
        table.caption_justify = "left"
    for result in shown_files:
        layers = result.ttt.layers if result.ttt is not None else []
        n_updates = sum(layer.updates for layer in layers)
        updates = str(n_updates) if layers else "-"
        clipped = _clipped(sum(layer.clipped_updates for layer in layers), n_updates) if layers else "-"
        drifts = [layer.relative_drift for layer in layers if layer.relative_drift is not None]
        drift = f"{max(drifts):.3%}" if drifts else "-"
        note = (result.reason or "") + (" (numbers from an earlier run)" if result.from_earlier_run else "")
        table.add_row(
            shown(Path(result.input).name),
            f"[{STATUS_STYLE[result.status]}]{result.status}[/]",
            f"{result.duration_s:.1f}",
            updates,
            clipped,
            drift,
            shown(note),
        )
    console.print(table)
    t = report.totals()
    console.print(
        f"{plural(t['files'], 'file')}: [green]{t['ok']} ok[/], [red]{t['failed']} failed[/], "
        f"[yellow]{t['skipped']} skipped[/]; {t['audio_s']:.1f} s of audio in {t['wall_s']:.1f} s "
        f"(real-time factor {t['real_time_factor']:.3f})",
        highlight=False,
    )
    if t.get("made_by_other"):
        console.print(
            f"[yellow]{plural(t['made_by_other'], 'output')} made by another model or settings[/] "
            "(the report's made_by says which; --redo-other redoes them)",
            highlight=False,
        )
    if report_path is not None:
        console.print(f"report: {shown(report_path)}", highlight=False, soft_wrap=True)


SHARD_STATE_STYLE = {
    "complete": "green",
    "missing": "bold red",
    "running": "yellow",
    "interrupted": "bold red",
    "unfinished": "bold red",
}
SHARD_STATE_NOTE = {
    "missing": "no report part: this shard never ran (or wrote elsewhere)",
    "running": "its run holds the shard's lock now: merge again when it ends",
    "interrupted": "stopped by a signal: rerun this shard to finish it",
    "unfinished": "stopped short of its files (killed?): rerun this shard to finish it",
}


def merge_summary(console: Console, errors: Console, outcome: tp.Any) -> None:
    """`report merge`: one row per shard, then the merged totals; what to rerun on stderr."""
    table = Table(title="shards", title_justify="left")
    for column, justify in (
        ("shard", "left"),
        ("state", "left"),
        ("files", "right"),
        ("planned", "right"),
        ("part", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for state in outcome.shards:
        table.add_row(
            str(state.shard),
            f"[{SHARD_STATE_STYLE[state.state]}]{state.state}[/]",
            str(state.files),
            "-" if state.planned is None else str(state.planned),
            "-" if state.path is None else shown(state.path.name),
        )
    console.print(table)
    t = outcome.report.totals()
    console.print(
        f"merged {plural(t['files'], 'file')}: [green]{t['ok']} ok[/], [red]{t['failed']} failed[/], "
        f"[yellow]{t['skipped']} skipped[/]; {t['audio_s']:.1f} s of audio in {t['wall_s']:.1f} s of "
        f"processing",
        highlight=False,
    )
    console.print(f"report: {shown(outcome.path)}", highlight=False, soft_wrap=True)
    if outcome.origins:
        errors.print(
            f"[yellow]warning:[/] merged outputs made by {len(outcome.origins)} different models or settings "
            "(--mixed): each entry's made_by says which; the report's settings list them (mixed_origins)",
            highlight=False,
            soft_wrap=True,
        )
    for key in outcome.differing_settings:
        errors.print(
            f"[yellow]warning:[/] the shards ran with different settings.{shown(key)}; the report keeps "
            "the newest part's",
            highlight=False,
            soft_wrap=True,
        )
    for state in outcome.incomplete:
        errors.print(
            f"[yellow]warning:[/] shard {state.shard} {state.state}: {SHARD_STATE_NOTE[state.state]}",
            highlight=False,
            soft_wrap=True,
        )


def json_summary(console: Console, report: Report, report_path: Path | None, exit_code: int) -> None:
    """`--json`: the run's totals, report path and exit code as one JSON line on stdout."""
    import json

    line = json.dumps(
        {
            "totals": report.totals(),
            "report": None if report_path is None else str(report_path),
            "exit_code": exit_code,
            "interrupted": report.interrupted,
        },
        allow_nan=False,
    )
    console.file.write(line + "\n")
    console.file.flush()


def inspection(console: Console, info: tp.Any) -> None:
    table = Table(title=f"TTT fine-tune: {info.finetune.folder}", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    if info.finetune.ttt is None:
        table.add_row("TTT", "disabled in this checkpoint")
    for key, value in info.settings.items():
        table.add_row(str(key), str(value))
    table.add_row("weights", str(info.finetune.weights))
    if info.num_layers is not None and info.finetune.ttt is not None:
        marks = "".join("T" if i in info.finetune.ttt.layers else "." for i in range(info.num_layers))
        table.add_row("layer map", marks + "  (T = TTT layer)")
    for layer, count in sorted(info.tensors_per_layer.items()):
        table.add_row(f"layer {layer} TTT params", f"{count:,}")
    if info.other_tensors:
        table.add_row("other params in file", f"{info.other_tensors:,}")
    total = sum(info.tensors_per_layer.values())
    table.add_row("TTT params total", f"{total:,}")
    if info.base_parameters is not None:
        table.add_row("base LM params", f"{info.base_parameters:,}")
    console.print(table)


def _nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def score_summary(console: Console, report: Report, report_path: Path | None) -> None:
    """A `score` run: per file its NLL (nats) and weighted loss, then per position bucket the
    pooled NLL, with the attention window's edge marked."""
    table = Table(title="moshi-ttt score (NLL in nats)", title_justify="left")
    for column, justify in (
        ("file", "left"),
        ("status", "left"),
        ("s", "right"),
        ("audio", "right"),
        ("cb0", "right"),
        ("text", "right"),
        ("loss", "right"),
        ("updates", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for result in report.all_files():
        scores = result.scores
        layers = result.ttt.layers if result.ttt is not None else []
        note = (result.reason or "") + (" (numbers from an earlier run)" if result.from_earlier_run else "")
        table.add_row(
            shown(Path(result.input).name),
            f"[{STATUS_STYLE[result.status]}]{result.status}[/]",
            f"{result.duration_s:.1f}",
            _nats(scores.nll.get("audio")) if scores else "-",
            _nats(scores.nll.get("cb0")) if scores else "-",
            _nats(scores.nll.get("text")) if scores else "-",
            _nats(
                scores.weighted_loss.loss if scores.weighted_loss.loss is not None else scores.weighted_loss.audio_loss
            )
            if scores
            else "-",
            str(sum(layer.updates for layer in layers)) if layers else "-",
            shown(note),
        )
    console.print(table)
    totals = report.totals()
    pooled = totals.get("scores")
    if pooled:
        context_s = (report.settings.score or {}).get("context_s")
        has_text = any("text" in b["count"] for b in pooled["buckets"])
        buckets = Table(title="NLL by position (nats, all files pooled)", title_justify="left")
        for column in ("from s", "to s", "audio NLL", "cb0 NLL", *(["text NLL"] if has_text else []), "targets"):
            buckets.add_column(column, justify="right")
        marked = False
        for bucket in pooled["buckets"]:
            past = context_s is not None and bucket["start_s"] >= context_s
            if past and not marked:
                buckets.add_section()
                buckets.add_row(f"[bold]attention window ends at {context_s:g} s[/]", *[""] * (4 + has_text))
                marked = True
            nll = bucket["nll"]
            buckets.add_row(
                f"{bucket['start_s']:g}",
                f"{bucket['end_s']:g}",
                _nats(nll.get("audio")),
                _nats(nll.get("cb0")),
                *([_nats(nll.get("text"))] if has_text else []),
                str(bucket["count"].get("audio", 0)),
            )
        console.print(buckets)
        ppl = pooled["perplexity"].get("audio")
        console.print(
            f"audio: NLL {_nats(pooled['nll'].get('audio'))} nats over {pooled['count'].get('audio', 0)} "
            f"targets (perplexity {'-' if ppl is None else f'{ppl:.2f}'})",
            highlight=False,
        )
    console.print(
        f"{plural(totals['files'], 'file')}: [green]{totals['ok']} ok[/], [red]{totals['failed']} failed[/], "
        f"[yellow]{totals['skipped']} skipped[/]; {totals['audio_s']:.1f} s of audio in {totals['wall_s']:.1f} s",
        highlight=False,
    )
    if report_path is not None:
        console.print(f"report: {shown(report_path)}", highlight=False, soft_wrap=True)
