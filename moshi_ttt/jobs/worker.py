"""The per-file worker every backend runs: reads recordings, streams them through a loaded model up
to its batch size at once, writes each output as it is produced, and describes each file. What is
done to a file (infer or score) is its job kind's (`kinds.py`); failures, ordering and cleanup are
the worker's, the same for both."""

from __future__ import annotations

import collections
import typing as tp

import numpy as np

from ..errors import AudioTooShortError, MoshiTTTError, failure_reason, os_reason
from ..events import BatchEvents, SilentEvents
from ..report.schema import FileResult
from .kinds import InferFiles, InFlight, ScoreFiles
from .plan import Job

if tp.TYPE_CHECKING:
    from ..streaming.batched import BatchedRunner

FileKind = InferFiles | ScoreFiles


class FileWorker:
    """A `driver.Backend` in this process. Runs jobs on one loaded model: reads each recording in
    blocks, streams up to the runner's batch size at once, writes each output (block by block for
    audio) to a temporary renamed into place when complete, and describes each file in a
    `FileResult`. A local run and each Ray actor run this, for `infer` and `score` jobs alike.

    A file that cannot be read or written fails alone, also part way through. A failure inside a
    batched step (e.g. out of memory) fails the files streaming at that moment, not the others:
    the worker starts a fresh batch for the files left.
    """

    def __init__(
        self,
        files: FileKind | BatchedRunner,
        text_format: str = "txt",
        channel: int | str | None = None,
        batch_size_reason: str = "",
    ):
        # A bare runner is an `infer` worker (what the tests and notebooks build most).
        self.files: FileKind = (
            files if isinstance(files, (InferFiles, ScoreFiles)) else InferFiles(files, text_format, channel)
        )
        self.batch_size_reason = batch_size_reason  # how the runner's batch size was chosen

    @property
    def runner(self) -> tp.Any:
        return self.files.runner

    @property
    def channel(self) -> int | str | None:
        return getattr(self.files, "channel", None)

    def results(
        self, jobs: list[tuple[int, Job]], total: int, events: BatchEvents | None = None
    ) -> tp.Iterator[tuple[int, FileResult]]:
        events = events or SilentEvents()
        pending = iter(jobs)
        known: collections.deque[tuple[int, FileResult]] = collections.deque()  # results not streamed
        flights: dict[int, InFlight] = {}

        def recordings() -> tp.Iterator[tuple[int, tp.Any]]:
            for index, job in pending:
                try:
                    flight, source = self.files.open(job)
                except AudioTooShortError as exc:
                    known.append((index, FileResult(str(job.input), None, "skipped", exc.reason)))
                    continue
                except (MoshiTTTError, OSError) as exc:
                    known.append((index, FileResult(str(job.input), None, "failed", failure_reason(exc))))
                    continue
                flights[index] = flight
                events.file_started(index, total, job, flight.planned_s)
                yield index, source

        def write(index: int, block: np.ndarray) -> None:
            flight = flights[index]
            if flight.error is None:
                try:
                    tp.cast(tp.Any, flight.writer).write(block)
                except OSError as exc:  # disk full: this file fails at its end, the others go on
                    flight.error = exc

        try:
            while True:
                try:
                    for index, streamed in self.files.stream(recordings(), write, events.frames_done):
                        yield from _drain(known)
                        yield index, self._finish(flights.pop(index), streamed, events)
                    yield from _drain(known)
                    return
                except (RuntimeError, ValueError, OSError) as exc:
                    # The step that failed was every streaming file's: those fail, the rest go on.
                    for index, flight in flights.items():
                        flight.abort()
                        known.append(
                            (
                                index,
                                FileResult(
                                    str(flight.job.input),
                                    None,
                                    "failed",
                                    os_reason(exc),
                                    duration_s=round(flight.read_s, 4),
                                ),
                            )
                        )
                    flights.clear()
                    yield from _drain(known)
        finally:  # interrupted: no temporaries left behind
            for flight in flights.values():
                flight.abort()

    def _finish(self, flight: InFlight, streamed: tp.Any, events: BatchEvents) -> FileResult:
        job = flight.job
        try:
            if flight.error is not None:  # read or written only in part
                raise flight.error
            result = self.files.finish(flight, streamed)
        except (MoshiTTTError, RuntimeError, ValueError, OSError) as exc:
            flight.abort()
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=round(flight.read_s, 4))
        for warning in result.warnings:
            events.file_warning(job, warning)
        return result


def _drain(known: collections.deque) -> tp.Iterator[tp.Any]:
    while known:
        yield known.popleft()
