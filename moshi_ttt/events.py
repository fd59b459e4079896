"""What a front end hears while a batch runs (progress bars, log lines): the protocol, and the
silent default. No torch here."""

from __future__ import annotations

import contextlib
import typing as tp
from pathlib import Path

if tp.TYPE_CHECKING:
    from .jobs.plan import Job
    from .report.schema import FileResult


class BatchEvents(tp.Protocol):
    """What a front end hears while a batch runs (progress bars, log lines)."""

    def __enter__(self) -> tp.Any: ...
    def __exit__(self, *exc: tp.Any) -> None: ...
    def loading(self, what: str) -> tp.ContextManager[tp.Any]: ...
    # Seconds of audio per job, from headers or the manifest (None where unknown before reading).
    def batch_started(self, durations: list[float | None]) -> None: ...
    # How many recordings stream at once, and why that many (--batch-size, or what auto chose).
    def batch_size_chosen(self, size: int, reason: str) -> None: ...
    # Files start and finish in any order when several stream at once; `index` says which.
    def file_started(self, index: int, total: int, job: Job, audio_s: float) -> None: ...
    def frames_done(self, index: int, done: int, total: int) -> None: ...
    def file_warning(self, job: Job, message: str) -> None: ...
    # One line about the run as a whole (e.g. existing outputs another model made), before files finish.
    def run_warning(self, message: str) -> None: ...
    def file_finished(self, index: int, total: int, result: FileResult) -> None: ...
    def report_failed(self, path: Path, reason: str) -> None: ...


class SilentEvents:
    """Hears nothing; also a context manager, like the front ends' event sinks."""

    def __enter__(self) -> SilentEvents:
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        pass

    def loading(self, what: str) -> tp.ContextManager[tp.Any]:
        return contextlib.nullcontext()

    def batch_started(self, durations: list[float | None]) -> None:
        pass

    def batch_size_chosen(self, size: int, reason: str) -> None:
        pass

    def file_started(self, index: int, total: int, job: Job, audio_s: float) -> None:
        pass

    def file_warning(self, job: Job, message: str) -> None:
        pass

    def run_warning(self, message: str) -> None:
        pass

    def frames_done(self, index: int, done: int, total: int) -> None:
        pass

    def file_finished(self, index: int, total: int, result: FileResult) -> None:
        pass

    def report_failed(self, path: Path, reason: str) -> None:
        pass


class ProgressBar(SilentEvents):
    """What a library run shows when its caller passes no events: one tqdm bar over the seconds of
    audio of the run (`tqdm.auto`, so it renders as a widget in notebooks), and warnings and failed
    files as lines above it."""

    def __init__(self, **tqdm_kwargs: tp.Any):
        self.tqdm_kwargs = {"unit": "s audio", "dynamic_ncols": True, **tqdm_kwargs}
        self.bar: tp.Any = None
        self.planned: list[float] = []
        self.done: dict[int, float] = {}  # seconds streamed so far, per file in flight or finished

    def __exit__(self, *exc: tp.Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def batch_started(self, durations: list[float | None]) -> None:
        from tqdm.auto import tqdm

        self.planned = [d or 0.0 for d in durations]
        self.bar = tqdm(total=round(sum(self.planned), 1), **self.tqdm_kwargs)

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.n = round(sum(self.done.values()), 1)
            self.bar.refresh()

    def frames_done(self, index: int, done: int, total: int) -> None:
        if total and index < len(self.planned):
            self.done[index] = self.planned[index] * done / total
            self._advance()

    def file_warning(self, job: Job, message: str) -> None:
        self._write(f"warning: {job.input}: {message}")

    def run_warning(self, message: str) -> None:
        self._write(f"warning: {message}")

    def file_finished(self, index: int, total: int, result: FileResult) -> None:
        if index < len(self.planned):
            self.done[index] = self.planned[index]
        self._advance()
        if result.status == "failed":
            self._write(f"failed: {result.input}: {result.reason}")

    def report_failed(self, path: Path, reason: str) -> None:
        self._write(f"error: {path}: {reason}")

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            import sys

            print(line, file=sys.stderr)
