"""The driver of a run: keeps existing outputs (with what earlier runs recorded of them), hands the
other jobs to a backend, and records every result as it arrives.

Recording a finished file costs the same however many files the run has: its entry is serialised
once and appended to the report's journal (`report/journal.py`: one line, kill -9 safe), and the
JSON report is rewritten whole (*compacted*) only when the time since the last rewrite exceeds
`COMPACT_RATIO` times what that rewrite took, and at the end. Rewrites then take at most about
1/COMPACT_RATIO of the run however large the report grows, and a small report is rewritten after
every file, as before. The report and its journal together always hold every finished file.

Each entry this run makes records what made it (`made_by`, see `report/provenance.py`). An
existing output that an earlier entry says another model or other output-changing settings made
is kept (and counted, and said in one warning) unless `redo_other` asks to redo such outputs.
"""

from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from ..errors import os_reason
from ..events import BatchEvents, SilentEvents
from ..report.history import EarlierResults, carried, stat_of
from ..report.journal import Journal
from ..report.provenance import difference, entry_origin, same_origin
from ..report.schema import FileResult, Report, RunSettings, entry_text
from .files import write_text
from .plan import Job

# The report is rewritten when the time since its last rewrite exceeds this many times what that
# rewrite took: rewrites cost at most ~2% of a run (see the module docstring).
COMPACT_RATIO = 50.0
OTHER_ORIGIN = "made by another model or settings"


class Backend(tp.Protocol):
    """What streams the jobs a run has to do: `FileWorker` in this process, or a distributed
    backend whose workers each run a `FileWorker`."""

    def results(
        self, jobs: list[tuple[int, Job]], total: int, events: BatchEvents
    ) -> tp.Iterator[tuple[int, FileResult]]:
        """Each job's result as soon as it is known (any order), keyed by its index in the plan
        of `total` jobs. A bad file gives a failed or skipped result, never an exception.
        `events` hears what the backend can tell of files in progress (starts, frames, warnings)."""
        ...


class BatchRunner:
    """Drives a run: keeps existing outputs (with their earlier results), hands the other jobs to
    a `Backend`, and records every result as it arrives; see the module docstring for the
    guarantees and the costs."""

    def __init__(
        self,
        backend: Backend,
        settings: RunSettings,
        report_path: Path | None = None,
        overwrite: bool = False,
        events: BatchEvents | None = None,
        earlier: EarlierResults | None = None,
        text_format: str = "txt",
        redo_other: bool = False,
        compact_ratio: float | None = None,
    ):
        self.backend = backend
        self.text_format = text_format
        self.report = Report(settings=settings)
        self.report_path = report_path
        self.overwrite = overwrite
        self.redo_other = redo_other
        self.compact_ratio = COMPACT_RATIO if compact_ratio is None else compact_ratio
        self.events: BatchEvents = events or SilentEvents()
        self.earlier = earlier or EarlierResults()
        # Why the last report (or journal) write failed; None once a report write succeeds again.
        self.report_error: str | None = None
        self.journal: Journal | None = None
        # Existing outputs kept although another model or other settings made them.
        self.made_by_other = 0
        self._others: list[dict] = []  # their origins, first seen first (for the warning)
        self._redone = 0
        self._done: dict[int, FileResult] = {}
        self._texts: dict[int, str] = {}
        self._earlier_texts: list[str] | None = None
        self._compacted_at = 0.0
        self._compact_cost = 0.0

    @property
    def made_by(self) -> dict | None:
        return self.report.settings.made_by

    def run(self, jobs: list[Job], keep: tp.Callable[[FileResult], bool] | None = None) -> Report:
        """`keep`: which earlier entries of files this run does not plan the report lists (all)."""
        start = time.perf_counter()
        self._compacted_at = start
        self.report.earlier = self.earlier.others(jobs, keep)

        def record(index: int, result: FileResult, fresh: bool) -> None:
            if fresh:
                self._stamp(result)
            self._done[index] = result
            self._texts[index] = text = entry_text(result)
            if fresh:
                self._append(text)
            self.report.wall_s = time.perf_counter() - start
            self._maybe_compact()
            self.events.file_finished(index, len(jobs), result)

        try:
            self._open_journal()
            kept: list[tuple[int, FileResult]] = []
            problems: list[tuple[int, FileResult]] = []
            todo: list[tuple[int, Job]] = []
            for index, job in enumerate(jobs):
                if job.problem is not None:  # known from the plan (e.g. a name too long): fails alone
                    problems.append((index, FileResult(str(job.input), None, "failed", job.problem)))
                    continue
                result = self._skip_existing(job) if not self.overwrite and job.output.exists() else None
                if result is None:
                    todo.append((index, job))
                else:
                    kept.append((index, result))
            streamed = {index for index, _ in todo}
            from .reader import probe_duration  # reads headers only; numpy is not for `--help`

            self.events.batch_started(
                [
                    (job.duration_hint if job.duration_hint is not None else probe_duration(job.input))
                    if index in streamed
                    else 0.0  # kept: nothing to stream (its header is not even read)
                    for index, job in enumerate(jobs)
                ]
            )
            self._say_others()
            for index, result in kept:
                record(index, result, fresh=False)
            for index, result in problems:
                record(index, result, fresh=True)
            if todo:
                results = self.backend.results(todo, len(jobs), self.events)
                try:
                    for index, result in results:
                        record(index, result, fresh=True)
                finally:  # interrupted between files: the backend drops its temporaries now
                    getattr(results, "close", lambda: None)()
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            self.report.wall_s = time.perf_counter() - start
            self._compact()
            if self.journal is not None:  # the report now holds every line, unless it could not be written
                self.journal.close(remove=self.report_error is None)
        return self.report

    # -- provenance ---------------------------------------------------------------------------------

    def _stamp(self, result: FileResult) -> None:
        """What this run made: its origin, and the output's stat beside its hash (see history)."""
        if result.made_by is None:
            result.made_by = entry_origin(self.made_by, self.report.settings)
        if result.status == "ok" and result.output and result.output_sha256 and result.output_stat is None:
            result.output_stat = stat_of(result.output)

    def _say_others(self) -> None:
        """One line for all the kept outputs another model made (or for those being redone)."""
        say = getattr(self.events, "run_warning", None)
        if say is None or self.made_by is None:
            return
        if self.made_by_other:
            n = self.made_by_other
            say(
                f"{n} existing output{'s were' if n != 1 else ' was'} {OTHER_ORIGIN} "
                f"({difference(self._others[0], self.made_by)}); kept, and the report says what made "
                f"{'each' if n != 1 else 'it'} (made_by): --redo-other redoes {'them' if n != 1 else 'it'}"
            )
        elif self._redone:
            n = self._redone
            say(
                f"redoing {n} existing output{'s' if n != 1 else ''} {OTHER_ORIGIN} "
                f"({difference(self._others[0], self.made_by)})"
            )

    # -- the report ---------------------------------------------------------------------------------

    def _open_journal(self) -> None:
        if self.report_path is None:
            return
        try:
            self.journal = Journal(self.report_path).open(self.earlier.journal_seq)
        except OSError as exc:  # said once; the run goes on, rewriting the report after each file
            self._failed(f"cannot write the report's journal: {exc.strerror or exc}")
            self.journal = None

    def _append(self, text: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(text)
        except OSError as exc:
            self._failed(f"cannot write the report's journal: {exc.strerror or exc}")

    def _maybe_compact(self) -> None:
        if self.report_path is None:
            return
        if self.journal is None or time.perf_counter() - self._compacted_at >= self.compact_ratio * self._compact_cost:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the report whole from the entries recorded so far (plan order, whatever order
        they finished in), then start the journal again. A report that cannot be written (disk
        full, folder gone) is said once, not fatal: the outputs still get made, the journal still
        holds them, and the next write may succeed."""
        begin = time.perf_counter()
        order = sorted(self._done)
        self.report.files = [self._done[i] for i in order]
        if self.report_path is None:
            return
        if self._earlier_texts is None:
            self._earlier_texts = [entry_text(f) for f in self.report.earlier]
        seq = self.journal.seq if self.journal is not None else None
        self.report.journal_seq = seq
        try:
            self.report.write(self.report_path, [self._texts[i] for i in order] + self._earlier_texts)
            if self.journal is not None and seq is not None:
                self.journal.compacted(seq)
        except OSError as exc:
            self._failed(f"cannot write the report: {exc.strerror or exc}")
        else:
            self.report_error = None
        end = time.perf_counter()
        self._compacted_at, self._compact_cost = end, end - begin

    def _failed(self, reason: str) -> None:
        if reason != self.report_error and self.report_path is not None:
            self.events.report_failed(self.report_path, reason)
        self.report_error = reason

    # -- existing outputs ---------------------------------------------------------------------------

    def _skip_existing(self, job: Job) -> FileResult | None:
        """The output exists: keep it, and keep what the run that wrote it recorded about it.
        None: redo it (`redo_other`, and an earlier entry says another model made it)."""
        try:
            earlier = self.earlier.for_output(job.output)
            notes = []
            if earlier is not None and not same_origin(earlier.made_by, self.made_by):
                self._others.append(tp.cast(dict, earlier.made_by))
                if self.redo_other:
                    self._redone += 1
                    return None
                self.made_by_other += 1
                said = difference(tp.cast(dict, earlier.made_by), tp.cast(dict, self.made_by))
                notes.append(f"{OTHER_ORIGIN}: {said}; --redo-other redoes it")
            if job.text_output is not None and not job.text_output.exists():
                if earlier is not None and earlier.transcript is not None and self.text_format == "txt":
                    write_text(job.text_output, earlier.transcript + "\n")
                    notes.insert(0, "transcript written from the earlier run's result")
                else:  # the report keeps the words, not their times
                    notes.insert(0, "its transcript needs recomputing: rerun with --overwrite")
            reason = "; ".join(["exists", *notes])
            if earlier is not None:
                return carried(earlier, reason)
            return FileResult(str(job.input), str(job.output), "skipped", reason)
        except OSError as exc:
            return FileResult(str(job.input), str(job.output), "failed", os_reason(exc))
