"""The per-file worker every backend runs: reads recordings, streams them through a loaded model up
to its batch size at once, writes each output as it is produced, and describes each file."""

from __future__ import annotations

import collections
import time
import typing as tp
from dataclasses import dataclass

import numpy as np

from ..errors import AudioTooShortError, MoshiTTTError, failure_reason, os_reason
from ..events import BatchEvents, SilentEvents
from ..report.schema import FileResult, FileTTT, sha256_of
from ..streaming.reference import StreamResult, timed_words_of, transcript_of
from ..streaming.transcripts import render_transcript
from .audio import SAMPLE_RATE, AudioWriter, read_recording, write_text
from .plan import Job

if tp.TYPE_CHECKING:
    from ..streaming.batched import BatchedRunner


@dataclass
class _InFlight:
    """A file being streamed: its job, its output writer, and what is known of it so far."""

    job: Job
    writer: AudioWriter
    duration: float
    begin: float
    warnings: list[str]
    error: Exception | None = None  # the output could not be written; the file fails at its end


class FileWorker:
    """A `driver.Backend` in this process. Runs jobs on one loaded model: reads each recording,
    streams up to the runner's batch size at once, writes each output block by block to a
    temporary renamed into place when complete, and describes each file in a `FileResult`. A local
    run and each Ray actor run this.

    A file that cannot be read or written fails alone. A failure inside a batched step (e.g. out
    of memory) fails the files streaming at that moment, not the others: the worker starts a
    fresh batch for the files left.
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

        def recordings() -> tp.Iterator[tuple[int, np.ndarray]]:
            for index, job in pending:
                begin = time.perf_counter()
                try:
                    recording = read_recording(job.input, self.channel)
                except AudioTooShortError as exc:
                    known.append((index, FileResult(str(job.input), None, "skipped", exc.reason)))
                    continue
                except MoshiTTTError as exc:
                    known.append((index, FileResult(str(job.input), None, "failed", exc.reason)))
                    continue
                duration = len(recording.pcm) / SAMPLE_RATE
                try:
                    writer = AudioWriter(job.output)
                except (MoshiTTTError, OSError) as exc:
                    known.append(
                        (index, FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=duration))
                    )
                    continue
                flights[index] = _InFlight(job, writer, duration, begin, recording.warnings)
                events.file_started(index, total, job, duration)
                for warning in recording.warnings:
                    events.file_warning(job, warning)
                yield index, recording.pcm

        def write(index: int, block: np.ndarray) -> None:
            flight = flights[index]
            if flight.error is None:
                try:
                    flight.writer.write(block)
                except OSError as exc:  # disk full: this file fails at its end, the others go on
                    flight.error = exc

        try:
            while True:
                try:
                    for index, streamed in self.runner.run(recordings(), on_audio=write, progress=events.frames_done):
                        yield from _drain(known)
                        yield index, self._finish(flights.pop(index), streamed)
                    yield from _drain(known)
                    return
                except (RuntimeError, ValueError, OSError) as exc:
                    # The step that failed was every streaming file's: those fail, the rest go on.
                    for index, flight in flights.items():
                        flight.writer.abort()
                        known.append(
                            (
                                index,
                                FileResult(
                                    str(flight.job.input), None, "failed", os_reason(exc), duration_s=flight.duration
                                ),
                            )
                        )
                    flights.clear()
                    yield from _drain(known)
        finally:  # interrupted: no temporaries left behind
            for flight in flights.values():
                flight.writer.abort()

    def _finish(self, flight: _InFlight, streamed: StreamResult) -> FileResult:
        job, model = flight.job, self.runner.model
        try:
            if flight.error is not None:
                raise flight.error
            transcript = transcript_of(model, streamed.text_tokens)
            if job.text_output is not None:
                write_text(
                    job.text_output, render_transcript(self.text_format, transcript, timed_words_of(model, streamed))
                )
            flight.writer.commit()
            digest = sha256_of(job.output)
        except (MoshiTTTError, RuntimeError, ValueError, OSError) as exc:
            flight.writer.abort()
            return FileResult(str(job.input), None, "failed", failure_reason(exc), duration_s=flight.duration)
        model_ttt = model.describe_ttt()
        ttt = (
            None
            if model_ttt is None
            else FileTTT(model_ttt["variant"], model_ttt["chunk_size"], list(streamed.ttt_layers))
        )
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
