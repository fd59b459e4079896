"""Driving the command line in tests: in process (`infer`), or as a real process (`cli_command`,
`start_and_wait_for_finished_files`) where signals and locks are the point."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from typer.testing import CliRunner

from helpers import files_under
from moshi_ttt.jobs.files import FRAME_SIZE
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt_cli.app import app


def cli_run(argv: list[str], env: dict | None = None):
    """The CLI in this process, as a user types `moshi-ttt ARGV`."""
    return CliRunner().invoke(app, argv, env=env)


def one_error_line(result) -> str:
    """The one line a refused run prints (exit 2, no traceback), for asserting on its wording."""
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def infer(tiny, *args: object, env: dict | None = None, checkpoint: Path | None = None):
    """`moshi-ttt infer ARGS` on CPU with the tiny base and its fine-tune (or `checkpoint`)."""
    finetune = tiny.finetune if checkpoint is None else checkpoint
    argv = ["infer", *map(str, args), "--base", str(tiny.base), "--checkpoint", str(finetune), "--device", "cpu"]
    return CliRunner().invoke(app, argv, env=env)


def report_of(path: Path) -> dict:
    return json.loads(path.read_text())


def expected_samples(source: Path) -> int:
    """Moshi answers one 80 ms frame per full input frame (a trailing partial frame is dropped)."""
    return sf.info(str(source)).frames // FRAME_SIZE * FRAME_SIZE


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def cli_command(tiny, *args: object) -> list[str]:
    script = Path(sys.executable).with_name("moshi-ttt")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "moshi_ttt_cli.app"]
    return [
        *head,
        "infer",
        *map(str, args),
        "--base",
        str(tiny.base),
        "--checkpoint",
        str(tiny.finetune),
        "--device",
        "cpu",
    ]


def start_and_wait_for_finished_files(tiny, src: Path, out: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    """Start `moshi-ttt infer` and return once its report lists a finished file (bounded wait).

    Every read of the report must parse: it is only ever replaced whole."""
    with open(log, "wb") as sink:
        # Two at a time: equal lengths finish together, so a larger batch would leave nothing to interrupt.
        proc = subprocess.Popen(cli_command(tiny, src, out, "--batch-size", 2), stdout=sink, stderr=subprocess.STDOUT)
    report = out / REPORT_NAME
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc={proc.returncode}) before it could be interrupted:\n{log.read_text()}")
        if report.exists():
            data = json.loads(report.read_text())
            if any(f["status"] == "ok" for f in data["files"]):
                return proc, data
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no file finished in time:\n{log.read_text()}")


def check_outputs_complete(src: Path, out: Path) -> list[str]:
    wavs = files_under(out)
    for rel in wavs:
        if rel.endswith(".wav"):
            assert sf.info(str(out / rel)).frames == expected_samples(src / rel), rel
    return [rel for rel in wavs if rel.endswith(".wav")]
