"""Every per-file failure stays in its file: whatever goes wrong while one file is read, streamed
(its TTT fast weights turning NaN/Inf) or written is one failed entry with a one-line reason, the
files beside it come out as they would without it, and only an interrupt stops the run.

Library level, on one tiny In-Place model; the CLI cases are in tests/cli/test_hostile.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import partials
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import AudioError
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.audio import AudioWriter
from moshi_ttt.jobs.driver import BatchRunner
from moshi_ttt.jobs.plan import Job
from moshi_ttt.jobs.worker import FileWorker
from moshi_ttt.report.schema import RunSettings
from moshi_ttt.streaming.batched import BatchedRunner
from moshi_ttt.ttt.base import FastWeightModule

SETTINGS = RunSettings(base="tiny", checkpoint=None, seed=4242)


@pytest.fixture(scope="module")
def model(tiny_inplace):
    return load_model(str(tiny_inplace.base), str(tiny_inplace.finetune), device="cpu", dtype=torch.float32)


def worker(model, batch_size: int) -> FileWorker:
    return FileWorker(BatchedRunner(model, batch_size, seed=4242))


def jobs_into(folder: Path, inputs: list[Path], names: list[str] | None = None, text: bool = True) -> list[Job]:
    names = names or [p.stem for p in inputs]
    return [Job(p, folder / f"{n}.wav", folder / f"{n}.txt" if text else None) for p, n in zip(inputs, names)]


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_one_line_failure(result) -> None:
    assert result.status == "failed" and result.output is None
    assert result.reason and "\n" not in result.reason and "Traceback" not in result.reason


# -- TTT divergence ---------------------------------------------------------------------------------


class PoisonAt(SilentEvents):
    """Turns stream `slot`'s fast weights of the first TTT layer to NaN once file `index` has
    streamed `frames` frames, as an update that overflowed would."""

    def __init__(self, runner: BatchedRunner, index: int, slot: int, frames: int = 5):
        self.runner, self.index, self.slot, self.frames = runner, index, slot, frames

    def frames_done(self, index, done, total):
        if index == self.index and done == self.frames:
            layer = self.runner.controller.layers[0]
            for value in layer._streaming_state.fast.values():
                value[self.slot].fill_(float("nan"))


@pytest.fixture(scope="module")
def ttt_mlp_model(tiny_ttt_mlp):
    return load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("family", ["inplace", "ttt-mlp"])
def test_a_diverging_file_fails_alone_and_its_neighbours_come_out_as_without_it(
    family, request, recordings, tmp_path: Path
) -> None:
    """With 2 slots, a (slot 0) diverges mid-stream while b streams beside it in slot 1; c takes a's
    slot once a is done. b and c must be what a run without a gives them, byte for byte: the NaN
    stays in a's stream, and does not survive in its slot's caches either."""
    model = request.getfixturevalue({"inplace": "model", "ttt-mlp": "ttt_mlp_model"}[family])
    a, b, c = recordings
    runner = worker(model, 2)
    report = BatchRunner(runner, SETTINGS, events=PoisonAt(runner.runner, index=0, slot=0)).run(
        jobs_into(tmp_path / "out", [a, b, c])
    )
    assert [f.status for f in report.files] == ["failed", "ok", "ok"]
    assert_one_line_failure(report.files[0])
    layer = model.controller().layers[0].layer_index
    assert report.files[0].reason.startswith(f"TTT layer {layer}: fast weights became NaN/Inf at update ")
    assert not (tmp_path / "out" / f"{a.stem}.wav").exists() and partials(tmp_path) == []

    clean = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "clean", [b, c]))
    assert [f.status for f in clean.files] == ["ok", "ok"]
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")
    assert [f.steps for f in report.files[1:]] == [f.steps for f in clean.files]
    assert [[(x.tokens, x.updates) for x in f.ttt.layers] for f in report.files[1:]] == [
        [(x.tokens, x.updates) for x in f.ttt.layers] for f in clean.files
    ]


# -- a failed batched step, a batch that cannot start ------------------------------------------------


@pytest.mark.parametrize(
    "error,reason",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details"),
            "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (MemoryError(), "out of memory (MemoryError)"),
    ],
)
def test_a_step_failing_inside_the_lm_fails_the_files_in_flight_and_a_fresh_batch_goes_on(
    error, reason, model, recordings, tmp_path: Path, monkeypatch
) -> None:
    """A TTT layer raises half way through an LM step (the layers before it have moved their
    state): the two files in flight fail with one line each, and the two after them stream in a
    fresh batch exactly as in a clean run."""
    a, b, c = recordings
    inputs, names = [a, b, c, a], ["a", "b", "c", "a2"]
    layer = model.controller().layers[-1]
    real_forward = type(layer).forward
    calls = {"n": 0}

    def forward(self, x):
        if self is layer:
            calls["n"] += 1
            if calls["n"] == 7:
                raise error
        return real_forward(self, x)

    monkeypatch.setattr(type(layer), "forward", forward)
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", inputs, names))
    monkeypatch.undo()
    assert [f.status for f in report.files] == ["failed", "failed", "ok", "ok"]
    for failed in report.files[:2]:
        assert_one_line_failure(failed)
        assert failed.reason == reason
    assert partials(tmp_path) == []

    BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "clean", [c, a], ["c", "a2"]))
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


def test_a_batch_whose_state_cannot_be_allocated_fails_one_file_and_the_next_batch_starts_clean(
    model, recordings, tmp_path: Path, monkeypatch
) -> None:
    """Entering streaming fails part way (out of memory allocating a TTT layer's state, after the
    modules before it got theirs): the file that would have streamed first fails, saying why, and
    the next attempt starts from a clean state instead of dying with "is already streaming!"."""
    a, b, c = recordings
    layer = model.controller().layers[-1]
    real_init = FastWeightModule._init_streaming_state
    calls = {"n": 0}

    def init(self, batch_size):
        if self is layer:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_init(self, batch_size)

    monkeypatch.setattr(FastWeightModule, "_init_streaming_state", init)
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", [a, b, c]))
    monkeypatch.undo()
    assert [f.status for f in report.files] == ["failed", "ok", "ok"]
    assert_one_line_failure(report.files[0])
    assert report.files[0].reason == (
        "streaming could not start at batch size 2: RuntimeError: CUDA out of memory. Tried to allocate 80.00 GiB"
    )
    BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "clean", [b, c]))
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")
    assert not model.lm.is_streaming and not model.mimi.is_streaming


def test_a_batch_that_can_never_start_fails_every_file_and_ends(model, recordings, tmp_path: Path, monkeypatch) -> None:
    def init(self, batch_size):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(FastWeightModule, "_init_streaming_state", init)
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", recordings))
    monkeypatch.undo()
    assert [f.status for f in report.files] == ["failed"] * 3
    assert {f.reason for f in report.files} == {
        "streaming could not start at batch size 2: RuntimeError: DefaultCPUAllocator: can't allocate memory"
    }
    assert not model.lm.is_streaming


# -- disk full ----------------------------------------------------------------------------------


def test_a_file_that_fills_the_disk_gives_its_space_back_at_once(
    model, recordings, tmp_path: Path, monkeypatch
) -> None:
    """A disk with room for the small files but not for the big one beside them. With 2 slots the
    big file (3 s) streams beside one small file after another; when a write finds the disk full
    the big file fails, and its temporary must go at once: kept until its stream ends, its space
    would make the small file beside it fail too."""
    a, _, big = recordings  # 1.6 s and 3.0 s: 76,844 and 144,044 bytes of WAV
    out = tmp_path / "out"
    room = 240_000
    failures: list[str] = []
    real_write = AudioWriter.write

    def used() -> int:
        return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    def write(writer, block):
        if used() + 2 * len(block) > room:
            failures.append(writer.path.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(writer, block)
        writer._wav._file.flush()  # sizes on disk as written, so `used` is exact

    monkeypatch.setattr(AudioWriter, "write", write)
    jobs = jobs_into(out, [big, a, a, a], ["big", "s1", "s2", "s3"], text=False)
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs)
    monkeypatch.undo()
    assert failures == ["big.wav"]
    assert [f.status for f in report.files] == ["failed", "ok", "ok", "ok"]
    assert report.files[0].reason == "OSError: [Errno 28] No space left on device"
    assert sorted(p.name for p in out.iterdir()) == ["s1.wav", "s2.wav", "s3.wav"]
    assert partials(tmp_path) == []


# -- reading: a decoder panic, memory, interrupts ------------------------------------------------


def panic_exception() -> type[BaseException]:
    """pyo3's PanicException (a BaseException), as sphn raises it for a WAV header with rate 0."""
    import io
    import struct
    import tempfile

    import numpy as np
    import soundfile as sf
    import sphn

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(4800, dtype=np.float32), 24000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    at = data.find(b"fmt ") + 12
    data[at : at + 4] = struct.pack("<I", 0)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(data)
        f.flush()
        try:
            sphn.read(f.name)
        except BaseException as exc:  # noqa: BLE001 - that is the point
            if type(exc).__name__ == "PanicException":
                return type(exc)
    pytest.skip("this sphn no longer panics on a zero sample rate")


@pytest.mark.parametrize("kind", ["panic", "memory", "value"])
def test_anything_raised_while_reading_one_file_fails_only_that_file(
    kind, model, recordings, tmp_path: Path, monkeypatch
) -> None:
    a, b, c = recordings
    error = {
        "panic": lambda: panic_exception()("TimeBase cannot have 0 numerator or denominator\nat units.rs:150"),
        "memory": lambda: MemoryError(),
        "value": lambda: ValueError("cannot reshape array of size 3 into shape (2,)"),
    }[kind]()
    expected = {
        "panic": "a native library crashed (PanicException: TimeBase cannot have 0 numerator or denominator)",
        "memory": "out of memory (MemoryError)",
        "value": "ValueError: cannot reshape array of size 3 into shape (2,)",
    }[kind]
    from moshi_ttt.jobs import kinds

    real_reader = kinds.RecordingReader

    def reader(path, *args, **kwargs):
        if Path(path) == b:
            raise error
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(kinds, "RecordingReader", reader)
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", [a, b, c]))
    assert [f.status for f in report.files] == ["ok", "failed", "ok"]
    assert_one_line_failure(report.files[1])
    assert report.files[1].reason == expected


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_while_reading_stops_the_run(error, model, recordings, tmp_path: Path, monkeypatch) -> None:
    a, b, c = recordings
    from moshi_ttt.jobs import kinds

    real_reader = kinds.RecordingReader

    def reader(path, *args, **kwargs):
        if Path(path) == b:
            raise error()
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(kinds, "RecordingReader", reader)
    with pytest.raises(error):
        BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", [a, b, c]))
    assert partials(tmp_path) == []
    assert not model.lm.is_streaming


def test_our_own_reading_errors_keep_their_reason(model, recordings, tmp_path: Path) -> None:
    a = recordings[0]
    missing = tmp_path / "missing.wav"
    report = BatchRunner(worker(model, 2), SETTINGS).run(jobs_into(tmp_path / "out", [missing, a]))
    assert [(f.status, f.reason) for f in report.files] == [("failed", AudioError("no such file").reason), ("ok", None)]


@pytest.mark.parametrize("job", ["infer", "score"])
def test_a_decode_error_part_way_fails_that_file_alone(job, model, recordings, tmp_path: Path, monkeypatch) -> None:
    """A recording that breaks after some frames (a corrupt block mid-file) fails alone, its
    output is never placed, and the files beside it are what a clean run gives them."""
    from moshi_ttt.errors import AudioError
    from moshi_ttt.jobs import kinds
    from moshi_ttt.jobs.kinds import LossWeights, ScoreFiles
    from moshi_ttt.streaming.score_runner import ScoreRunner

    a, b, c = recordings

    def make_worker() -> FileWorker:
        if job == "infer":
            return worker(model, 2)
        weights = LossWeights(1.0, "test", 0.5, "test")
        return FileWorker(ScoreFiles(ScoreRunner(model, 2), weights, bucket_seconds=60.0))

    def run(folder: Path) -> list:
        jobs = jobs_into(folder, [a, b, c], text=False)
        if job == "score":
            jobs = [Job(j.input, j.output.with_suffix(".nll.npy")) for j in jobs]
        return BatchRunner(make_worker(), SETTINGS).run(jobs).files

    clean = run(tmp_path / "clean")

    class BreaksMidway(kinds.RecordingReader):
        def frames(self, frame_size: int = 1920):
            for count, frame in enumerate(super().frames(frame_size)):
                if self.path == b and count == 5:
                    raise AudioError("cannot decode audio (corrupt block)", self.path)
                yield frame

    monkeypatch.setattr(kinds, "RecordingReader", BreaksMidway)
    broken = run(tmp_path / "broken")
    assert [f.status for f in broken] == ["ok", "failed", "ok"]
    assert_one_line_failure(broken[1])
    assert "corrupt block" in broken[1].reason and not list((tmp_path / "broken").glob(f"{b.stem}*"))
    for mine, theirs in ((broken[0], clean[0]), (broken[2], clean[2])):
        if job == "infer":
            assert Path(mine.output).read_bytes() == Path(theirs.output).read_bytes()
        else:  # c starts earlier in its slot; TTT commits batch differently: float rounding only
            np.testing.assert_allclose(np.load(mine.output), np.load(theirs.output), atol=1e-5)
    assert partials(tmp_path) == []


def test_a_diverging_file_fails_alone_when_scored_too(model, recordings, tmp_path: Path) -> None:
    """`score` jobs share the boundary: a file whose fast weights turn NaN fails alone, and the
    file that next takes its slot scores what it scores without it (its caches were scrubbed)."""
    from moshi_ttt.jobs.kinds import LossWeights, ScoreFiles
    from moshi_ttt.streaming.score_runner import ScoreRunner

    a, b, c = recordings

    def scoring() -> FileWorker:
        return FileWorker(ScoreFiles(ScoreRunner(model, 2), LossWeights(1.0, "test", 0.5, "test"), 60.0))

    def jobs(folder: Path, inputs: list[Path]) -> list[Job]:
        return [Job(p, folder / f"{p.stem}.nll.npy") for p in inputs]

    runner = scoring()
    report = BatchRunner(runner, SETTINGS, events=PoisonAt(runner.runner, index=0, slot=0)).run(
        jobs(tmp_path / "out", [a, b, c])
    )
    assert [f.status for f in report.files] == ["failed", "ok", "ok"]
    assert_one_line_failure(report.files[0])
    assert "fast weights became NaN/Inf" in report.files[0].reason
    clean = BatchRunner(scoring(), SETTINGS).run(jobs(tmp_path / "clean", [b, c]))
    for mine, theirs in zip(report.files[1:], clean.files):
        np.testing.assert_allclose(np.load(mine.output), np.load(theirs.output), atol=1e-5)
