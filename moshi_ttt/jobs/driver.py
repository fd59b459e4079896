"""The driver of a run: keeps existing outputs (with what earlier runs recorded of them), hands the
other jobs to a backend, and records every result in the report as it arrives."""

from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from ..errors import os_reason
from ..events import BatchEvents, SilentEvents
from ..report.history import EarlierResults, carried
from ..report.schema import FileResult, Report, RunSettings
from .files import write_text
from .plan import Job


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
    a `Backend`, and records every result in the report as it arrives; see the module docstring
    for the guarantees."""

    def __init__(
        self,
        backend: Backend,
        settings: RunSettings,
        report_path: Path | None = None,
        overwrite: bool = False,
        events: BatchEvents | None = None,
        earlier: EarlierResults | None = None,
        text_format: str = "txt",
    ):
        self.backend = backend
        self.text_format = text_format
        self.report = Report(settings=settings)
        self.report_path = report_path
        self.overwrite = overwrite
        self.events: BatchEvents = events or SilentEvents()
        self.earlier = earlier or EarlierResults()
        # Why the last report write failed; None once a write succeeds again.
        self.report_error: str | None = None

    def run(self, jobs: list[Job], keep: tp.Callable[[FileResult], bool] | None = None) -> Report:
        """`keep`: which earlier entries of files this run does not plan the report lists (all)."""
        start = time.perf_counter()
        self.report.earlier = self.earlier.others(jobs, keep)
        from .reader import probe_duration  # reads headers only; numpy is not for `--help`

        self.events.batch_started(
            [job.duration_hint if job.duration_hint is not None else probe_duration(job.input) for job in jobs]
        )
        done: dict[int, FileResult] = {}

        def record(index: int, result: FileResult) -> None:
            done[index] = result
            self.report.files = [done[i] for i in sorted(done)]  # plan order, whatever finished first
            self.report.wall_s = time.perf_counter() - start
            self._save()
            self.events.file_finished(index, len(jobs), result)

        try:
            todo = []
            for index, job in enumerate(jobs):
                if job.problem is not None:  # known from the plan (e.g. a name too long): fails alone
                    record(index, FileResult(str(job.input), None, "failed", job.problem))
                elif job.output.exists() and not self.overwrite:
                    record(index, self._skip_existing(job))
                else:
                    todo.append((index, job))
            if todo:
                results = self.backend.results(todo, len(jobs), self.events)
                try:
                    for index, result in results:
                        record(index, result)
                finally:  # interrupted between files: the backend drops its temporaries now
                    getattr(results, "close", lambda: None)()
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            self.report.wall_s = time.perf_counter() - start
            self._save()
        return self.report

    def _save(self) -> None:
        """A report that cannot be written (disk full, folder gone) is said once, not fatal:
        the outputs still get made, and the next write may succeed."""
        if self.report_path is None:
            return
        try:
            self.report.write(self.report_path)
        except OSError as exc:
            reason = f"cannot write the report: {exc.strerror or exc}"
            if reason != self.report_error:
                self.events.report_failed(self.report_path, reason)
            self.report_error = reason
        else:
            self.report_error = None

    def _skip_existing(self, job: Job) -> FileResult:
        """The output exists: keep it, and keep what the run that wrote it recorded about it."""
        try:
            earlier = self.earlier.for_output(job.output)
            result = (
                carried(earlier, "exists")
                if earlier
                else FileResult(str(job.input), str(job.output), "skipped", "exists")
            )
            if job.text_output is not None and not job.text_output.exists():
                if result.transcript is not None and self.text_format == "txt":
                    write_text(job.text_output, result.transcript + "\n")
                    result.reason = "exists; transcript written from the earlier run's result"
                else:  # the report keeps the words, not their times
                    result.reason = "exists; its transcript needs recomputing: rerun with --overwrite"
            return result
        except OSError as exc:
            return FileResult(str(job.input), str(job.output), "failed", os_reason(exc))
