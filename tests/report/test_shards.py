"""`infer --shard I/N` and `report merge`: a deterministic partition by relative path, each shard
under its own lock with its own report part, and one merged report equal to a single run's.

One unsharded run and one pair of shard runs over a small corpus (good and bad files) are made
once for the module; the tests compare outputs and reports on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import comparable, files_under, partials, write_corpus
from helpers.cli import assert_no_traceback, infer, report_of
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.jobs.files import atomic_output
from moshi_ttt.jobs.guard import OutputLock
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt.report.shards import Shard, parse_shard, shard_of
from moshi_ttt_cli.app import app


def merge(out: Path):
    return CliRunner().invoke(app, ["report", "merge", str(out)], env={"COLUMNS": "200"})


def entries(report: dict) -> dict[str, dict]:
    return {f["input"]: comparable(f) for f in report["files"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    src = tmp_path_factory.mktemp("corpus") / "in"
    return src, write_corpus(src)


@pytest.fixture(scope="module")
def single(tiny_inplace, corpus, tmp_path_factory) -> Path:
    """The reference: one unsharded run."""
    out = tmp_path_factory.mktemp("single") / "out"
    result = infer(tiny_inplace, corpus[0], out, "--text", "--quiet", "--batch-size", "1")
    assert result.exit_code == 1, result.output  # the bad file failed
    return out


@pytest.fixture(scope="module")
def sharded(tiny_inplace, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "out"
    for index in range(2):
        # The batch size is part of what a CPU run computes (and streams batched together share
        # rounding): one stream at a time in every run compared here.
        result = infer(tiny_inplace, corpus[0], out, "--text", "--quiet", "--batch-size", "1", "--shard", f"{index}/2")
        assert_no_traceback(result)
        assert result.exit_code in (0, 1), result.output
    return out


# -- the partition --------------------------------------------------------------------------------


def test_parse_shard_refuses_what_is_not_i_of_n() -> None:
    assert parse_shard("1/4") == Shard(1, 4) and str(parse_shard(" 0 / 1 ")) == "0/1"
    for text in ("4/4", "1", "-1/2", "a/b", "1/0", "0/2/3"):
        with pytest.raises(MoshiTTTError, match="--shard"):
            parse_shard(text)


def test_shard_of_is_a_stable_hash_of_the_relative_path() -> None:
    paths = [f"talks/day{d}/take_{i}.wav" for d in range(5) for i in range(40)]
    shards = [shard_of(p, 7) for p in paths]
    # Pinned: a shard computed today is the shard computed by any later version, on any machine.
    assert [shard_of("a.wav", 7), shard_of("talks/day2/take_3.wav", 7), shard_of("x/y/z.flac", 3)] == [3, 5, 1]
    assert set(shards) == set(range(7))  # every shard gets files
    # Adding files moves none of the others, whatever their position in a sorted listing.
    more = sorted(paths + [f"talks/day{d}/extra_{i}.wav" for d in range(5) for i in range(40)])
    assert [shard_of(p, 7) for p in paths] == shards and len(more) == 400
    assert shard_of(Path("talks") / "a.wav", 5) == shard_of("talks/a.wav", 5)


# -- two shards and a merge are one run ---------------------------------------------------------------


def test_two_shards_cover_the_corpus_exactly_once_and_merge_into_the_single_report(corpus, single, sharded) -> None:
    src, expected = corpus
    parts = [report_of(sharded / f"moshi-ttt-report.shard-{i}-of-2.json") for i in range(2)]
    inputs = [[Path(f["input"]).relative_to(src).as_posix() for f in part["files"]] for part in parts]
    assert all(inputs), "both shards got files"
    assert sorted(inputs[0] + inputs[1]) == sorted(expected)  # every file in exactly one part
    for i, part in enumerate(parts):
        assert part["shard"] == {"index": i, "count": 2, "planned": len(inputs[i]), "done": len(inputs[i])}
        assert all(shard_of(rel, 2) == i for rel in inputs[i])
    assert not (sharded / REPORT_NAME).exists()  # nothing merged yet
    # The same outputs, byte for byte, as one run, and no lock or temporary left behind.
    assert files_under(sharded) == sorted(
        [rel for rel in files_under(single) if rel != REPORT_NAME]
        + [f"moshi-ttt-report.shard-{i}-of-2.json" for i in range(2)]
    )
    for rel in files_under(single):
        if rel != REPORT_NAME:
            assert (sharded / rel).read_bytes() == (single / rel).read_bytes(), rel

    result = merge(sharded)
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "complete" in result.stdout and "warning" not in result.output
    merged, reference = report_of(sharded / REPORT_NAME), report_of(single / REPORT_NAME)
    by_status = {Path(f["input"]).relative_to(src).as_posix(): f["status"] for f in merged["files"]}
    assert by_status == expected
    relocate = lambda e: {
        k: (v.replace(str(sharded), str(single)) if isinstance(v, str) else v)  # noqa: E731
        for k, v in e.items()
    }
    ours, theirs = {k: relocate(v) for k, v in entries(merged).items()}, entries(reference)
    assert ours.keys() == theirs.keys()
    assert {k: [f for f in theirs[k] if ours[k].get(f) != theirs[k][f]] for k in ours} == {k: [] for k in ours}
    counts = {k: v for k, v in merged["totals"].items() if k not in ("wall_s", "real_time_factor")}
    assert counts == {k: v for k, v in reference["totals"].items() if k not in ("wall_s", "real_time_factor")}
    assert merged["totals"]["wall_s"] == pytest.approx(sum(p["totals"]["wall_s"] for p in parts), abs=1e-2)
    assert "shard" not in merged and merged["settings"] == {**reference["settings"]}
    # Merging again gives the same report.
    assert merge(sharded).exit_code == 0
    assert entries(report_of(sharded / REPORT_NAME)) == entries(merged)


def test_an_unsharded_rerun_takes_the_shards_results_as_its_own(tiny_inplace, corpus, sharded, tmp_path) -> None:
    src, expected = corpus
    out = tmp_path / "out"
    shutil.copytree(sharded, out, symlinks=True)
    for path in out.glob("*.json"):  # the parts name outputs under `sharded`: point them here
        path.write_text(path.read_text().replace(str(sharded), str(out)))
    (out / REPORT_NAME).unlink(missing_ok=True)
    result = infer(tiny_inplace, src, out, "--text", "--quiet", "--batch-size", "1")
    assert result.exit_code == 1, result.output  # the bad file is tried again, and fails again
    report = report_of(out / REPORT_NAME)
    parts = {f["input"]: f for i in range(2) for f in report_of(out / f"moshi-ttt-report.shard-{i}-of-2.json")["files"]}
    assert len(report["files"]) == len(expected)
    for entry in report["files"]:
        part = parts[entry["input"]]
        if part["status"] == "ok":  # carried over with every number, nothing recomputed
            assert (entry["status"], entry["reason"], entry["from_earlier_run"]) == ("skipped", "exists", True)
            assert entry["ttt"] == part["ttt"] and entry["output_sha256"] == part["output_sha256"]
        else:
            assert (entry["status"], entry["reason"]) == (part["status"], part["reason"])


def test_merge_names_missing_and_unfinished_shards(tiny_inplace, corpus, sharded, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(sharded / "moshi-ttt-report.shard-0-of-2.json", out)
    result = merge(out)
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert "shard 1/2 missing" in " ".join(result.stderr.split())
    assert (out / REPORT_NAME).exists()  # what there is, is merged

    # A shard killed half way: its part lists fewer files than it planned.
    part = out / "moshi-ttt-report.shard-1-of-2.json"
    data = report_of(sharded / part.name)
    data["shard"]["planned"] += 2
    part.write_text(json.dumps(data))
    result = merge(out)
    assert result.exit_code == 1 and "shard 1/2 unfinished" in " ".join(result.stderr.split())

    empty = tmp_path / "empty"
    empty.mkdir()
    result = merge(empty)
    assert_no_traceback(result)
    assert result.exit_code == 2 and "no shard reports to merge" in result.stderr


def test_merge_keeps_the_entry_that_describes_the_output_on_disk(tmp_path) -> None:
    from moshi_ttt.report.schema import sha256_of
    from moshi_ttt.report.shards import merge_reports

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.wav").write_bytes(b"RIFF the output")
    good = sha256_of(out / "a.wav")

    def write(name: str, status: str, sha: str | None, mtime: int) -> None:
        entry = {
            "input": "/in/a.wav",
            "output": str(out / "a.wav") if sha else None,
            "status": status,
            "reason": None if status == "ok" else "boom",
            "output_sha256": sha,
        }
        path = out / name
        path.write_text(
            json.dumps({"schema": "moshi-ttt.report/1", "settings": {}, "files": [entry], "totals": {"wall_s": 1.0}})
        )
        os.utime(path, ns=(mtime, mtime))

    # Oldest describes the file on disk; a newer part failed on it; the newest names another output.
    write("moshi-ttt-report.shard-0-of-2.json", "ok", good, 1_000_000_000)
    write("moshi-ttt-report.shard-1-of-2.json", "failed", None, 2_000_000_000)
    write("moshi-ttt-report.shard-0-of-3.json", "ok", "0" * 64, 3_000_000_000)
    merged = merge_reports(out / REPORT_NAME)
    assert [(f.status, f.output_sha256) for f in merged.report.files] == [("ok", good)]
    (out / "a.wav").unlink()  # no output: the newest report has the last word
    (out / REPORT_NAME).unlink()  # (the merge just wrote the newest one)
    merged = merge_reports(out / REPORT_NAME)
    assert [(f.status, f.output_sha256) for f in merged.report.files] == [("ok", "0" * 64)]
    assert {str(s.shard): s.state for s in merged.shards} == {
        "0/2": "complete",
        "1/2": "complete",
        "0/3": "complete",
        "1/3": "missing",
        "2/3": "missing",
    }


# -- locks and temporaries ------------------------------------------------------------------------------


def test_shards_run_side_by_side_but_never_twice_nor_beside_an_unsharded_run(tiny_inplace, corpus, tmp_path) -> None:
    src, _ = corpus
    out = tmp_path / "out"
    with OutputLock(out, Shard(0, 2).lock_name):  # shard 0/2 is running
        again = infer(tiny_inplace, src, out, "--shard", "0/2", "--quiet")
        assert_no_traceback(again)
        assert again.exit_code == 2 and "in use by another moshi-ttt run" in again.stderr
        unsharded = infer(tiny_inplace, src, out, "--quiet")
        assert unsharded.exit_code == 2 and "shards of a --shard run are writing here: 0/2" in unsharded.stderr
        other = infer(tiny_inplace, src, out, "--shard", "1/2", "--quiet", "--glob", "*s0_*")
        assert other.exit_code == 0, other.output  # another shard runs beside it
    assert not (out / REPORT_NAME).exists()
    with OutputLock(out):  # an unsharded run (or a merge) holds OUT
        refused = infer(tiny_inplace, src, out, "--shard", "1/2", "--quiet")
        assert refused.exit_code == 2 and "in use by an unsharded moshi-ttt run" in refused.stderr
    assert sorted(p.name for p in out.glob(".*.lock")) == []


def _dead_temporary(final: Path) -> Path:
    """A temporary of `final` left by a process that is gone (made in a child that exits)."""
    code = (
        "import sys; from pathlib import Path; from moshi_ttt.jobs.files import AtomicFile; "
        "f = AtomicFile(Path(sys.argv[1])); f.tmp.write_bytes(b'half'); print(f.tmp)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


def test_a_shard_cleans_up_only_its_own_stale_temporaries(tiny_inplace, corpus, tmp_path) -> None:
    src, expected = corpus
    out = tmp_path / "out"
    good = sorted(rel for rel, status in expected.items() if status == "ok")
    mine = next(rel for rel in good if shard_of(rel, 2) == 0)
    theirs = next(rel for rel in good if shard_of(rel, 2) == 1)
    stale = {rel: _dead_temporary(out / Path(rel).with_suffix(".wav")) for rel in (mine, theirs)}
    with atomic_output(out / "live.wav") as live:  # a live temporary (this process) is never touched
        live.write_bytes(b"being written")
        result = infer(tiny_inplace, src, out, "--shard", "0/2", "--quiet", "--glob", mine)
        assert result.exit_code == 0, result.output
        assert not stale[mine].exists()  # shard 0's own: gone
        assert stale[theirs].exists()  # shard 1's may belong to a live run on another machine: kept
        result = infer(tiny_inplace, src, out, "--shard", "1/2", "--quiet", "--glob", theirs)
        assert result.exit_code == 0, result.output
        assert not stale[theirs].exists() and live.exists()
    assert partials(out) == []


def test_shard_of_a_single_file_is_refused(tiny_inplace, corpus, tmp_path) -> None:
    src, _ = corpus
    one = next(src.glob("*.wav"))
    result = infer(tiny_inplace, one, tmp_path / "x.wav", "--shard", "0/2")
    assert_no_traceback(result)
    assert result.exit_code == 2 and "--shard splits a folder or a manifest" in result.stderr
    bad = infer(tiny_inplace, src, tmp_path / "out", "--shard", "2/2")
    assert bad.exit_code == 2 and "shards are numbered from 0" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_a_shard_without_files_loads_no_model_and_is_complete(tiny_inplace, corpus, tmp_path, monkeypatch) -> None:
    from moshi_ttt.checkpoints import model as model_module

    src, expected = corpus
    theirs = next(rel for rel in sorted(expected) if shard_of(rel, 2) == 1 and expected[rel] == "ok")
    out = tmp_path / "out"
    loads = []
    real = model_module.load_model
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    empty = infer(tiny_inplace, src, out, "--shard", "0/2", "--glob", theirs, "--quiet")
    assert empty.exit_code == 0, empty.output
    assert loads == []
    part = report_of(out / "moshi-ttt-report.shard-0-of-2.json")
    assert part["files"] == [] and part["shard"] == {"index": 0, "count": 2, "planned": 0, "done": 0}
    full = infer(tiny_inplace, src, out, "--shard", "1/2", "--glob", theirs, "--quiet")
    assert full.exit_code == 0 and len(loads) == 1
    result = merge(out)
    assert result.exit_code == 0, result.output
    merged = report_of(out / REPORT_NAME)
    assert [f["status"] for f in merged["files"]] == ["ok"] and "lm" in merged["settings"]
