"""Plumbing around a run: a closed stdout never stops the batch and exit codes speak only of
files; a single-file run cleans its own stale temporaries; another run's OUT inside IN is not
inputs; `plot` never writes onto a report, an input or an output.

Black-box through the CLI, in a subprocess where pipes and process ids are the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import files_under
from helpers.cli import assert_no_traceback, cli_command, infer, report_of
from moshi_ttt.jobs.files import PARTIAL_SUFFIX, TEMP_MARK
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt_cli.app import app


@pytest.fixture
def three(recordings, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for recording in recordings:
        shutil.copy(recording, folder / recording.name)
    return folder


def check_complete(out: Path, inputs: Path) -> None:
    """Every recording was streamed and the report says so, not interrupted."""
    report = report_of(out / REPORT_NAME)
    assert "interrupted" not in report
    assert sorted((Path(f["input"]).name, f["status"]) for f in report["files"]) == [
        (p.name, "ok") for p in sorted(inputs.glob("*.wav"))
    ]
    assert sorted(p for p in files_under(out) if p.endswith(".wav")) == sorted(p.name for p in inputs.glob("*.wav"))


# -- 1. a closed stdout never stops the batch -------------------------------------------------------------


def test_a_reader_that_goes_away_after_one_line_stops_nothing(tiny_inplace, three, tmp_path: Path) -> None:
    """`moshi-ttt infer ... | head -1`: the progress lines after the first go nowhere, the files
    are all streamed and the exit code is theirs."""
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    with open(log, "wb") as errors:
        proc = subprocess.Popen(
            cli_command(tiny_inplace, three, out, "--batch-size", "1"), stdout=subprocess.PIPE, stderr=errors
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does
        assert proc.wait(timeout=300) == 0, log.read_text()
    assert first.startswith(b"[1/3]"), first
    assert "Traceback" not in log.read_text() and "Broken" not in log.read_text()
    check_complete(out, three)


def test_json_into_a_closed_pipe_exits_as_its_files_did(tiny_inplace, three, tmp_path: Path) -> None:
    """`--json | true`: the summary line cannot be written; the run still exits 0."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli_command(tiny_inplace, three, out, "--json", "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `true` reads nothing
    errors = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, errors
    assert errors == ""
    check_complete(out, three)


def test_closed_standard_streams_stop_nothing(tiny_inplace, three, tmp_path: Path) -> None:
    """`moshi-ttt infer ... >&- 2>&-`: nothing to write to, the files are still streamed."""
    out = tmp_path / "out"
    command = " ".join(f"'{part}'" for part in cli_command(tiny_inplace, three, out))
    done = subprocess.run(f"{command} >&- 2>&-", shell=True, timeout=300)
    assert done.returncode == 0
    check_complete(out, three)


# -- 2. a single-file run cleans its own stale temporaries ------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_single_file_run_removes_its_own_stale_temporaries_only(tiny_inplace, recordings, tmp_path: Path) -> None:
    out = tmp_path / "o.wav"
    dead = dead_pid()

    def temporary(final: str, pid: int) -> Path:
        path = tmp_path / f".{final}{TEMP_MARK}{pid}-abcd1234{PARTIAL_SUFFIX}"
        path.write_bytes(b"half an output")
        return path

    killed = temporary("o.wav", dead)  # a run of the same output killed mid-way (kill -9)
    killed_text = temporary("o.txt", dead)
    others = [temporary("other.wav", dead), temporary("o.wav", os.getpid())]  # not ours / still alive
    result = infer(tiny_inplace, recordings[0], out, "--text", "--quiet")
    assert result.exit_code == 0, result.output
    assert not killed.exists() and not killed_text.exists()
    assert all(p.exists() for p in others)
    assert out.is_file() and out.with_suffix(".txt").is_file()


# -- 3. another run's OUT inside IN is not inputs ---------------------------------------------------------


def test_a_second_run_with_out_inside_in_takes_no_earlier_outputs(tiny_inplace, three) -> None:
    first = infer(tiny_inplace, three, three / "out", "--quiet")
    assert first.exit_code == 0, first.output
    for _ in range(2):  # and does not grow with every run
        second = infer(tiny_inplace, three, three / "out2", "--quiet")
        assert second.exit_code == 0, second.output
        assert sorted(Path(f["input"]).parent for f in report_of(three / "out2" / REPORT_NAME)["files"]) == [three] * 3
        assert not (three / "out2" / "out").exists()
    # Asked for, they are recordings like any other.
    taken = infer(tiny_inplace, three, three / "out3", "--quiet", "--include-outputs", "--glob", "out/*")
    assert taken.exit_code == 0, taken.output
    assert sorted(f["input"] for f in report_of(three / "out3" / REPORT_NAME)["files"]) == sorted(
        str(p) for p in (three / "out").glob("*.wav")
    )


def test_a_folder_holding_a_lock_is_not_inputs(tiny_inplace, three, recordings) -> None:
    (three / "running").mkdir()
    shutil.copy(recordings[0], three / "running" / "x.wav")
    (three / "running" / ".moshi-ttt.shard-0-of-2.lock").write_text("")
    jobs = report_of_run(tiny_inplace, three, three.parent / "out")
    assert "running" not in {Path(f["input"]).parent.name for f in jobs}


def report_of_run(tiny, src: Path, out: Path) -> list[dict]:
    result = infer(tiny, src, out, "--quiet")
    assert result.exit_code == 0, result.output
    return report_of(out / REPORT_NAME)["files"]


# -- 4. plot writes PNGs, never onto a report, an input or an output --------------------------------------


@pytest.fixture(scope="module")
def timeline_run(tiny_inplace, recordings, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timeline")
    shutil.copy(recordings[0], root / "a.wav")
    result = infer(tiny_inplace, root / "a.wav", root / "out" / "a.wav", "--timeline", "--report", root / "r.json")
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize(
    "target, reason",
    [
        ("r.json", "the figure is a PNG: name it .png"),
        ("a.wav", "the figure is a PNG: name it .png"),
        ("out/a.wav", "the figure is a PNG: name it .png"),
        ("report.png", "is the report being plotted"),
        ("link.png", "is an output listed in"),
        ("notes.png", "exists and is not a PNG figure"),
    ],
)
def test_plot_never_writes_onto_a_report_an_input_or_an_output(timeline_run: Path, target: str, reason: str) -> None:
    root = timeline_run
    (root / "notes.png").write_text("not a figure")
    shutil.copy(root / "r.json", root / "report.png")  # a report whose default figure is itself
    with_link = root / "link.png"
    if not with_link.is_symlink():
        with_link.symlink_to(root / "out" / "a.wav")
    report = root / ("report.png" if target == "report.png" else "r.json")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    args = ["plot", str(report)] + ([] if target == "report.png" else ["-o", str(root / target)])
    result = CliRunner().invoke(app, args)
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    assert reason in result.output and result.output.strip().count("\n") == 0, result.output
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_plot_replaces_its_own_figure(timeline_run: Path, tmp_path: Path) -> None:
    figure = tmp_path / "f.png"
    for _ in range(2):
        result = CliRunner().invoke(app, ["plot", str(timeline_run / "r.json"), "-o", str(figure)])
        assert result.exit_code == 0, result.output
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_json_summary_still_reaches_an_open_pipe(tiny_inplace, recordings, tmp_path: Path) -> None:
    """The guard changes nothing for a reader that stays: one JSON line on stdout."""
    done = subprocess.run(
        cli_command(tiny_inplace, recordings[0], tmp_path / "o.wav", "--json", "--quiet"),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exit_code"] == 0
