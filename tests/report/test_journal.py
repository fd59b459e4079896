"""The report's journal and what a resume trusts: finished files appended one line each (kill -9
loses nothing finished), compacted into the JSON report now and then and at the end, outputs
hashed again only when their stat changed, and malformed reports refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import N_LONG, partials
from helpers.cli import assert_no_traceback, check_outputs_complete, infer, report_of
from moshi_ttt.jobs.driver import BatchRunner
from moshi_ttt.jobs.files import atomic_output
from moshi_ttt.jobs.plan import prepare_batch
from moshi_ttt.report import history
from moshi_ttt.report.journal import Journal, journal_path, read_journal
from moshi_ttt.report.schema import REPORT_NAME, REPORT_SCHEMA, FileResult, FileTTT, LayerReport, Report, RunSettings
from moshi_ttt.report.shards import read_report_file
from moshi_ttt_cli.app import app

SETTINGS = RunSettings(base="tiny", checkpoint=None, seed=1, made_by={"id": "0123456789abcdef", "step": 1})


class FakeBackend:
    """Writes each output at once and describes it as a model would; `after` runs between files
    (the driver has recorded the previous one by then)."""

    def __init__(self, after: tp.Callable[[int], None] | None = None):
        self.after = after or (lambda index: None)

    def results(self, jobs, total, events):
        for index, job in jobs:
            with atomic_output(job.output) as tmp:
                tmp.write_bytes(f"RIFF output of {job.input.name}".encode())
            layers = [LayerReport(1, 2, 1, 0, 1.0, 1.1, 0.1, 0.1)]
            yield (
                index,
                FileResult(
                    str(job.input),
                    str(job.output),
                    "ok",
                    duration_s=0.2,
                    ttt=FileTTT("inplace", 8, layers),
                    transcript=f"words {index}",
                    output_sha256=history.sha256_of(job.output),
                ),
            )
            self.after(index)


def corpus(root: Path, files: int) -> Path:
    src = root / "in"
    for i in range(files):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"r{i:04d}.wav").write_bytes(b"RIFF not read by a fake backend")
    return src


def first_run(src: Path, out: Path, **kwargs: tp.Any) -> Report:
    plan = prepare_batch(src, out)
    try:
        runner = BatchRunner(FakeBackend(), SETTINGS, report_path=plan.report_path, earlier=plan.earlier, **kwargs)
        return runner.run(plan.jobs, keep=plan.keeps)
    finally:
        plan.lock.release()


def json_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1  # without the header


# -- kill -9 --------------------------------------------------------------------------------------


def test_kill_9_loses_nothing_finished_that_only_the_journal_holds(tiny_inplace, long_recordings, tmp_path) -> None:
    """The report is compacted once at the first file and never again (as a large report is,
    for minutes): the files finished since are in the journal only, and a rerun keeps them all."""
    out = tmp_path / "out"
    code = (
        "import sys; import moshi_ttt.jobs.driver as driver; driver.COMPACT_RATIO = 1e9; "
        "from moshi_ttt_cli.app import main; sys.argv[0] = 'moshi-ttt'; main()"
    )
    argv = ["infer", long_recordings, out, "--base", tiny_inplace.base, "--checkpoint", tiny_inplace.finetune]
    argv += ["--device", "cpu", "--batch-size", "1"]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=log, stderr=subprocess.STDOUT)
    finished: dict[str, FileResult] = {}
    try:
        deadline = time.monotonic() + 180
        while len(finished) < 2:
            assert proc.poll() is None, f"the run ended before it was killed:\n{(tmp_path / 'log').read_text()}"
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            found = read_report_file(out / REPORT_NAME)  # report and journal: every read parses
            finished = {f.input: f for f in (found.files if found else []) if f.status == "ok"}
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    on_disk = report_of(out / REPORT_NAME)
    folded = read_report_file(out / REPORT_NAME)
    assert folded is not None
    finished = {f.input: f for f in folded.files if f.status == "ok"}
    assert len(on_disk["files"]) == 1 < len(finished) < N_LONG  # the journal holds the rest
    assert {str(out / rel) for rel in check_outputs_complete(long_recordings, out)} >= {
        f.output for f in finished.values()
    }

    result = infer(tiny_inplace, long_recordings, out, "--quiet")
    assert result.exit_code == 0, result.output
    rerun = report_of(out / REPORT_NAME)
    assert len(rerun["files"]) == N_LONG and rerun["totals"]["ok"] == N_LONG - len(finished)
    for entry in rerun["files"]:
        if entry["input"] in finished:  # nothing finished was lost: kept, numbers and all
            earlier = finished[entry["input"]]
            assert (entry["status"], entry["reason"], entry["from_earlier_run"]) == ("skipped", "exists", True)
            assert entry["output_sha256"] == earlier.output_sha256 and entry["transcript"] == earlier.transcript
            assert entry["ttt"]["layers"][0]["drift"] == earlier.ttt.layers[0].drift  # type: ignore[union-attr]
    assert not journal_path(out / REPORT_NAME).exists()  # a finished run leaves its report alone
    assert partials(out) == []


# -- compaction -----------------------------------------------------------------------------------


def test_the_journal_holds_what_the_report_does_not_and_is_compacted_into_it(tmp_path) -> None:
    src, out = corpus(tmp_path, 12), tmp_path / "out"
    report_path, journal = out / REPORT_NAME, journal_path(out / REPORT_NAME)
    seen: list[tuple[int, int, int]] = []  # (files in the JSON, journal lines, files read back)

    def look(index: int) -> None:
        seen.append(
            (len(report_of(report_path)["files"]), json_lines(journal), len(read_report_file(report_path).files))
        )

    rounds = ((1e9, [(1, k - 1, k) for k in range(1, 13)]), (0.0, [(k, 0, k) for k in range(1, 13)]))
    for round_, (ratio, expected) in enumerate(rounds, start=1):
        seen.clear()
        plan = prepare_batch(src, out)
        try:
            runner = BatchRunner(FakeBackend(look), SETTINGS, report_path=plan.report_path, compact_ratio=ratio)
            runner.run(plan.jobs, keep=plan.keeps)
        finally:
            plan.lock.release()
        # 1e9: the report is written at the first file only, the journal grows by a line a file;
        # 0: the report is rewritten after every file and the journal is emptied each time.
        assert seen == expected, ratio
        data = report_of(report_path)
        assert len(data["files"]) == 12 and data["journal"] == {"seq": 12 * round_}  # seq rises across runs
        assert not journal.exists()
        for path in out.rglob("*.wav"):
            path.unlink()  # the next round makes them again


def test_a_large_first_run_rewrites_its_report_a_few_times_not_once_a_file(tmp_path, monkeypatch) -> None:
    src, out = corpus(tmp_path, 1500), tmp_path / "out"
    writes = []
    real_write = Report.write
    monkeypatch.setattr(
        Report, "write", lambda self, *a, **k: writes.append(len(self.files)) or real_write(self, *a, **k)
    )
    report = first_run(src, out)
    assert report.totals()["ok"] == 1500 and len(report_of(out / REPORT_NAME)["files"]) == 1500
    assert len(writes) < 300, writes  # once a file would be 1500 (and quadratic); ~30 on an idle machine
    assert writes[-1] == 1500


def test_journal_lines_the_report_already_holds_are_not_applied_twice(tmp_path) -> None:
    """A crash between writing the compacted report (up to seq 3) and emptying the journal: its
    lines up to 3 are old news; 4 and 5 are newer than the report."""
    report = tmp_path / REPORT_NAME
    entry = lambda name, status: {"input": name, "output": None, "status": status, "reason": status}  # noqa: E731
    report.write_text(
        json.dumps(
            {
                "schema": REPORT_SCHEMA,
                "settings": {},
                "files": [entry("a", "ok"), entry("b", "failed")],
                "totals": {},
                "journal": {"seq": 3},
            }
        )
    )
    lines = [{"schema": "moshi-ttt.journal/1", "seq": 0}]
    lines += [{"seq": 2, "entry": entry("a", "failed")}, {"seq": 3, "entry": entry("b", "failed")}]
    lines += [{"seq": 4, "entry": entry("b", "skipped")}, {"seq": 5, "entry": entry("c", "ok")}]
    journal_path(report).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"seq": 6, "ent')
    found = read_report_file(report)
    assert [(f.input, f.status) for f in found.files] == [("a", "ok"), ("b", "skipped"), ("c", "ok")]
    assert found.journal_seq == 5 and found.data["totals"]["files"] == 3

    appender = Journal(report).open()  # the line cut short is dropped before anything is appended
    assert appender.append(json.dumps(entry("d", "ok"))) == 6
    appender.close()
    assert [(f.input, f.status) for f in read_report_file(report).files][-1] == ("d", "ok")
    assert read_journal(report).last_seq == 6


def test_a_journal_that_is_not_ours_is_refused_not_replaced(tiny_inplace, recordings, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = journal_path(out / REPORT_NAME)
    mine.write_text("my notes\nabout this folder\n")
    result = infer(tiny_inplace, recordings[0].parent, out, "--quiet")
    assert_no_traceback(result)
    assert result.exit_code == 2 and "is not a moshi-ttt journal; refusing to replace it" in result.stderr
    assert mine.read_text() == "my notes\nabout this folder\n"


# -- what a resume trusts -------------------------------------------------------------------------


def test_a_resume_hashes_only_outputs_whose_stat_changed(tmp_path, monkeypatch) -> None:
    src, out = corpus(tmp_path, 20), tmp_path / "out"
    first_run(src, out)
    hashed: list[str] = []
    real_sha = history.sha256_of
    monkeypatch.setattr(history, "sha256_of", lambda path: hashed.append(Path(path).name) or real_sha(path))

    def resume() -> dict[str, FileResult]:
        report = first_run(src, out)
        return {Path(f.input).name: f for f in report.files}

    entries = resume()
    assert hashed == [] and all(f.from_earlier_run and f.transcript for f in entries.values())

    touched, replaced = out / "d0" / "r0000.wav", out / "d1" / "r0001.wav"
    later = touched.stat().st_mtime_ns + 5_000_000_000
    os.utime(touched, ns=(later, later))  # same bytes, new mtime: hashed once, still its entry
    old = replaced.stat()
    other = replaced.with_name("other")
    other.write_bytes(b"X" * old.st_size)  # same size, same mtime, other bytes (a new file)
    os.utime(other, ns=(old.st_mtime_ns, old.st_mtime_ns))
    other.replace(replaced)
    entries = resume()
    assert sorted(hashed) == ["r0000.wav", "r0001.wav"]
    assert entries["r0000.wav"].from_earlier_run and entries["r0000.wav"].transcript == "words 0"
    assert not entries["r0001.wav"].from_earlier_run and entries["r0001.wav"].ttt is None  # not its numbers
    hashed.clear()
    resume()
    assert hashed == []  # the touched output's new stat was recorded; the stranger has no hash to check


# -- malformed reports ----------------------------------------------------------------------------

GOOD_ENTRY = {"input": "/in/a.wav", "output": "/out/a.wav", "status": "ok"}


@pytest.mark.parametrize(
    "entry, said",
    [
        (
            {**GOOD_ENTRY, "ttt": {"variant": "inplace", "layers": [{"layer": 1}]}},
            "malformed report entry 1: ttt.layers",
        ),
        ({"output": 5, "status": "ok"}, "malformed report entry 1: input must be a path"),
        ({**GOOD_ENTRY, "status": "great"}, "malformed report entry 1: status must be one of ok, failed, skipped"),
        ({**GOOD_ENTRY, "frames": "many"}, "malformed report entry 1: frames must be a whole number"),
        ({**GOOD_ENTRY, "ttt": {"layers": "all"}}, "malformed report entry 1: ttt.layers must be a list"),
        ([GOOD_ENTRY], "malformed report entry 1: an entry must be a JSON object"),
    ],
)
def test_a_report_with_malformed_entries_is_one_line_not_a_traceback(
    entry, said, tiny_inplace, recordings, tmp_path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    report = out / REPORT_NAME
    report.write_text(json.dumps({"schema": REPORT_SCHEMA, "settings": {}, "files": [entry]}))
    before = report.read_text()
    result = infer(tiny_inplace, recordings[0].parent, out, "--quiet")
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and str(report) in lines[0], lines
    assert report.read_text() == before  # refused, not replaced


@pytest.mark.parametrize(
    "part",
    [
        {"schema": REPORT_SCHEMA, "settings": {}, "files": [{"output": 5}]},
        {"schema": REPORT_SCHEMA, "settings": ["base"], "files": []},
        {"schema": REPORT_SCHEMA, "files": [{**GOOD_ENTRY, "ttt": {"layers": [{"layer": 1, "tokens": "x"}]}}]},
        {"schema": REPORT_SCHEMA, "files": [], "totals": [1, 2]},
    ],
)
def test_merging_a_malformed_part_is_one_line(part, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    good = {"schema": REPORT_SCHEMA, "settings": {}, "files": [], "shard": {"planned": 0, "done": 0}}
    (out / "moshi-ttt-report.shard-0-of-2.json").write_text(json.dumps(good))
    bad = out / "moshi-ttt-report.shard-1-of-2.json"
    bad.write_text(json.dumps(part))
    result = CliRunner().invoke(app, ["report", "merge", str(out)], env={"COLUMNS": "300"})
    assert_no_traceback(result)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: malformed report"), lines
    assert not (out / REPORT_NAME).exists()
