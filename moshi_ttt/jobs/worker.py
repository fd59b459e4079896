"""The per-file worker every backend runs: reads recordings, streams them through a loaded model up
to its batch size at once, writes each output as it is produced, and describes each file. What is
done to a file (infer or score) is its job kind's (`kinds.py`); failures, ordering and cleanup are
the worker's, the same for both."""

from __future__ import annotations

import collections
import typing as tp

import numpy as np

from ..errors import AudioTooShortError, failure_reason, stops_the_run
from ..events import BatchEvents, SilentEvents
from ..report.schema import FileResult
from ..streaming.batched import StreamFailure
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

    Every failure stays in its file. Whatever goes wrong while one file is read, decoded,
    resampled, streamed (its TTT fast weights becoming NaN/Inf) or written, a Rust panic of a
    decoder or running out of memory included, is a failed entry with a one-line reason
    (`errors.failure_reason`) and the run goes on; only an interrupt or an exit stops it
    (`errors.stops_the_run`). A write that fails (disk full) deletes that file's temporary at once
    and frees its slot, so its space serves the next files. A failure inside a batched step (out of
    memory) fails the files streaming at that moment, not the others: the worker starts a fresh
    batch for the files left. A failure before any file streams (the batch's state cannot be
    allocated) fails the next file, so a run always moves on.
    """

    def __init__(
        self,
        files: FileKind | BatchedRunner,
        text_format: str = "txt",
        channel: int | str | None = None,
        batch_size_reason: str = "",
    ):
        # A bare runner is an `infer` worker (what tests and notebooks build most).
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

        def failed(job: Job, exc: BaseException, duration: float = 0.0) -> FileResult:
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=round(duration, 4))

        def recordings() -> tp.Iterator[tuple[int, tp.Any]]:
            for index, job in pending:
                try:  # this file's boundary: its header, its first frames, its output
                    flight, source = self.files.open(job)
                except AudioTooShortError as exc:
                    known.append((index, FileResult(str(job.input), None, "skipped", exc.reason)))
                    continue
                except BaseException as exc:
                    if stops_the_run(exc):
                        raise
                    known.append((index, failed(job, exc)))
                    continue
                flights[index] = flight
                events.file_started(index, total, job, flight.planned_s)
                yield index, source

        def write(index: int, block: np.ndarray) -> None:
            writer = tp.cast(tp.Any, flights[index].writer)
            try:
                writer.write(block)
            except BaseException:  # disk full: its temporary goes now, and the runner frees its slot
                writer.abort()
                raise

        done = False
        try:
            while not done:
                stream = self.files.stream(recordings(), write, events.frames_done)
                try:
                    for index, streamed in stream:
                        yield from _drain(known)
                        yield index, self._finish(flights.pop(index), streamed, events)
                    done = True
                except BaseException as exc:
                    stream.close()  # streaming state left before anything else (a fresh batch)
                    if stops_the_run(exc):
                        raise
                    # The step that failed was every streaming file's: those fail, the rest go on.
                    for index, flight in flights.items():
                        flight.abort()
                        known.append((index, failed(flight.job, exc, flight.read_s)))
                    upcoming = None if flights else next(pending, None)
                    if upcoming is not None:  # the batch could not start: the next file fails, so the run moves on
                        reason = f"streaming could not start at batch size {self.runner.batch_size}: "
                        failure = FileResult(
                            str(upcoming[1].input), None, "failed", (reason + failure_reason(exc))[:300]
                        )
                        known.append((upcoming[0], failure))
                    done = not flights and upcoming is None
                    flights.clear()
                yield from _drain(known)
        finally:  # interrupted: no temporaries left behind
            for flight in flights.values():
                flight.abort()

    def _finish(self, flight: InFlight, streamed: tp.Any, events: BatchEvents) -> FileResult:
        job = flight.job
        try:
            if isinstance(streamed, StreamFailure):  # its slot failed alone (write, TTT divergence)
                raise streamed.error
            if flight.error is not None:  # read only in part (a decode error mid-file)
                raise flight.error
            result = self.files.finish(flight, streamed)
        except BaseException as exc:
            flight.abort()
            if stops_the_run(exc):
                raise
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=round(flight.read_s, 4))
        for warning in result.warnings:
            events.file_warning(job, warning)
        return result


def _drain(known: collections.deque) -> tp.Iterator[tp.Any]:
    while known:
        yield known.popleft()
