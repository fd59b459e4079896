"""The per-file worker every backend runs: reads recordings, streams them through a loaded model up
to its batch size at once, writes each output as it is produced, and describes each file."""

from __future__ import annotations

import collections
import time
import typing as tp
from dataclasses import dataclass

import numpy as np

from ..errors import AudioTooShortError, failure_reason, stops_the_run
from ..events import BatchEvents, SilentEvents
from ..report.schema import FileResult, FileTTT, sha256_of
from ..streaming.reference import StreamResult, timed_words_of, transcript_of
from ..streaming.transcripts import render_transcript
from .audio import SAMPLE_RATE, AudioWriter, read_recording, write_text
from .plan import Job

if tp.TYPE_CHECKING:
    from ..streaming.batched import BatchedRunner, StreamFailure


@dataclass
class _InFlight:
    """A file being streamed: its job, its output writer, and what is known of it so far."""

    job: Job
    writer: AudioWriter
    duration: float
    begin: float
    warnings: list[str]


class FileWorker:
    """A `driver.Backend` in this process. Runs jobs on one loaded model: reads each recording,
    streams up to the runner's batch size at once, writes each output block by block to a
    temporary renamed into place when complete, and describes each file in a `FileResult`. A local
    run and each Ray actor run this.

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
        runner: BatchedRunner,
        text_format: str = "txt",
        channel: int | str | None = None,
        batch_size_reason: str = "",
    ):
        self.runner = runner
        self.batch_size_reason = batch_size_reason  # how the runner's batch size was chosen
        self.text_format = text_format
        self.channel = channel  # see audio.pick_channel

    def results(
        self, jobs: list[tuple[int, Job]], total: int, events: BatchEvents | None = None
    ) -> tp.Iterator[tuple[int, FileResult]]:
        events = events or SilentEvents()
        pending = iter(jobs)
        known: collections.deque[tuple[int, FileResult]] = collections.deque()  # results not streamed
        flights: dict[int, _InFlight] = {}

        def failed(job: Job, exc: BaseException, duration: float = 0.0) -> FileResult:
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=duration)

        def recordings() -> tp.Iterator[tuple[int, np.ndarray]]:
            for index, job in pending:
                begin = time.perf_counter()
                duration = 0.0  # not known until it is read
                try:  # this file's boundary: reading, decoding, resampling, opening its output
                    recording = read_recording(job.input, self.channel)
                    duration = len(recording.pcm) / SAMPLE_RATE
                    writer = AudioWriter(job.output)
                except AudioTooShortError as exc:
                    known.append((index, FileResult(str(job.input), None, "skipped", exc.reason)))
                    continue
                except BaseException as exc:
                    if stops_the_run(exc):
                        raise
                    known.append((index, failed(job, exc, duration)))
                    continue
                flights[index] = _InFlight(job, writer, duration, begin, recording.warnings)
                events.file_started(index, total, job, duration)
                for warning in recording.warnings:
                    events.file_warning(job, warning)
                yield index, recording.pcm

        def write(index: int, block: np.ndarray) -> None:
            writer = flights[index].writer
            try:
                writer.write(block)
            except BaseException:  # disk full: its temporary goes now, and the runner frees its slot
                writer.abort()
                raise

        try:
            while True:
                stream = self.runner.run(recordings(), on_audio=write, progress=events.frames_done)
                try:
                    for index, streamed in stream:
                        yield from _drain(known)
                        yield index, self._finish(flights.pop(index), streamed)
                    yield from _drain(known)
                    return
                except BaseException as exc:
                    stream.close()  # streaming state left before anything else (a fresh batch)
                    if stops_the_run(exc):
                        raise
                    # The step that failed was every streaming file's: those fail, the rest go on.
                    for index, flight in flights.items():
                        flight.writer.abort()
                        known.append((index, failed(flight.job, exc, flight.duration)))
                    upcoming = None if flights else next(pending, None)
                    if upcoming is not None:  # the batch could not start: the next file fails, so the run moves on
                        batch = self.runner.batch_size
                        reason = f"streaming could not start at batch size {batch}: {failure_reason(exc)}"
                        known.append((upcoming[0], FileResult(str(upcoming[1].input), None, "failed", reason[:300])))
                    done = not flights and upcoming is None
                    flights.clear()
                yield from _drain(known)
                if done:
                    return
        finally:  # interrupted: no temporaries left behind
            for flight in flights.values():
                flight.writer.abort()

    def _finish(self, flight: _InFlight, streamed: StreamResult | StreamFailure) -> FileResult:
        job, model = flight.job, self.runner.model
        try:
            if not isinstance(streamed, StreamResult):  # its slot failed alone (write, TTT divergence)
                raise streamed.error
            model_ttt = model.describe_ttt()
            ttt = (
                None
                if model_ttt is None
                else FileTTT(model_ttt["variant"], model_ttt["chunk_size"], list(streamed.ttt_layers))
            )
            transcript = transcript_of(model, streamed.text_tokens)
            if job.text_output is not None:
                write_text(
                    job.text_output, render_transcript(self.text_format, transcript, timed_words_of(model, streamed))
                )
            flight.writer.commit()
            digest = sha256_of(job.output)
        except BaseException as exc:
            flight.writer.abort()
            if stops_the_run(exc):
                raise
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=flight.duration)
        return FileResult(
            str(job.input),
            str(job.output),
            "ok",
            None,
            duration_s=round(flight.duration, 4),
            frames=streamed.frames,
            steps=streamed.steps,
            wall_s=round(time.perf_counter() - flight.begin, 4),
            ttt=ttt,
            transcript=transcript,
            output_sha256=digest,
            warnings=flight.warnings,
        )


def _drain(known: collections.deque) -> tp.Iterator[tp.Any]:
    while known:
        yield known.popleft()
