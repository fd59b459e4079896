"""The two kinds of job the worker runs on a file: `infer` (stream it, write what Moshi says back)
and `score` (teacher-force it, write the loss of every token). Both read the recording in blocks
(`reader.RecordingReader`), hand the runner one frame per step, and describe the file in a
`FileResult`; they differ in what they read (one channel, or every channel and an alignment),
which runner streams (`streaming.batched.BatchedRunner` or `streaming.score_runner.ScoreRunner`)
and what they write. `worker.FileWorker` drives either, with the same failure boundary,
resume and report.
"""

from __future__ import annotations

import itertools
import time
import typing as tp
from dataclasses import dataclass

import numpy as np

from ..errors import stops_the_run
from ..report.schema import FileResult, FileTTT, sha256_of
from ..report.scores import summarize
from ..streaming.reference import Frames, StreamResult, timed_words_of, transcript_of
from ..streaming.transcripts import render_transcript
from .alignments import alignment_path, read_alignments, text_row_for
from .audio import AudioWriter
from .files import FRAME_SIZE, SAMPLE_RATE, atomic_output, write_text
from .plan import Job
from .reader import RecordingReader

if tp.TYPE_CHECKING:
    from ..streaming.batched import BatchedRunner
    from ..streaming.score_runner import ScoredFile, ScoreRunner

FrameProgressFn = tp.Callable[[tp.Any, int, int], None]


@dataclass
class InFlight:
    """A file being streamed: its job, its reader, its output sink (infer), and what is known of
    it so far. A read or write that fails part way is kept in `error`: the file ends early and
    fails at its end, alone."""

    job: Job
    reader: RecordingReader
    expected_frames: int  # from the header (progress, the text row's length)
    begin: float
    writer: AudioWriter | None = None
    error: BaseException | None = None

    @property
    def planned_s(self) -> float:
        """Seconds at 24 kHz its header promises (progress before it is read)."""
        return (self.reader.header.samples_24k or 0) / SAMPLE_RATE

    @property
    def read_s(self) -> float:
        """Seconds at 24 kHz read so far: the recording's length once it is done."""
        return self.reader.samples / SAMPLE_RATE

    def frames(self) -> tp.Iterator[np.ndarray]:
        """The recording's frames; a read failing part way ends them and marks the file failed."""
        source = self.reader.frames()
        try:
            first = next(source)  # AudioTooShortError here: the file is skipped when it is opened
        except StopIteration:
            return iter(())
        return self._guarded(itertools.chain([first], source))

    def _guarded(self, source: tp.Iterator[np.ndarray]) -> tp.Iterator[np.ndarray]:
        try:
            yield from source
        except BaseException as exc:  # a decode error mid-file: this file fails at its end
            if stops_the_run(exc):
                raise
            self.error = exc

    def abort(self) -> None:
        self.reader.close()
        if self.writer is not None:
            self.writer.abort()

    def done(
        self, model: tp.Any, frames: int, steps: int, ttt_layers: tp.Sequence[tp.Any], **fields: tp.Any
    ) -> FileResult:
        """The file's `ok` entry once its output is in place: what every job kind records."""
        model_ttt = model.describe_ttt()
        return FileResult(
            str(self.job.input),
            str(self.job.output),
            "ok",
            None,
            duration_s=round(self.read_s, 4),
            frames=frames,
            steps=steps,
            wall_s=round(time.perf_counter() - self.begin, 4),
            ttt=None if model_ttt is None else FileTTT(model_ttt["variant"], model_ttt["chunk_size"], list(ttt_layers)),
            output_sha256=sha256_of(self.job.output),
            warnings=list(self.reader.warnings),
            **fields,
        )


class InferFiles:
    """`infer`: one channel in, Moshi's audio (and text) out, written block by block."""

    def __init__(self, runner: BatchedRunner, text_format: str = "txt", channel: int | str | None = None):
        self.runner = runner
        self.text_format = text_format
        self.channel = channel  # see audio.parse_channel

    def open(self, job: Job) -> tuple[InFlight, Frames]:
        begin = time.perf_counter()
        reader = RecordingReader(job.input, self.channel)
        flight = InFlight(job, reader, (reader.header.samples_24k or 0) // FRAME_SIZE, begin)
        try:
            frames = flight.frames()
            flight.writer = AudioWriter(job.output)
        except BaseException:
            flight.abort()
            raise
        return flight, Frames(frames, flight.expected_frames)

    def stream(self, recordings: tp.Iterable, write: tp.Callable, progress: FrameProgressFn) -> tp.Iterator:
        return self.runner.run(recordings, on_audio=write, progress=progress)

    def finish(self, flight: InFlight, streamed: StreamResult) -> FileResult:
        job, model = flight.job, self.runner.model
        transcript = transcript_of(model, streamed.text_tokens)
        if job.text_output is not None:
            rendered = render_transcript(self.text_format, transcript, timed_words_of(model, streamed))
            write_text(job.text_output, rendered)
        tp.cast(AudioWriter, flight.writer).commit()
        return flight.done(model, streamed.frames, streamed.steps, streamed.ttt_layers, transcript=transcript)


@dataclass(frozen=True)
class LossWeights:
    """The weighted loss's weights, and where each came from (the report says)."""

    first_codebook: float
    first_codebook_source: str
    text_padding: float
    text_padding_source: str


class ScoreFiles:
    """`score`: every channel (and an alignment beside the file) in, the `[1 + dep_q, T]` NLL
    array out, written atomically when the file ends."""

    def __init__(self, runner: ScoreRunner, weights: LossWeights, bucket_seconds: float):
        self.runner = runner
        self.weights = weights
        self.bucket_seconds = bucket_seconds

    def open(self, job: Job) -> tuple[InFlight, tp.Any]:
        from ..streaming.score_runner import ScoreInput

        begin = time.perf_counter()
        reader = RecordingReader(job.input, all_channels=True)
        flight = InFlight(job, reader, (reader.header.samples_24k or 0) // FRAME_SIZE, begin)
        try:
            aligned = alignment_path(job.input)
            text_row = None
            if aligned.is_file():
                text_row = text_row_for(self.runner.model, read_alignments(aligned), flight.expected_frames)
            frames = flight.frames()
        except BaseException:
            flight.abort()
            raise
        return flight, ScoreInput(frames, flight.expected_frames, text_row)

    def stream(self, recordings: tp.Iterable, write: tp.Callable, progress: FrameProgressFn) -> tp.Iterator:
        return self.runner.run(recordings, progress=progress)

    def finish(self, flight: InFlight, scored: ScoredFile) -> FileResult:
        job, model, score = flight.job, self.runner.model, scored.score
        with atomic_output(job.output) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, score.nll)
        lm = model.lm
        summary = summarize(
            score.nll,
            scored.text_row,
            score.score_text,
            (int(lm.text_padding_token_id), int(lm.end_of_text_padding_id)),
            self.bucket_seconds,
            first_codebook_weight=self.weights.first_codebook,
            text_padding_weight=self.weights.text_padding,
        )
        return flight.done(model, score.frames, score.frames, score.ttt_layers, scores=summary)
