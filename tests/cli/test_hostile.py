"""Hostile inputs and environments: sources are never touched, history is never lost.

Black-box through the CLI (in a subprocess where the case is about the process: working folder,
signals, locks), asserting on files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import files_under, partials, sweep
from helpers.cli import (
    assert_no_traceback,
    check_outputs_complete,
    cli_command,
    infer,
    one_error_line,
    report_of,
    start_and_wait_for_finished_files,
)
from moshi_ttt.checkpoints.tiny import TinyPaths
from moshi_ttt.errors import AudioError
from moshi_ttt.jobs.audio import read_audio, write_audio
from moshi_ttt.jobs.files import FRAME_SIZE, PARTIAL_SUFFIX, SAMPLE_RATE, _umask, atomic_output
from moshi_ttt.jobs.guard import LOCK_NAME
from moshi_ttt.report.schema import REPORT_NAME, FileResult, Report, RunSettings


def checksums(folder: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in files_under(folder)}


def strict(text: str) -> dict:
    """Parse as strict JSON: bare NaN / Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def run_cli(tiny, *args: object, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(tiny, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def edit_finetune_config(tiny, dest: Path, **changes) -> Path:
    """A copy of the tiny In-Place fine-tune with its `ttt_config` changed."""
    shutil.copytree(tiny.finetune, dest)
    config = next(dest.rglob("config.json"))
    data = json.loads(config.read_text())
    data["ttt_config"].update(changes)
    config.write_text(json.dumps(data))  # json writes NaN / Infinity / 1e12 as Python reads them back
    return dest


@pytest.fixture
def rec(recordings, tmp_path: Path) -> Path:
    folder = tmp_path / "rec"
    folder.mkdir()
    shutil.copy(recordings[0], folder / "a.wav")
    return folder


# -- 1. relative paths: a resume never takes its own outputs as inputs --------------------------------


def test_resume_from_relative_paths_does_not_reprocess_outputs(tiny_inplace, rec) -> None:
    for _ in range(2):
        done = run_cli(tiny_inplace, ".", "out", "--quiet", cwd=rec)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert files_under(rec) == ["a.wav", "out/a.wav", f"out/{REPORT_NAME}"]  # no out/out/a.wav
    files = report_of(rec / "out" / REPORT_NAME)["files"]
    assert [(f["input"], f["status"], f["reason"], f["from_earlier_run"]) for f in files] == [
        (str(rec / "a.wav"), "skipped", "exists", True)
    ]


# -- 2. sources are never written ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "out_is_in",
        "out_is_in_spelled_differently",
        "file_onto_itself",
        "file_onto_itself_no_flags",
        "output_links_to_input",
        "report_is_input",
        "output_is_input_of_nested_tree",
    ],
)
def test_an_output_or_report_that_is_a_source_is_refused(
    case, tiny_inplace, recordings, tmp_path: Path, monkeypatch
) -> None:
    d = tmp_path / "d"
    (d / "rec").mkdir(parents=True)
    shutil.copy(recordings[0], d / "a.wav")
    shutil.copy(recordings[1], d / "b.wav")
    sf.write(d / "x.flac", sweep(SAMPLE_RATE, 0.5), SAMPLE_RATE)
    shutil.copy(recordings[2], d / "rec" / "c.wav")
    args = {
        "out_is_in": [d, d, "--overwrite"],
        "out_is_in_spelled_differently": [d, tmp_path / "d" / "rec" / ".." / "", "--overwrite"],
        "file_onto_itself": [d / "x.flac", d / "x.flac", "--overwrite"],
        "file_onto_itself_no_flags": [d / "x.flac", d / "x.flac"],
        "output_links_to_input": [d / "a.wav", tmp_path / "link.wav", "--overwrite"],
        "report_is_input": [d, tmp_path / "out", "--report", d / "b.wav"],
        # IN = d/rec inside OUT = d: rec/c.wav would be written over by the output of d/rec/rec/c.wav
        "output_is_input_of_nested_tree": [d / "rec", d, "--overwrite"],
    }[case]
    if case == "output_links_to_input":
        (tmp_path / "link.wav").symlink_to(d / "a.wav")
    if case == "output_is_input_of_nested_tree":
        (d / "rec" / "rec").mkdir()
        shutil.copy(recordings[0], d / "rec" / "rec" / "c.wav")
    before = checksums(tmp_path)
    from moshi_ttt.checkpoints import model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    line = one_error_line(infer(tiny_inplace, *args))
    assert "input" in line
    assert checksums(tmp_path) == before  # nothing written, nothing replaced, no stray file


# -- 3. a resume keeps the history: earlier results, transcripts -----------------------------------


def test_rerun_keeps_earlier_results_and_writes_missing_transcripts(tiny_inplace, recordings, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for path in recordings:
        shutil.copy(path, src / path.name)
    a, b, c = sorted(p.name for p in src.iterdir())
    # An interrupted run: only `a` was finished (the kill -9 test in test_cli interrupts for real).
    assert infer(tiny_inplace, src, out, "--glob", a, "--quiet").exit_code == 0
    first = report_of(out / REPORT_NAME)["files"][0]
    # An output from elsewhere, with no earlier result to describe it.
    shutil.copy(out / a, out / b)

    result = infer(tiny_inplace, src, out, "--text", "--quiet")
    assert result.exit_code == 0, result.output
    files = {Path(f["input"]).name: f for f in strict((out / REPORT_NAME).read_text())["files"]}
    assert len(files) == 3
    kept = files[a]
    assert (kept["status"], kept["from_earlier_run"]) == ("skipped", True)
    assert kept["ttt"] == first["ttt"] and kept["ttt"]["layers"][0]["updates"] > 0
    assert (kept["duration_s"], kept["steps"], kept["transcript"]) == (
        first["duration_s"],
        first["steps"],
        first["transcript"],
    )
    assert "transcript written from the earlier run" in kept["reason"]
    assert (out / a).with_suffix(".txt").read_text() == first["transcript"] + "\n"
    assert files[b]["status"] == "skipped" and not files[b]["from_earlier_run"] and files[b]["ttt"] is None
    assert "--overwrite" in files[b]["reason"] and not (out / b).with_suffix(".txt").exists()
    assert files[c]["status"] == "ok" and (out / c).with_suffix(".txt").read_text() == files[c]["transcript"] + "\n"

    # A recomputed transcript is the one the report kept.
    result = infer(tiny_inplace, src, out, "--glob", a, "--text", "--overwrite", "--quiet")
    assert result.exit_code == 0
    assert (out / a).with_suffix(".txt").read_text() == first["transcript"] + "\n"
    others = {Path(f["input"]).name: f for f in report_of(out / REPORT_NAME)["files"][1:]}
    assert sorted(others) == [b, c]  # the other files of OUT are still described
    assert others[c]["ttt"] == files[c]["ttt"] and others[b]["ttt"] is None


# -- 4. report and output locations: checked before loading, failures later are one line ---------


@pytest.mark.parametrize(
    "case", ["report_under_a_file", "out_under_a_file", "report_is_a_folder", "report_is_someone_elses_file"]
)
def test_unwritable_out_or_report_is_refused_before_loading(case, tiny_inplace, rec, tmp_path: Path) -> None:
    blocker = tmp_path / "plain.txt"
    blocker.write_text("a regular file")
    out, extra = tmp_path / "out", []
    if case == "report_under_a_file":
        extra = ["--report", blocker / "r.json"]
    elif case == "out_under_a_file":
        out = blocker / "out"
    elif case == "report_is_a_folder":
        (tmp_path / "r.json").mkdir()
        extra = ["--report", tmp_path / "r.json"]
    else:
        extra = ["--report", blocker]
    before = checksums(tmp_path)
    one_error_line(infer(tiny_inplace, rec, out, *extra))
    assert checksums(tmp_path) == before and not out.exists()


def test_report_failing_mid_run_is_one_line_and_the_run_goes_on(tiny_inplace, long_recordings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = start_and_wait_for_finished_files(tiny_inplace, long_recordings, out, tmp_path / "log")
    # The report's name becomes a non-empty folder: every later write of the report fails.
    (out / REPORT_NAME).unlink()
    (out / REPORT_NAME).mkdir()
    (out / REPORT_NAME / "keep").write_text("x")
    rc = proc.wait(timeout=300)
    log = (tmp_path / "log").read_text()
    assert rc == 3, log
    assert "Traceback" not in log
    assert sum("cannot write the report" in line for line in log.splitlines()) == 2, log  # when it starts, at the end
    assert len(check_outputs_complete(long_recordings, out)) == 6  # every file was still made
    assert partials(out) == []


# -- 5. non-finite settings, weights and numbers ----------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", -0.1),
        ("delta_clip", float("nan")),
        ("delta_clip_fro_norm", float("nan")),
        ("delta_clip_fro_norm", float("inf")),
    ],
)
def test_non_finite_or_out_of_range_ttt_settings_are_refused(key, value, tiny_inplace, rec, tmp_path: Path) -> None:
    checkpoint = edit_finetune_config(tiny_inplace, tmp_path / "ckpt", **{key: value})
    result = infer(tiny_inplace, rec, tmp_path / "out", checkpoint=checkpoint)
    line = one_error_line(result)
    assert key in line and "config.json" in line
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(tiny_inplace, rec, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_inplace.finetune, checkpoint)
    weights_path = next(checkpoint.rglob("lora.safetensors"))
    weights = load_file(str(weights_path))
    name = sorted(weights)[-1]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(weights_path))
    result = infer(tiny_inplace, rec, tmp_path / "out", checkpoint=checkpoint)
    line = one_error_line(result)
    assert name in line and "lora.safetensors" in line and "NaN" in line


def test_report_is_strict_json_whatever_the_numbers(tmp_path: Path) -> None:
    layer = {"layer": 1, "drift": float("nan"), "relative_drift": float("inf"), "norm_final": -float("inf")}
    report = Report(
        settings=RunSettings(base="b", checkpoint=None, seed=1),
        files=[FileResult("a.wav", "a.out.wav", "ok", duration_s=1.0, ttt={"layers": [layer]})],
    )
    report.write(tmp_path / "r.json")
    data = strict((tmp_path / "r.json").read_text())
    assert data["files"][0]["ttt"]["layers"][0] == {
        "layer": 1,
        "drift": None,
        "relative_drift": None,
        "norm_final": None,
    }


# -- 6. settings checked before anything loads ------------------------------------------------------


@pytest.mark.parametrize("case", ["seed_negative", "seed_2_64", "chunk_1e12", "chunk_1e6", "chunk_inf"])
def test_bad_settings_exit_2_before_loading(case, tiny_inplace, rec, tmp_path: Path, monkeypatch) -> None:
    from moshi_ttt.checkpoints import model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    checkpoint, extra = tiny_inplace.finetune, []
    if case.startswith("seed"):
        extra = ["--seed", "-1" if case == "seed_negative" else str(2**64)]
    else:
        size = {"chunk_1e12": 1e12, "chunk_1e6": 1e6, "chunk_inf": float("inf")}[case]
        checkpoint = edit_finetune_config(tiny_inplace, tmp_path / "ckpt", chunk_size=size)
    result = infer(tiny_inplace, rec, tmp_path / "out", *extra, checkpoint=checkpoint)
    line = one_error_line(result)
    assert ("--seed" if case.startswith("seed") else "chunk") in line
    assert not (tmp_path / "out").exists()


# -- 7. a TTT section that picks no layer -------------------------------------------------------------


def test_enabled_ttt_that_picks_no_layer_is_an_error(tiny_inplace, rec, tmp_path: Path) -> None:
    checkpoint = edit_finetune_config(tiny_inplace, tmp_path / "ckpt", start_layer=99)
    result = infer(tiny_inplace, rec, tmp_path / "out", checkpoint=checkpoint)
    assert "picks no layer" in one_error_line(result)


# -- 8. sample rates -----------------------------------------------------------------------------------


def test_low_rates_are_refused_and_resampled_lengths_are_exact(tmp_path: Path) -> None:
    tiny_rate = tmp_path / "one_hz.wav"
    sf.write(tiny_rate, np.full(50, 0.1), 1, subtype="PCM_16")
    assert tiny_rate.stat().st_size < 200
    begin = time.perf_counter()
    with pytest.raises(AudioError, match="sample rate 1 Hz is below the 4000 Hz minimum"):
        read_audio(tiny_rate)
    assert time.perf_counter() - begin < 1

    for rate in (8_000, 11_025, 16_000, 22_050, 44_100, 48_000):
        for n in (100, 4_001, 20_011):
            pcm = np.zeros(n)
            click = n // 3
            pcm[click] = 0.9
            path = tmp_path / f"r{rate}_{n}.wav"
            sf.write(path, pcm, rate, subtype="FLOAT")
            expected = round(n * SAMPLE_RATE / rate)
            if expected < FRAME_SIZE:
                continue  # too short to stream: skipped, tested elsewhere
            out = read_audio(path)
            assert len(out) == expected, (rate, n, len(out))
            # Time-aligned: the click is where it was, not pushed back by the resampler's delay.
            assert abs(int(np.argmax(np.abs(out))) - round(click * SAMPLE_RATE / rate)) <= 2, (rate, n)


# -- 9. temporaries: exclusive, unpredictable, never through a link -----------------------------------


def test_a_link_planted_at_a_temporary_name_redirects_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "x.wav"
    target.parent.mkdir()
    # The names the old scheme (`<name>.<pid>.partial`) would have used, planted as links.
    for name in (f"x.wav.{os.getpid()}{PARTIAL_SUFFIX}", f".x.wav.{os.getpid()}{PARTIAL_SUFFIX}"):
        (target.parent / name).symlink_to(victim)
    names = []
    for _ in range(2):
        with atomic_output(target) as tmp:
            names.append(tmp)
            assert tmp.parent == target.parent and tmp.name.startswith(".") and not tmp.is_symlink()
            assert (tmp.stat().st_mode & 0o777) == (0o666 & ~_umask())
            tmp.write_bytes(b"ours")
    assert names[0] != names[1]  # unpredictable
    assert target.read_bytes() == b"ours" and victim.read_text() == "precious"
    write_audio(target, np.zeros(FRAME_SIZE, dtype=np.float32))
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in target.parent.iterdir() if not p.is_symlink()) == ["x.wav"]


# -- 10. SIGTERM like SIGINT (test_cli.test_sigint_stops_...[SIGTERM]); Ctrl-C at start-up is one line --


def test_ctrl_c_during_start_up_is_one_line(tiny_inplace, rec, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        cli_command(tiny_inplace, rec, tmp_path / "out"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # inside `import torch` (several seconds on a small machine)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr
    assert not (tmp_path / "out").exists()


# -- 11. one run per output folder ----------------------------------------------------------------------


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tiny_inplace, rec, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(
        cli_command(tiny_inplace, rec, out, "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK_NAME).exists() and f"pid {first.pid}" in (out / LOCK_NAME).read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test needs
        second = run_cli(tiny_inplace, rec, out)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert f"pid {first.pid}" in second.stderr and "in use by another moshi-ttt run" in second.stderr
        first.send_signal(signal.SIGKILL)  # a crash: the lock file stays behind, stale
        first.wait(timeout=60)
    finally:
        first.kill()
    assert (out / LOCK_NAME).exists()
    third = run_cli(tiny_inplace, rec, out, "--quiet")
    assert third.returncode == 0, third.stderr
    assert files_under(out) == ["a.wav", REPORT_NAME]  # lock released and removed


# -- 12. junk inputs --------------------------------------------------------------------------------------


def test_hidden_and_appledouble_files_are_not_recordings(tiny_inplace, recordings, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / ".cache").mkdir(parents=True)
    shutil.copy(recordings[0], src / "a.wav")
    shutil.copy(recordings[1], src / ".hidden.wav")
    shutil.copy(recordings[2], src / ".cache" / "c.wav")
    (src / "._a.wav").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # macOS AppleDouble metadata
    result = infer(tiny_inplace, src, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert [Path(f["input"]).name for f in report_of(tmp_path / "out" / REPORT_NAME)["files"]] == ["a.wav"]
    result = infer(tiny_inplace, src, tmp_path / "all", "--quiet", "--include-hidden")
    assert result.exit_code == 0, result.output
    names = sorted(
        Path(f["input"]).relative_to(src).as_posix() for f in report_of(tmp_path / "all" / REPORT_NAME)["files"]
    )
    assert names == [".cache/c.wav", ".hidden.wav", "a.wav"]  # never ._a.wav


# -- smaller: folders named with a trailing slash, formats by extension, names shown escaped --------------


def test_output_folder_slash_format_by_extension_and_escaped_names(tiny_inplace, recordings, tmp_path: Path) -> None:
    src = recordings[0]
    result = infer(tiny_inplace, src, f"{tmp_path / 'newdir'}/", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "newdir").is_dir() and files_under(tmp_path / "newdir") == [f"{src.stem}.wav"]

    for ext, fmt in ((".flac", "FLAC"), (".mp3", "MP3")):
        result = infer(tiny_inplace, src, tmp_path / f"x{ext}", "--quiet")
        assert result.exit_code == 0, result.output
        info = sf.info(str(tmp_path / f"x{ext}"))
        assert (info.format, info.samplerate) == (fmt, SAMPLE_RATE)
    assert "cannot write .m4a" in one_error_line(infer(tiny_inplace, src, tmp_path / "x.m4a"))
    assert not (tmp_path / "x.m4a").exists()

    evil = tmp_path / "names" / "a\nb\x1b[31m[bold]c[red].wav"
    evil.parent.mkdir()
    shutil.copy(src, evil)
    result = infer(tiny_inplace, evil.parent, tmp_path / "names_out", "--no-details")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "a\\nb\\x1b[31m[bold]c[red].wav" in result.output


# -- 13. a failure of one file stays in its file -----------------------------------------------------------


def test_a_file_whose_fast_weights_diverge_fails_alone(tiny_inplace, tmp_path: Path) -> None:
    """At a learning rate this absurd (and no delta clip) silence drives the In-Place fast weights
    to Inf while loud noise does not: the update grows with what the layer hears. Streamed one at a
    time, the noise then takes the slot the silence left: it must come out as when it runs alone."""
    checkpoint = edit_finetune_config(tiny_inplace, tmp_path / "ckpt", learning_rate=4e35)
    tiny = TinyPaths(tiny_inplace.base, checkpoint)
    src = tmp_path / "rec"
    src.mkdir()
    sf.write(src / "a_silence.wav", np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    noise = np.random.default_rng(0).uniform(-0.9, 0.9, 2 * SAMPLE_RATE).astype(np.float32)
    sf.write(src / "b_noise.wav", noise, SAMPLE_RATE)
    result = infer(tiny, src, tmp_path / "out", "--batch-size", 1, "--delta-clip", "none", "--quiet")
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    files = {Path(f["input"]).name: f for f in report_of(tmp_path / "out" / REPORT_NAME)["files"]}
    assert files["a_silence.wav"]["status"] == "failed"
    assert re.fullmatch(
        r"TTT layer \d+: fast weights became NaN/Inf at update \d+ of \d+", files["a_silence.wav"]["reason"]
    )
    assert files["b_noise.wav"]["status"] == "ok"
    assert files_under(tmp_path / "out") == ["b_noise.wav", REPORT_NAME]

    alone = infer(tiny, src / "b_noise.wav", tmp_path / "alone.wav", "--batch-size", 1, "--delta-clip", "none")
    assert alone.exit_code == 0, alone.output
    assert (tmp_path / "out" / "b_noise.wav").read_bytes() == (tmp_path / "alone.wav").read_bytes()


@pytest.mark.parametrize("rate", [0, 2**31 - 1])
def test_a_wav_with_an_impossible_rate_fails_alone(rate, tiny_inplace, recordings, tmp_path: Path) -> None:
    """A WAV header with sample rate 0 makes the Rust decoder panic (pyo3's PanicException is a
    BaseException), and one saying 2^31-1 Hz once made the resampler allocate tens of GB: either
    is one failed entry with a one-line reason, refused from the header, and the run goes on."""
    src = tmp_path / "rec"
    src.mkdir()
    data = bytearray(recordings[0].read_bytes())
    at = data.find(b"fmt ") + 12  # the fmt chunk's sample rate
    data[at : at + 4] = rate.to_bytes(4, "little")
    (src / "a_rate0.wav").write_bytes(bytes(data))
    shutil.copy(recordings[1], src / "b.wav")
    result = infer(tiny_inplace, src, tmp_path / "out", "--batch-size", 2, "--quiet")
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    files = {Path(f["input"]).name: f for f in report_of(tmp_path / "out" / REPORT_NAME)["files"]}
    assert files["a_rate0.wav"]["status"] == "failed" and "\n" not in files["a_rate0.wav"]["reason"]
    assert "sample rate" in files["a_rate0.wav"]["reason"]
    assert files["b.wav"]["status"] == "ok"
    assert partials(tmp_path) == []
