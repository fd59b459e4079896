"""`moshi-ttt infer` end to end on the tiny In-Place checkpoint: folders of good and bad
recordings, exit codes, output layout, --text/--quiet/--no-ttt/--glob/--overwrite, the report,
resuming, and real interruptions (SIGINT and SIGKILL of a running process).
"""

from __future__ import annotations

import io
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console
from typer.testing import CliRunner

from helpers import N_LONG, files_under, partials, sweep
from helpers.cli import (
    assert_no_traceback,
    check_outputs_complete,
    expected_samples,
    infer,
    report_of,
    start_and_wait_for_finished_files,
)
from moshi_ttt.jobs.files import FRAME_SIZE, PARTIAL_SUFFIX, SAMPLE_RATE
from moshi_ttt.jobs.guard import LOCK_NAME
from moshi_ttt.jobs.plan import Job
from moshi_ttt.report.schema import REPORT_NAME, REPORT_SCHEMA, FileResult
from moshi_ttt_cli import render
from moshi_ttt_cli.app import app

ANSI = re.compile(r"\x1b\[")
ANSI_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# -- helpers --------------------------------------------------------------------------------------


def by_rel(report: dict, root: Path) -> dict[str, dict]:
    return {Path(f["input"]).relative_to(root).as_posix(): f for f in report["files"]}


# -- a folder mixing good and bad recordings --------------------------------------------------------

GOOD = [
    "mono.wav",
    "stereo.wav",
    "depth/u8.wav",
    "depth/s16.wav",
    "depth/s24.wav",
    "depth/float.wav",
    "rates/r16k.wav",
    "rates/deeper/r44k.flac",
    "speech/sample_00_chirp.wav",
    "speech/sample_01_vibrato.wav",
    "speech/sample_02_noise_bursts.wav",
    "formats/tone.mp3",
    "formats/tone.ogg",
]
FAILED = {
    "bad/corrupt.wav": "",
    "bad/text.mp3": "not a recognised audio format",
    "bad/deeper/text.wav": "not a recognised audio format",
    "bad/empty.wav": "empty file",
    "bad/header_only.wav": "WAV header is truncated",
}
SKIPPED = {"bad/short.wav": "shorter than one 80 ms frame"}


def output_rel(rel: str) -> str:
    """tone.mp3 and tone.ogg side by side: each takes its full name, neither is lost."""
    return f"{rel}.wav" if rel.startswith("formats/tone.") else str(Path(rel).with_suffix(".wav"))


def write_mixed(root: Path, recordings: list[Path]) -> Path:
    src = root / "in"
    for rel in ("depth", "rates/deeper", "speech", "bad/deeper", "formats"):
        (src / rel).mkdir(parents=True, exist_ok=True)
    left, right = sweep(SAMPLE_RATE, 1.0, 300, seed=1), sweep(SAMPLE_RATE, 1.0, 900, amp=0.2, seed=2)
    sf.write(src / "mono.wav", left, SAMPLE_RATE, subtype="PCM_16")
    sf.write(src / "stereo.wav", np.stack([left, right], 1), SAMPLE_RATE, subtype="PCM_16")
    for name, subtype, seconds in (
        ("u8", "PCM_U8", 0.9),
        ("s16", "PCM_16", 0.7),
        ("s24", "PCM_24", 1.1),
        ("float", "FLOAT", 0.5),
    ):
        ch0 = sweep(SAMPLE_RATE, seconds, 440, seed=3)
        ch1 = sweep(SAMPLE_RATE, seconds, 900, 0.2, seed=6)
        sf.write(src / "depth" / f"{name}.wav", np.stack([ch0, ch1], 1), SAMPLE_RATE, subtype=subtype)
    sf.write(src / "rates" / "r16k.wav", sweep(16_000, 0.8, 250, seed=4), 16_000, subtype="PCM_16")
    sf.write(src / "rates" / "deeper" / "r44k.flac", np.stack([sweep(44_100, 0.6, 500, seed=5)] * 2, 1), 44_100)
    sf.write(
        src / "formats" / "tone.mp3",
        sweep(SAMPLE_RATE, 0.6, 350, seed=7),
        SAMPLE_RATE,
        format="MP3",
        subtype="MPEG_LAYER_III",
    )
    sf.write(
        src / "formats" / "tone.ogg", sweep(SAMPLE_RATE, 0.6, 350, seed=8), SAMPLE_RATE, format="OGG", subtype="VORBIS"
    )
    for path in recordings:
        shutil.copy(path, src / "speech" / path.name)
    good = (src / "mono.wav").read_bytes()
    rng = np.random.default_rng(0)
    (src / "bad" / "corrupt.wav").write_bytes(good[:12] + rng.bytes(6000))  # RIFF/WAVE, then garbage chunks
    (src / "bad" / "text.mp3").write_text("these are words, not audio\n" * 40)
    (src / "bad" / "deeper" / "text.wav").write_text("these are words, not audio\n" * 40)
    (src / "bad" / "empty.wav").write_bytes(b"")
    (src / "bad" / "header_only.wav").write_bytes(good[:30])
    sf.write(src / "bad" / "short.wav", sweep(SAMPLE_RATE, 0.05), SAMPLE_RATE, subtype="PCM_16")
    (src / "notes.txt").write_text("not an input")
    (src / "speech" / f"sample_00_chirp.wav.999999{PARTIAL_SUFFIX}").write_bytes(good[:100])  # never an input
    return src


@pytest.fixture(scope="module")
def mixed(tiny_inplace, recordings, tmp_path_factory):
    """One `--text` run over the mixed folder; the model loader is counted."""
    from moshi_ttt.checkpoints import model as model_module

    root = tmp_path_factory.mktemp("mixed")
    src = write_mixed(root, recordings)
    out = root / "out"
    loads = []
    real = model_module.load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
        result = infer(tiny_inplace, src, out, "--text", env={"COLUMNS": "80"})
    # Parsed now: later tests rerun into the same folder and replace the report.
    return src, out, result, loads, report_of(out / REPORT_NAME)


def test_mixed_folder_processes_good_files_and_isolates_bad_ones(mixed) -> None:
    src, out, result, loads, report = mixed
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output  # some files failed
    assert len(loads) == 1  # one model load for the whole folder

    files = by_rel(report, src)
    assert sorted(files) == sorted([*GOOD, *FAILED, *SKIPPED])  # notes.txt and .partial are not inputs
    for rel in GOOD:
        assert files[rel]["status"] == "ok", (rel, files[rel]["reason"])
    for rel, reason in FAILED.items():
        assert files[rel]["status"] == "failed", rel
        assert reason in files[rel]["reason"] and files[rel]["reason"].strip(), (rel, files[rel]["reason"])
        assert "\n" not in files[rel]["reason"] and files[rel]["output"] is None
    for rel, reason in SKIPPED.items():
        assert files[rel]["status"] == "skipped" and reason in files[rel]["reason"]
    totals = report["totals"]
    assert (totals["files"], totals["ok"], totals["failed"], totals["skipped"]) == (
        len(GOOD) + len(FAILED) + len(SKIPPED),
        len(GOOD),
        len(FAILED),
        len(SKIPPED),
    )

    # Outputs mirror the input tree: a WAV and a transcript per good file, nothing for the others.
    expected = {REPORT_NAME}
    for rel in GOOD:
        expected |= {output_rel(rel), str(Path(output_rel(rel)).with_suffix(".txt"))}
    assert set(files_under(out)) == expected
    assert partials(out) == []
    for rel in GOOD:
        source, wav = src / rel, out / output_rel(rel)
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1), rel
        assert info.frames == files[rel]["frames"] * FRAME_SIZE, rel
        assert files[rel]["output"] == str(wav)
        assert wav.with_suffix(".txt").read_text().endswith("\n")
        if source.suffix == ".wav" and sf.info(str(source)).samplerate == SAMPLE_RATE:
            assert info.frames == expected_samples(source), rel

    # Channel 0 of the stereo file is exactly the mono file.
    assert (out / "stereo.wav").read_bytes() == (out / "mono.wav").read_bytes()
    assert (out / "stereo.txt").read_text() == (out / "mono.txt").read_text()
    assert (out / "mono.wav").read_bytes() != (out / "depth" / "s16.wav").read_bytes()


def test_mixed_folder_ttt_numbers_and_settings(mixed, tiny_inplace) -> None:
    src, out, result, _, report = mixed
    assert report["schema"] == REPORT_SCHEMA
    settings = report["settings"]
    assert settings["base"] == str(tiny_inplace.base) and settings["checkpoint"] == str(tiny_inplace.finetune)
    assert (settings["device"], settings["dtype"], settings["seed"]) == ("cpu", "float32", 4242)
    assert settings["ttt"]["variant"] == "inplace" and settings["ttt"]["enabled"] is True
    chunk = settings["ttt"]["chunk_size"]
    for rel, f in by_rel(report, src).items():
        if f["status"] != "ok":
            assert f["ttt"] is None
            continue
        assert f["ttt"]["chunk_size"] == chunk and f["ttt"]["variant"] == "inplace"
        assert [layer["layer"] for layer in f["ttt"]["layers"]] == settings["ttt"]["layers"]
        for layer in f["ttt"]["layers"]:
            assert layer["tokens"] == f["steps"]
            assert layer["updates"] == math.ceil(f["steps"] / chunk), rel
            assert layer["pending_tokens"] == 0
            assert layer["drift"] > 0


def test_progress_is_plain_log_lines_when_not_a_terminal(mixed) -> None:
    src, out, result, _, report = mixed
    assert not ANSI.search(result.output)
    lines = result.stdout.splitlines()
    total = len(report["files"])
    for i, f in enumerate(report["files"]):
        # One whole line per event, even for paths longer than the 80-column console.
        if f["status"] == "ok":
            assert any(line.startswith(f"[{i + 1}/{total}] {f['input']} (") for line in lines), f["input"]
            assert any(line.startswith(f"ok {f['input']} -> {f['output']} (") for line in lines), f["input"]
        else:
            assert f"{f['status']} {f['input']}: {f['reason']}" in lines, f["input"]
    assert any(line.startswith(f"{total} files: ") for line in lines)
    assert f"report: {out / REPORT_NAME}" in lines


def test_terminal_gets_progress_bars_instead_of_log_lines(tmp_path: Path) -> None:
    for terminal in (True, False):
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=terminal, width=200)
        events = render.make_events(console, Console(file=io.StringIO()), quiet=False, details=False)
        job = Job(tmp_path / "a.wav", tmp_path / "out.wav")
        with events:
            events.file_started(0, 1, job, 2.0)
            events.frames_done(0, 12, 25)
            events.file_finished(0, 1, FileResult(str(job.input), str(job.output), "ok", duration_s=2.0, wall_s=0.5))
        text = ANSI_SEQUENCE.sub("", buffer.getvalue())
        assert events.live is terminal
        assert (f"[1/1] {job.input}" in text) is not terminal  # plain log line only without a terminal
        assert f"ok {job.input} -> {job.output}" in text
    quiet, errors = io.StringIO(), io.StringIO()
    events = render.make_events(Console(file=quiet), Console(file=errors, width=200), quiet=True, details=True)
    with events:
        events.file_started(0, 1, job, 2.0)
        events.file_finished(0, 1, FileResult(str(job.input), str(job.output), "ok", duration_s=2.0))
        events.file_finished(0, 1, FileResult(str(job.input), None, "failed", "empty file"))
    assert quiet.getvalue() == ""
    # --quiet silences progress, not failures: each failed file is one line on stderr.
    assert ANSI_SEQUENCE.sub("", errors.getvalue()).splitlines() == [f"failed {job.input}: empty file"]


def test_rerun_skips_finished_files_and_quiet_prints_nothing(mixed, tiny_inplace) -> None:
    src, out, _, _, _ = mixed
    before = {rel: (out / rel).read_bytes() for rel in files_under(out) if not rel.endswith(".json")}
    result = infer(tiny_inplace, src, out, "--text", "--quiet")
    assert_no_traceback(result)
    assert result.exit_code == 1  # the bad files still fail
    assert result.stdout == ""
    first = by_rel(mixed[4], src)
    files = by_rel(report_of(out / REPORT_NAME), src)
    for rel in GOOD:
        assert (files[rel]["status"], files[rel]["reason"]) == ("skipped", "exists"), rel
        # The run that wrote the output still describes it.
        assert files[rel]["from_earlier_run"] is True and files[rel]["ttt"] == first[rel]["ttt"], rel
    assert all(files[rel]["status"] == "failed" for rel in FAILED)
    assert {rel: (out / rel).read_bytes() for rel in before} == before

    # --glob narrows; --overwrite redoes, with the same bytes (same seed, fresh state per file, and
    # the batch size the report says the first run used: auto would pick 1 for a single file).
    batch_size = mixed[4]["settings"]["batch_size"]
    assert batch_size > 1
    result = infer(tiny_inplace, src, out, "--glob", "*.flac", "--overwrite", "--quiet", "--batch-size", batch_size)
    assert result.exit_code == 0 and result.stdout == ""
    report = report_of(out / REPORT_NAME)
    flac = str(src / "rates/deeper/r44k.flac")
    assert [(f["input"], f["status"]) for f in report["files"]][0] == (flac, "ok")
    # The other files of OUT are still described, by the runs that wrote them.
    others = {f["input"]: f for f in report["files"][1:]}
    assert sorted(others) == sorted(str(src / rel) for rel in GOOD if str(src / rel) != flac)
    assert all(
        f["from_earlier_run"] and f["ttt"] == first[Path(f["input"]).relative_to(src).as_posix()]["ttt"]
        for f in others.values()
    )
    assert set(files_under(out)) == set(before) | {REPORT_NAME}
    assert (out / "rates/deeper/r44k.wav").read_bytes() == before["rates/deeper/r44k.wav"]


def test_single_file_alone_matches_it_after_other_files(mixed, tiny_inplace, tmp_path: Path) -> None:
    src, out, _, _, folder_report = mixed
    rel = "speech/sample_02_noise_bursts.wav"  # processed after most other recordings in the folder run
    target = tmp_path / "alone.wav"
    # At the folder run's batch size (the report says which): streams beside a file change nothing.
    result = infer(
        tiny_inplace,
        src / rel,
        target,
        "--text",
        "--report",
        tmp_path / "r.json",
        "--batch-size",
        folder_report["settings"]["batch_size"],
    )
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == (out / Path(rel).with_suffix(".wav")).read_bytes()
    assert target.with_suffix(".txt").read_text() == (out / Path(rel).with_suffix(".txt")).read_text()
    assert "TTT layers" in result.stdout  # per-layer table by default for a single file
    single = report_of(tmp_path / "r.json")
    assert [f["status"] for f in single["files"]] == ["ok"]
    assert single["totals"]["files"] == 1
    in_folder = by_rel(folder_report, src)[rel]
    # Same TTT counts; the norms to rounding (streams whose chunks fill at the same step of the
    # folder run commit in one batched update, which BLAS sums in another order).
    for mine, theirs in zip(single["files"][0]["ttt"]["layers"], in_folder["ttt"]["layers"], strict=True):
        floats = {k for k, v in theirs.items() if isinstance(v, float)}
        assert {k: v for k, v in mine.items() if k not in floats} == {
            k: v for k, v in theirs.items() if k not in floats
        }
        assert {k: mine[k] for k in floats} == pytest.approx({k: theirs[k] for k in floats}, rel=1e-5)
    assert (single["files"][0]["frames"], single["files"][0]["steps"]) == (in_folder["frames"], in_folder["steps"])

    # Into an existing folder, no report unless asked; another seed gives another answer.
    folder = tmp_path / "dir"
    folder.mkdir()
    result = infer(tiny_inplace, src / rel, folder, "--seed", "7", "--quiet")
    assert result.exit_code == 0 and result.stdout == ""
    assert files_under(folder) == ["sample_02_noise_bursts.wav"]
    assert (folder / "sample_02_noise_bursts.wav").read_bytes() != target.read_bytes()


def test_no_ttt_is_an_ablation_with_zero_updates(mixed, tiny_inplace, tmp_path: Path) -> None:
    src, out, _, _, _ = mixed
    result = infer(
        tiny_inplace, src / "mono.wav", tmp_path / "frozen.wav", "--no-ttt", "--quiet", "--report", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    report = report_of(tmp_path / "r.json")
    assert report["settings"]["ttt"]["enabled"] is False
    f = report["files"][0]
    assert f["status"] == "ok"
    for layer in f["ttt"]["layers"]:
        assert layer["tokens"] == f["steps"] and layer["pending_tokens"] == 0
        assert layer["updates"] == 0 and layer["drift"] == 0 and layer["relative_drift"] == 0
        assert layer["norm_final"] == layer["norm_initial"]
    assert (tmp_path / "frozen.wav").read_bytes() != (out / "mono.wav").read_bytes()


def test_single_bad_file_fails_with_exit_1_and_short_file_is_skipped(mixed, tiny_inplace, tmp_path: Path) -> None:
    src, _, _, _, _ = mixed
    result = infer(tiny_inplace, src / "bad/empty.wav", tmp_path / "x.wav")
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert f"failed {src / 'bad/empty.wav'}: empty file" in result.stdout.splitlines()
    assert not (tmp_path / "x.wav").exists()

    folder = tmp_path / "short_only"
    folder.mkdir()
    shutil.copy(src / "bad/short.wav", folder / "short.wav")
    shutil.copy(src / "depth/float.wav", folder / "float.wav")
    result = infer(tiny_inplace, folder, tmp_path / "o", "--quiet")
    assert result.exit_code == 0  # skipped is not failed
    statuses = {Path(f["input"]).name: f["status"] for f in report_of(tmp_path / "o" / REPORT_NAME)["files"]}
    assert statuses == {"short.wav": "skipped", "float.wav": "ok"}


# -- usage, checkpoint and config errors: exit 2, one line, nothing written --------------------------


def _broken_checkpoint(tiny, root: Path, how: str) -> Path:
    target = root / f"ckpt_{how}"
    shutil.copytree(tiny.finetune, target)
    config = next(target.rglob("config.json"))
    if how == "json":
        config.write_text("{not json")
    else:
        weights = next(target.rglob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    return target


@pytest.mark.parametrize(
    "case",
    [
        "missing_input",
        "no_audio",
        "glob_matches_nothing",
        "folder_to_file",
        "missing_checkpoint",
        "malformed_config",
        "truncated_weights",
        "missing_base",
        "zero_threads",
    ],
)
def test_errors_before_any_file_exit_2_with_one_line(case, tiny_inplace, recordings, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(recordings[0], src / "a.wav")
    out = tmp_path / "out"
    base, checkpoint, extra = str(tiny_inplace.base), str(tiny_inplace.finetune), []
    if case == "missing_input":
        src = tmp_path / "nowhere"
    elif case == "no_audio":
        (src / "a.wav").unlink()
        (src / "notes.txt").write_text("x")
    elif case == "glob_matches_nothing":
        extra = ["--glob", "*.flac"]
    elif case == "folder_to_file":
        out = tmp_path / "file.wav"
        out.write_bytes(b"keep")
    elif case == "missing_checkpoint":
        checkpoint = str(tmp_path / "no_checkpoint")
    elif case in ("malformed_config", "truncated_weights"):
        how = "json" if case == "malformed_config" else "weights"
        checkpoint = str(_broken_checkpoint(tiny_inplace, tmp_path, how))
    elif case == "missing_base":
        base = str(tmp_path / "no_base")
    elif case == "zero_threads":
        extra = ["--threads", "0"]
    result = CliRunner().invoke(
        app, ["infer", str(src), str(out), "--base", base, "--checkpoint", checkpoint, "--device", "cpu", *extra]
    )
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if case == "folder_to_file":
        assert out.read_bytes() == b"keep"
    else:
        assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [["infer"], ["infer", "a.wav"], ["infer", "a", "b", "--dtype", "int8"], ["infer", "a", "b", "--no-such-option"]],
)
def test_usage_errors_exit_2_without_traceback(argv) -> None:
    result = CliRunner().invoke(app, argv)
    assert_no_traceback(result)
    assert result.exit_code == 2


# -- stale temporaries ---------------------------------------------------------------------------


def _temporaries_of_a_killed_run(targets: list[Path]) -> list[Path]:
    """What a run killed mid-write leaves: real temporaries of `atomic_output`, from a process
    that is gone (os._exit skips every cleanup, as kill -9 does)."""
    code = (
        "import os, sys, contextlib\nfrom pathlib import Path\nfrom moshi_ttt.jobs.files import atomic_output\n"
        "with contextlib.ExitStack() as stack:\n"
        "    for name in sys.argv[1:]:\n"
        "        tmp = stack.enter_context(atomic_output(Path(name)))\n"
        "        tmp.write_bytes(b'RIFF half a file')\n"
        "        print(tmp, flush=True)\n"
        "    os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, targets)], capture_output=True, text=True, check=True)
    return [Path(line) for line in done.stdout.splitlines()]


def test_stale_partials_are_never_inputs_and_only_ours_are_cleaned_up(tiny_inplace, recordings, tmp_path: Path) -> None:
    from moshi_ttt.jobs.files import atomic_output

    src, out = tmp_path / "in", tmp_path / "in" / "out"  # outputs inside the input folder
    src.mkdir()
    shutil.copy(recordings[0], src / "a.wav")
    stale = _temporaries_of_a_killed_run([src / "x.wav", out / "b.wav", out / "sub" / REPORT_NAME])
    assert all(p.exists() and p.name.startswith(".") for p in stale)
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    # A user's files that only look like temporaries: the old `<name>.<pid>.partial` pattern, a
    # plain `.partial`, and a link named exactly like ours: none of them is ours to delete.
    users = [out / f"c.wav.999999{PARTIAL_SUFFIX}", out / f"notes{PARTIAL_SUFFIX}"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF a user's file")
    link = stale[1].with_name(stale[1].name.replace("b.wav", "d.wav"))
    link.symlink_to(victim)
    with atomic_output(out / "e.wav") as alive:  # a live process's temporary (this one's)
        alive.write_bytes(b"RIFF being written")
        for _ in range(2):  # the second run must not take the first run's outputs as inputs
            result = infer(tiny_inplace, src, out, "--quiet")
            assert result.exit_code == 0, result.output
            assert [f["input"] for f in report_of(out / REPORT_NAME)["files"]] == [str(src / "a.wav")]
        assert alive.exists()
    assert stale[0].exists()  # the input folder is not touched
    assert not stale[1].exists() and not stale[2].exists()  # a dead run's temporaries in OUT are gone
    assert all(p.read_bytes() == b"RIFF a user's file" for p in users)
    assert link.is_symlink() and victim.read_text() == "a user's file"


# -- real interruptions of a running process ----------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])  # SIGTERM stops as Ctrl-C
def test_sigint_stops_cleans_up_and_writes_the_report(sig, code, tiny_inplace, long_recordings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = start_and_wait_for_finished_files(tiny_inplace, long_recordings, out, tmp_path / "log")
    try:
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "log").read_text()
    assert rc == code, log
    assert "Traceback" not in log
    assert any(line.startswith("interrupted: ") and line.endswith("are kept") for line in log.splitlines()), log
    report = report_of(out / REPORT_NAME)
    assert report["interrupted"] is True
    ok = [f for f in report["files"] if f["status"] == "ok"]
    assert 1 <= len(ok) < N_LONG  # it stopped
    assert partials(out) == []  # the current file's temporary was removed
    assert not (out / LOCK_NAME).exists()  # the lock on OUT was released
    on_disk = check_outputs_complete(long_recordings, out)
    assert {str(out / rel) for rel in on_disk} >= {f["output"] for f in ok}
    assert len(on_disk) < N_LONG


def test_kill_9_loses_nothing_finished_and_a_rerun_completes(tiny_inplace, long_recordings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = start_and_wait_for_finished_files(tiny_inplace, long_recordings, out, tmp_path / "log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    report = report_of(out / REPORT_NAME)  # parses: replaced atomically, never half-written
    assert "interrupted" not in report  # nobody got to say so
    finished = {f["input"]: f for f in report["files"] if f["status"] == "ok"}
    assert 1 <= len(finished) < N_LONG
    on_disk = check_outputs_complete(long_recordings, out)  # every final .wav is whole
    assert {str(out / rel) for rel in on_disk} >= {f["output"] for f in finished.values()}
    assert len(on_disk) < N_LONG

    result = infer(tiny_inplace, long_recordings, out, "--quiet")
    assert result.exit_code == 0, result.output
    rerun = report_of(out / REPORT_NAME)
    assert "interrupted" not in rerun and len(rerun["files"]) == N_LONG
    for f in rerun["files"]:
        if f["input"] in finished:
            assert (f["status"], f["reason"]) == ("skipped", "exists")
        else:
            assert f["status"] in ("ok", "skipped"), f
    assert sum(f["status"] == "ok" for f in rerun["files"]) >= N_LONG - len(on_disk)
    assert len(check_outputs_complete(long_recordings, out)) == N_LONG
    assert partials(out) == []

    # What the killed process finished is what an uninterrupted run writes.
    first = next(iter(finished.values()))
    result = infer(
        tiny_inplace, first["input"], tmp_path / "ref.wav", "--quiet", "--batch-size", report["settings"]["batch_size"]
    )
    assert result.exit_code == 0
    assert (tmp_path / "ref.wav").read_bytes() == Path(first["output"]).read_bytes()


def test_delta_clip_option_overrides_the_checkpoint(mixed, tiny_inplace, tmp_path: Path) -> None:
    src, _, _, _, _ = mixed
    runs = {}
    for name, clip_args in (("tight", ["--delta-clip", "1e-5"]), ("off", ["--delta-clip", "none"]), ("checkpoint", [])):
        result = infer(
            tiny_inplace,
            src / "speech/sample_01_vibrato.wav",
            tmp_path / f"{name}.wav",
            *clip_args,
            "--report",
            tmp_path / f"{name}.json",
        )
        assert result.exit_code == 0, result.output
        runs[name] = report_of(tmp_path / f"{name}.json")
        # The per-file table and the summary both show the clip events.
        assert re.search(r"\bclipped\b", result.stdout), result.stdout
    tight, off = runs["tight"], runs["off"]
    assert tight["settings"]["ttt"]["delta_clip"] == 1e-5 and off["settings"]["ttt"]["delta_clip"] is None
    assert tight["settings"]["ttt"]["delta_clip_origin"] == "--delta-clip"
    for layer in tight["files"][0]["ttt"]["layers"]:
        assert layer["clipped_updates"] == layer["updates"] > 0
    for layer in off["files"][0]["ttt"]["layers"]:
        assert layer["clipped_updates"] == 0 and layer["updates"] > 0
    # The checkpoint's own tau (400) clips some updates only.
    assert runs["checkpoint"]["settings"]["ttt"]["delta_clip_origin"] == "config"
    assert any(
        0 < layer["clipped_updates"] < layer["updates"] for layer in runs["checkpoint"]["files"][0]["ttt"]["layers"]
    )
    assert (tmp_path / "tight.wav").read_bytes() != (tmp_path / "off.wav").read_bytes()

    bad = infer(tiny_inplace, src / "mono.wav", tmp_path / "x.wav", "--delta-clip", "lots")
    assert_no_traceback(bad)
    assert bad.exit_code == 2 and "--delta-clip must be a number or 'none'" in bad.output
    assert not (tmp_path / "x.wav").exists()
