"""Batch mode, library level: planning outputs, reading odd recordings, per-file isolation,
resuming, failure isolation, interruption and the JSON report.

One tiny In-Place model is loaded for the whole module; the CLI is exercised in test_cli.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import partials, tone
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import AudioError, AudioTooShortError, MoshiTTTError
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.audio import AudioWriter, read_audio, write_audio
from moshi_ttt.jobs.driver import BatchRunner
from moshi_ttt.jobs.files import FRAME_SIZE, PARTIAL_SUFFIX, SAMPLE_RATE
from moshi_ttt.jobs.plan import Job, default_report_path, find_inputs, plan_jobs, prepare_batch
from moshi_ttt.jobs.worker import FileWorker
from moshi_ttt.report.schema import REPORT_SCHEMA, RunSettings
from moshi_ttt.report.shards import read_report_file
from moshi_ttt.streaming.batched import BatchedRunner

FILE_KEYS = {
    "input",
    "output",
    "status",
    "reason",
    "duration_s",
    "frames",
    "steps",
    "wall_s",
    "ttt",
    "transcript",
    "output_sha256",
    "from_earlier_run",
    "warnings",
    "made_by",
    "output_stat",
}
LAYER_KEYS = {
    "layer",
    "tokens",
    "updates",
    "pending_tokens",
    "norm_initial",
    "norm_final",
    "drift",
    "relative_drift",
    "clipped_updates",
}
TOTAL_KEYS = {"files", "ok", "failed", "skipped", "audio_s", "wall_s", "real_time_factor", "made_by_other"}


# -- helpers --------------------------------------------------------------------------------------

SETTINGS = RunSettings(base="tiny", checkpoint=None, seed=4242)  # what the report says made its files


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def dominant_freq(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[int(np.argmax(spectrum))])


def jobs_into(folder: Path, inputs: list[Path], text: bool = True) -> list[Job]:
    return [Job(p, folder / f"{p.stem}.wav", folder / f"{p.stem}.txt" if text else None) for p in inputs]


def outputs_of(report) -> dict[str, tuple[bytes, str, dict, int]]:
    """Per input name: output WAV bytes, transcript, TTT numbers (as the report's JSON holds them), steps."""
    result = {}
    for f in report.files:
        assert f.status == "ok", (f.input, f.reason)
        out = Path(f.output)
        numbers = report.to_json()["files"][report.files.index(f)]["ttt"]
        result[Path(f.input).name] = (out.read_bytes(), out.with_suffix(".txt").read_text(), numbers, f.steps)
    return result


class Recorder(SilentEvents):
    """Events that can pollute global RNGs between files, read the report on disk as each file
    finishes, or interrupt a given file half way."""

    def __init__(self, report_path: Path | None = None, pollute_rng: bool = False, interrupt_file: int | None = None):
        self.report_path = report_path
        self.pollute_rng = pollute_rng
        self.interrupt_file = interrupt_file
        self.current = -1
        self.on_disk: list[dict] = []
        self.started: list[int] = []

    def file_started(self, index, total, job, audio_s):
        self.current = index
        self.started.append(index)
        if self.pollute_rng:  # anything a previous file (or the caller) did to the global RNGs
            torch.manual_seed(1000 + index)
            torch.randn(1234)
            np.random.seed(77 + index)
            np.random.rand(99)
            random.seed(index)

    def frames_done(self, index, done, total):
        if index == self.interrupt_file and done == max(total // 2, 1):
            raise KeyboardInterrupt

    def file_finished(self, index, total, result):
        if self.report_path is not None:  # the report with its journal, as a resume reads them
            self.on_disk.append(read_report_file(self.report_path).data)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_inplace):
    return load_model(str(tiny_inplace.base), str(tiny_inplace.finetune), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def runner(model) -> FileWorker:
    return FileWorker(BatchedRunner(model, 1, seed=4242))


@pytest.fixture(scope="module")
def alone(runner, recordings, tmp_path_factory) -> dict[str, tuple[bytes, str, dict, int]]:
    """Each recording processed in a batch of its own: the reference every order must match."""
    result = {}
    for path in recordings:
        folder = tmp_path_factory.mktemp(f"alone_{path.stem}")
        result.update(outputs_of(BatchRunner(runner, SETTINGS).run(jobs_into(folder, [path]))))
    return result


# -- planning -------------------------------------------------------------------------------------


def test_plan_jobs_mirrors_nested_folders_and_ignores_non_audio(tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    for rel in ("a.wav", "b.FLAC", "sub/c.ogg", "sub/deeper/d.mp3", "sub/deeper/e.opus", "f.aiff"):
        touch(src / rel)
    for rel in ("notes.txt", "a.wav.1234.partial", "sub/c.wav.99.partial", "cover.jpg", "sub/deeper/x.json"):
        touch(src / rel)
    (src / "folder.wav").mkdir()  # a folder with an audio extension is not a file

    jobs = plan_jobs(src, dst)
    got = {j.input.relative_to(src).as_posix(): j.output.relative_to(dst).as_posix() for j in jobs}
    assert got == {
        "a.wav": "a.wav",
        "b.FLAC": "b.wav",
        "sub/c.ogg": "sub/c.wav",
        "sub/deeper/d.mp3": "sub/deeper/d.wav",
        "sub/deeper/e.opus": "sub/deeper/e.wav",
        "f.aiff": "f.wav",
    }
    assert [j.input for j in jobs] == sorted(j.input for j in jobs)
    assert all(j.text_output is None for j in jobs)
    assert not dst.exists()  # planning writes nothing

    text_jobs = plan_jobs(src, dst, text=True)
    assert all(j.text_output == j.output.with_suffix(".txt") for j in text_jobs)

    # --glob narrows, matched against the relative path or the file name.
    assert [j.input.name for j in plan_jobs(src, dst, "*.ogg")] == ["c.ogg"]
    assert sorted(j.input.name for j in plan_jobs(src, dst, "sub/deeper/*")) == ["d.mp3", "e.opus"]
    assert [j.input.name for j in plan_jobs(src, dst, "d.*")] == ["d.mp3"]
    assert plan_jobs(src, dst, "*.nothing") == []


def test_plan_jobs_single_file_collisions_and_output_inside_input(tmp_path: Path) -> None:
    src = tmp_path / "in"
    a = touch(src / "a.wav")
    touch(src / "a.flac")
    # A single file: to the named file, or into an existing folder.
    assert plan_jobs(a, tmp_path / "x.wav") == [Job(a, tmp_path / "x.wav", None)]
    (tmp_path / "dir").mkdir()
    assert plan_jobs(a, tmp_path / "dir", text=True) == [Job(a, tmp_path / "dir" / "a.wav", tmp_path / "dir" / "a.txt")]

    # a.wav and a.flac side by side: two distinct outputs, nothing overwritten.
    outs = [j.output for j in plan_jobs(src, tmp_path / "out")]
    assert len(outs) == 2 and len(set(outs)) == 2

    # Outputs written inside the input folder (and their .partial temporaries) are never inputs.
    out = src / "out"
    touch(out / "a.wav")
    touch(out / "nested" / "b.wav")
    touch(out / f"c.wav.{os.getpid()}{PARTIAL_SUFFIX}")
    assert sorted(j.input.name for j in plan_jobs(src, out)) == ["a.flac", "a.wav"]
    assert all(out not in j.input.parents for j in plan_jobs(src, out))

    with pytest.raises(MoshiTTTError, match="no such file or folder"):
        plan_jobs(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(MoshiTTTError, match="must be a folder"):
        plan_jobs(src, a)
    assert default_report_path(src, tmp_path / "o") == tmp_path / "o" / "moshi-ttt-report.json"
    assert default_report_path(a, tmp_path / "o.wav") is None
    assert find_inputs(src, exclude=out.resolve()) == sorted([src / "a.flac", a])


# -- reading recordings ----------------------------------------------------------------------------


def test_read_audio_accepts_channels_depths_and_rates(tmp_path: Path) -> None:
    left, right = tone(SAMPLE_RATE, 0.5, 300), tone(SAMPLE_RATE, 0.5, 1100, amp=0.2)
    stereo = np.stack([left, right], axis=1)
    sf.write(tmp_path / "mono16.wav", left, SAMPLE_RATE, subtype="PCM_16")
    sf.write(tmp_path / "stereo16.wav", stereo, SAMPLE_RATE, subtype="PCM_16")
    assert np.array_equal(read_audio(tmp_path / "stereo16.wav"), read_audio(tmp_path / "mono16.wav"))

    # Bit depths: each within its quantisation step of the source signal.
    for subtype, step in (
        ("PCM_U8", 1 / 128),
        ("PCM_16", 1 / 32768),
        ("PCM_24", 1 / 2**23),
        ("PCM_32", 1 / 2**31),
        ("FLOAT", 1e-7),
        ("DOUBLE", 1e-7),
    ):
        path = tmp_path / f"{subtype}.wav"
        sf.write(path, stereo, SAMPLE_RATE, subtype=subtype)
        pcm = read_audio(path)
        assert pcm.dtype == np.float32 and pcm.ndim == 1 and len(pcm) == len(left), subtype
        assert np.max(np.abs(pcm - left)) <= step + 1e-6, subtype

    # Other sample rates and containers (sphn's readers, and soundfile's for .au) are resampled
    # to 24 kHz: same duration (within one frame), same pitch, channel 0.
    for name, rate, subtype in (
        ("r16k.wav", 16_000, "PCM_16"),
        ("r44k.flac", 44_100, "PCM_24"),
        ("r8k.aiff", 8_000, "PCM_16"),
        ("r16k.au", 16_000, "PCM_16"),
        ("r48k.ogg", 48_000, "VORBIS"),
    ):
        path = tmp_path / name
        sf.write(path, np.stack([tone(rate, 1.0, 300), tone(rate, 1.0, 1100, 0.2)], axis=1), rate, subtype=subtype)
        pcm = read_audio(path)
        assert pcm.dtype == np.float32 and pcm.ndim == 1, name
        assert abs(len(pcm) - SAMPLE_RATE) < FRAME_SIZE, (name, len(pcm))
        assert abs(dominant_freq(pcm) - 300) <= 2, name
        assert 0.3 < np.max(np.abs(pcm)) < 0.5, name


def test_read_audio_names_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, tone(SAMPLE_RATE, 0.5), SAMPLE_RATE, subtype="PCM_16")
    header = good.read_bytes()[:12]  # "RIFF....WAVE"
    rng = np.random.default_rng(0)
    cases = {
        "empty.wav": (b"", "empty file"),
        "text.wav": (b"this is not audio\n" * 50, "not a recognised audio format"),
        "text.mp3": (b"this is not audio\n" * 50, "not a recognised audio format"),
        "noise.flac": (rng.bytes(4000), ""),
        "header_only.wav": (good.read_bytes()[:30], "cannot decode audio"),
        "bad_chunks.wav": (header + rng.bytes(4000), ""),
        "bad_flac.flac": (b"fLaC" + rng.bytes(4000), ""),
    }
    for name, (data, reason) in cases.items():
        path = touch(tmp_path / name, data)
        with pytest.raises(AudioError) as info:
            read_audio(path)
        assert not isinstance(info.value, AudioTooShortError), name
        assert reason in info.value.reason, (name, info.value.reason)
        assert info.value.reason and "\n" not in info.value.reason, name
        assert info.value.reason.startswith(("empty file", "not a recognised audio format", "cannot decode audio")), (
            name,
            info.value.reason,
        )
        assert str(path) not in info.value.reason, name  # the path is named once, by the error itself
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "missing.wav")

    # Shorter than one 80 ms frame: "too short" (skipped later), not a decode failure.
    for samples in (0, 1200, FRAME_SIZE - 1):
        path = tmp_path / f"short{samples}.wav"
        sf.write(path, np.zeros(samples), SAMPLE_RATE, subtype="PCM_16")
        with pytest.raises(AudioTooShortError, match="shorter than one 80 ms frame"):
            read_audio(path)
    sf.write(tmp_path / "one_frame.wav", tone(SAMPLE_RATE, FRAME_SIZE / SAMPLE_RATE), SAMPLE_RATE)
    assert len(read_audio(tmp_path / "one_frame.wav")) == FRAME_SIZE

    nan = tmp_path / "nan.wav"
    data = tone(SAMPLE_RATE, 0.5)
    data[100] = np.nan
    sf.write(nan, data, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(nan)


# -- isolation -------------------------------------------------------------------------------------


def test_output_and_ttt_numbers_do_not_depend_on_order(runner, recordings, alone, tmp_path: Path) -> None:
    a, b, c = recordings
    forward = outputs_of(BatchRunner(runner, SETTINGS).run(jobs_into(tmp_path / "fwd", [a, b, c])))
    # Reverse order, with the global RNGs disturbed before every file.
    events = Recorder(pollute_rng=True)
    backward = outputs_of(BatchRunner(runner, SETTINGS, events=events).run(jobs_into(tmp_path / "bwd", [c, b, a])))
    assert events.started == [0, 1, 2]
    for name in (a.name, b.name, c.name):
        assert forward[name] == alone[name], name  # WAV bytes, transcript, TTT numbers, steps
        assert backward[name] == alone[name], name
    # The outputs are sampled, so identical bytes above are the reseed at work: another seed differs.
    runner.runner.seed, seed = 1, runner.runner.seed
    try:
        other = outputs_of(BatchRunner(runner, SETTINGS).run(jobs_into(tmp_path / "seed1", [a])))
    finally:
        runner.runner.seed = seed
    assert other[a.name][0] != alone[a.name][0]


def test_ttt_numbers_per_file(model, recordings, alone) -> None:
    ttt = model.describe_ttt()
    chunk = ttt["chunk_size"]
    for path in recordings:
        wav, transcript, numbers, steps = alone[path.name]
        frames = sf.info(str(path)).frames // FRAME_SIZE
        assert steps == frames + 1  # the first frame is stepped twice, as in moshi's run_inference
        assert numbers["variant"] == ttt["variant"] and numbers["chunk_size"] == chunk
        assert [layer["layer"] for layer in numbers["layers"]] == list(ttt["layers"])
        for layer in numbers["layers"]:
            assert set(layer) == LAYER_KEYS
            assert layer["tokens"] == steps
            assert layer["updates"] == math.ceil(steps / chunk)
            assert layer["pending_tokens"] == 0
            assert layer["drift"] > 0 and layer["norm_initial"] > 0
            assert layer["relative_drift"] == pytest.approx(layer["drift"] / layer["norm_initial"])
        out, rate = sf.read(io.BytesIO(wav))
        assert rate == SAMPLE_RATE and out.ndim == 1
        assert len(out) == frames * FRAME_SIZE  # one output frame per input frame


# -- report, failures, resume ---------------------------------------------------------------------


def test_report_is_complete_and_on_disk_after_every_file(runner, model, recordings, alone, tmp_path: Path) -> None:
    src = tmp_path / "in"
    a, b, c = recordings
    (src / "sub").mkdir(parents=True)
    for path, rel in ((a, "1.wav"), (b, "sub/2.wav"), (c, "sub/3.wav")):
        (src / rel).write_bytes(path.read_bytes())
    touch(src / "0_empty.wav", b"")
    sf.write(src / "0_short.wav", tone(SAMPLE_RATE, 0.05), SAMPLE_RATE)
    touch(src / "sub" / "4_text.mp3", b"not audio at all\n" * 20)
    out = tmp_path / "out"
    report_path = default_report_path(src, out)
    settings = RunSettings(base="b", checkpoint="c", seed=4242, device="cpu", dtype="float32", ttt=model.describe_ttt())
    events = Recorder(report_path=report_path)
    jobs = plan_jobs(src, out, text=True)
    report = BatchRunner(runner, settings, report_path=report_path, events=events).run(jobs)

    data = json.loads(report_path.read_text())
    assert data == json.loads(json.dumps(report.to_json()))
    assert set(data) == {"schema", "settings", "files", "totals", "journal"}  # no "interrupted" key
    assert data["schema"] == REPORT_SCHEMA
    assert data["settings"] == settings.to_json() and RunSettings.from_json(data["settings"]) == settings
    assert [f["input"] for f in data["files"]] == [str(j.input) for j in jobs]
    by_name = {Path(f["input"]).name: f for f in data["files"]}
    for f in data["files"]:
        assert set(f) == FILE_KEYS

    assert by_name["0_empty.wav"]["status"] == "failed" and "empty" in by_name["0_empty.wav"]["reason"]
    assert by_name["4_text.mp3"]["status"] == "failed"
    assert "not a recognised audio format" in by_name["4_text.mp3"]["reason"]
    assert by_name["0_short.wav"]["status"] == "skipped"
    assert "shorter than one 80 ms frame" in by_name["0_short.wav"]["reason"]
    for name in ("0_empty.wav", "4_text.mp3", "0_short.wav"):
        f = by_name[name]
        assert f["output"] is None and f["ttt"] is None and f["frames"] == 0 and "\n" not in f["reason"]
    for name, original in (("1.wav", a), ("2.wav", b), ("3.wav", c)):
        f = by_name[name]
        assert f["status"] == "ok" and f["reason"] is None
        assert Path(f["output"]).read_bytes() == alone[original.name][0]  # unaffected by the bad files
        assert Path(f["output"]).with_suffix(".txt").read_text() == alone[original.name][1]
        assert f["ttt"] == alone[original.name][2]
        assert f["duration_s"] == pytest.approx(sf.info(str(original)).duration, abs=1e-3)
        assert f["wall_s"] > 0
    assert (out / "sub" / "2.wav").is_file() and (out / "sub" / "3.txt").is_file()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["1.wav", "1.txt", "sub/2.wav", "sub/2.txt", "sub/3.wav", "sub/3.txt", "moshi-ttt-report.json"]
    )

    totals = data["totals"]
    assert set(totals) == TOTAL_KEYS
    assert (totals["files"], totals["ok"], totals["failed"], totals["skipped"]) == (6, 3, 2, 1)
    ok = [f for f in data["files"] if f["status"] == "ok"]
    assert totals["audio_s"] == pytest.approx(sum(f["duration_s"] for f in ok), abs=1e-3)
    assert totals["wall_s"] >= sum(f["wall_s"] for f in ok) - 1e-3
    assert totals["real_time_factor"] == pytest.approx(totals["wall_s"] / totals["audio_s"], rel=1e-2)

    # The report on disk (with its journal) was up to date as each file finished.
    assert [len(d["files"]) for d in events.on_disk] == list(range(1, len(jobs) + 1))
    for i, d in enumerate(events.on_disk):
        assert d["files"] == data["files"][: i + 1]
        assert d["totals"]["files"] == i + 1
    assert partials(tmp_path) == []


def test_existing_outputs_are_skipped_unless_overwrite(runner, recordings, alone, tmp_path: Path) -> None:
    a, b, c = recordings
    out = tmp_path / "out"
    BatchRunner(runner, SETTINGS).run(jobs_into(out, [a, b]))
    (out / f"{a.stem}.wav").write_bytes(b"kept: not rewritten")
    report = BatchRunner(runner, SETTINGS).run(jobs_into(out, [a, b, c]))
    statuses = [(f.status, f.reason) for f in report.files]
    assert statuses == [("skipped", "exists"), ("skipped", "exists"), ("ok", None)]
    assert report.files[0].output == str(out / f"{a.stem}.wav") and report.files[0].ttt is None
    assert (out / f"{a.stem}.wav").read_bytes() == b"kept: not rewritten"
    assert (out / f"{c.stem}.wav").read_bytes() == alone[c.name][0]
    assert report.totals()["skipped"] == 2 and report.totals()["audio_s"] == pytest.approx(
        report.files[2].duration_s, abs=1e-3
    )

    report = BatchRunner(runner, SETTINGS, overwrite=True).run(jobs_into(out, [a]))
    assert report.files[0].status == "ok"
    assert (out / f"{a.stem}.wav").read_bytes() == alone[a.name][0]


class FailAt(SilentEvents):
    """Makes the runner's next LM step fail once file `index` has streamed `frames` frames, as a
    device error (out of memory) would."""

    def __init__(self, worker: FileWorker, monkeypatch, index: int, frames: int = 5):
        self.index, self.frames, self.armed = index, frames, False
        real_step = worker.runner._step

        def step(codes, active):
            if self.armed:
                self.armed = False
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nsecond line of details")
            return real_step(codes, active)

        monkeypatch.setattr(worker.runner, "_step", step)

    def frames_done(self, index, done, total):
        if index == self.index and done == self.frames:
            self.armed = True


def test_one_file_failing_mid_stream_does_not_stop_or_disturb_the_others(
    runner, recordings, alone, tmp_path: Path, monkeypatch
) -> None:
    a, b, c = recordings
    events = FailAt(runner, monkeypatch, index=1)
    report = BatchRunner(runner, SETTINGS, events=events).run(jobs_into(tmp_path, [a, b, c]))
    monkeypatch.undo()
    assert [f.status for f in report.files] == ["ok", "failed", "ok"]
    failed = report.files[1]
    assert failed.reason == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert failed.output is None and not (tmp_path / f"{b.stem}.wav").exists()
    assert (tmp_path / f"{c.stem}.wav").read_bytes() == alone[c.name][0]
    assert report.totals()["failed"] == 1
    assert partials(tmp_path) == []


def test_a_failed_batched_step_fails_the_files_in_it_and_the_rest_go_on(
    model, recordings, tmp_path: Path, monkeypatch
) -> None:
    """A step is every streaming file's: with 2 slots, a device error fails the two files in
    flight (one line each, no output), and the worker takes the next file in a fresh batch."""
    a, b, c = recordings
    worker = FileWorker(BatchedRunner(model, 2, seed=4242))
    events = FailAt(worker, monkeypatch, index=1)
    report = BatchRunner(worker, SETTINGS, events=events).run(jobs_into(tmp_path, [a, b, c]))
    monkeypatch.undo()
    assert [f.status for f in report.files] == ["failed", "failed", "ok"]
    assert {f.reason for f in report.files[:2]} == {"RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{c.stem}.txt", f"{c.stem}.wav"]
    alone_c = BatchRunner(FileWorker(BatchedRunner(model, 2, seed=4242)), SETTINGS).run(jobs_into(tmp_path / "c", [c]))
    assert (tmp_path / f"{c.stem}.wav").read_bytes() == (tmp_path / "c" / f"{c.stem}.wav").read_bytes()
    assert alone_c.files[0].status == "ok"


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_write_cut_short_leaves_nothing_under_the_final_name(
    runner, recordings, tmp_path: Path, monkeypatch, error
) -> None:
    a, b, c = recordings
    real_write = AudioWriter.write

    def cut_short(writer, block):
        if b.stem in writer.path.name and writer.samples > 5 * FRAME_SIZE:  # a partial file exists...
            assert len(partials(tmp_path)) == 1
            raise error("No space left on device")  # ...when the write dies
        real_write(writer, block)

    monkeypatch.setattr(AudioWriter, "write", cut_short)
    report_path = tmp_path / "out" / "report.json"
    batch = BatchRunner(runner, SETTINGS, report_path=report_path)
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            batch.run(jobs_into(tmp_path / "out", [a, b, c], text=False))
        data = json.loads(report_path.read_text())
        assert data["interrupted"] is True
        assert [f["status"] for f in data["files"]] == ["ok"]  # c never started
    else:
        report = batch.run(jobs_into(tmp_path / "out", [a, b, c], text=False))
        assert [f.status for f in report.files] == ["ok", "failed", "ok"]
        assert report.files[1].reason.startswith("OSError") and "No space left" in report.files[1].reason
        assert json.loads(report_path.read_text())["totals"]["failed"] == 1
    assert not (tmp_path / "out" / f"{b.stem}.wav").exists()
    assert partials(tmp_path) == []


def test_interrupt_mid_file_discards_it_and_keeps_the_report(runner, recordings, alone, tmp_path: Path) -> None:
    a, b, c = recordings
    out = tmp_path / "out"
    report_path = out / "moshi-ttt-report.json"
    events = Recorder(report_path=report_path, interrupt_file=1)
    with pytest.raises(KeyboardInterrupt):
        BatchRunner(runner, SETTINGS, report_path=report_path, events=events).run(jobs_into(out, [a, b, c]))
    data = json.loads(report_path.read_text())
    assert data["interrupted"] is True
    assert [Path(f["input"]).name for f in data["files"]] == [a.name]
    assert data["totals"]["files"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{a.stem}.wav", f"{a.stem}.txt", report_path.name])

    # Rerun without overwrite: the finished file is skipped, the rest completes as if never interrupted.
    report = BatchRunner(runner, SETTINGS, report_path=report_path).run(jobs_into(out, [a, b, c]))
    assert [(f.status, f.reason) for f in report.files] == [("skipped", "exists"), ("ok", None), ("ok", None)]
    for path in (a, b, c):
        assert (out / f"{path.stem}.wav").read_bytes() == alone[path.name][0]
    assert "interrupted" not in json.loads(report_path.read_text())
    assert partials(tmp_path) == []


def test_atomic_writes_leave_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "x.wav"
    write_audio(target, np.zeros(FRAME_SIZE, dtype=np.float32))
    assert sf.info(str(target)).frames == FRAME_SIZE
    assert [p.name for p in target.parent.iterdir()] == ["x.wav"]


@pytest.mark.parametrize("content", [b'{"notes": "mine"}', b"not json at all", b"\xff\xfe"])
def test_a_report_path_holding_another_file_is_refused_not_replaced(recordings, tmp_path: Path, content) -> None:
    mine = tmp_path / "notes.json"
    mine.write_bytes(content)
    with pytest.raises(MoshiTTTError, match="exists and is not a moshi-ttt report; refusing to replace it"):
        prepare_batch(recordings[0].parent, tmp_path / "out", report=mine)
    assert mine.read_bytes() == content
