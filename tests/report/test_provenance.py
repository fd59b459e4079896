"""What made an output (`made_by`): a rerun with another checkpoint or other output-changing
settings keeps the old outputs under their true origin, counts them and says so in one line;
`--redo-other` redoes them; `report merge` refuses (or, with --mixed, labels) parts made by
different models; fingerprints tell checkpoints apart cheaply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import edit_weights
from helpers.cli import assert_no_traceback, report_of
from moshi_ttt.checkpoints.tiny import write_sample_recordings
from moshi_ttt.report import provenance
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt_cli.app import app


def run(base: Path, checkpoint: Path, *args: object):
    argv = ["infer", *map(str, args), "--base", str(base), "--checkpoint", str(checkpoint), "--device", "cpu"]
    return CliRunner().invoke(app, argv, env={"COLUMNS": "300"})


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def training_run(tiny_inplace, tmp_path_factory) -> Path:
    """A copy of the tiny In-Place run folder (checkpoint_000100): training writes more into it."""
    return shutil.copytree(tiny_inplace.finetune, tmp_path_factory.mktemp("run") / "run")


def newer_checkpoint(run_folder: Path, step: int) -> Path:
    """Training went on: checkpoint_<step> with every TTT tensor moved."""
    old = run_folder / "checkpoints" / "checkpoint_000100"
    new = shutil.copytree(old, run_folder / "checkpoints" / f"checkpoint_{step:06d}")
    weights = new / "consolidated" / "lora.safetensors"
    edit_weights(weights, lambda t: t.update({k: v * 1.5 + 0.01 for k, v in t.items() if v.is_floating_point()}))
    return new


@pytest.fixture()
def src(tmp_path) -> Path:
    write_sample_recordings(tmp_path / "in", seed=5, durations=[0.6, 0.7, 0.5])
    return tmp_path / "in"


def test_a_rerun_with_a_newer_checkpoint_keeps_old_outputs_under_their_origin_and_redo_other_redoes_them(
    tiny_inplace, training_run, src, tmp_path
) -> None:
    out = tmp_path / "out"
    first = run(tiny_inplace.base, training_run, src, out, "--quiet")
    assert first.exit_code == 0, first.output
    before = report_of(out / REPORT_NAME)
    assert {f["made_by"]["step"] for f in before["files"]} == {100}
    assert before["settings"]["made_by"]["id"] == before["files"][0]["made_by"]["id"]
    outputs = {f["output"]: Path(f["output"]).read_bytes() for f in before["files"]}

    newer_checkpoint(training_run, 200)  # the run folder's latest is now step 200
    try:
        again = run(tiny_inplace.base, training_run, src, out, "--json")
        assert_no_traceback(again)
        assert again.exit_code == 0, again.output
        said = warnings_of(again)
        assert len(said) == 1, again.stderr
        assert said[0].startswith(
            "warning: 3 existing outputs were made by another model or settings (step 100 (now 200)"
        )
        assert "fine-tune weights" in said[0] and "--redo-other redoes them" in said[0]
        assert json.loads(again.stdout)["totals"]["made_by_other"] == 3
        report = report_of(out / REPORT_NAME)
        assert report["settings"]["made_by"]["step"] == 200
        assert report["totals"]["made_by_other"] == 3
        old = {f["input"]: f for f in before["files"]}
        for entry in report["files"]:
            # Kept, with the numbers and the origin of the run that made them, said to be foreign.
            assert (entry["status"], entry["from_earlier_run"]) == ("skipped", True)
            assert entry["reason"].startswith("exists; made by another model or settings: step 100 (now 200)")
            assert entry["made_by"] == old[entry["input"]]["made_by"]
            assert entry["ttt"] == old[entry["input"]]["ttt"]
        assert {o: Path(o).read_bytes() for o in outputs} == outputs

        redo = run(tiny_inplace.base, training_run, src, out, "--redo-other", "--quiet")
        assert redo.exit_code == 0, redo.output
        assert [w for w in warnings_of(redo) if "redoing 3 existing outputs" in w], redo.stderr
        report = report_of(out / REPORT_NAME)
        assert report["totals"]["made_by_other"] == 0
        assert [(f["status"], f["made_by"]["step"]) for f in report["files"]] == [("ok", 200)] * 3
        assert {o: Path(o).read_bytes() for o in outputs} != outputs  # really made again, by step 200

        settled = run(tiny_inplace.base, training_run, src, out, "--redo-other", "--quiet")
        assert settled.exit_code == 0 and warnings_of(settled) == []
        assert {f["status"] for f in report_of(out / REPORT_NAME)["files"]} == {"skipped"}
    finally:
        shutil.rmtree(training_run / "checkpoints" / "checkpoint_000200")


def test_output_changing_settings_count_and_rounding_level_ones_do_not(tiny_inplace, src, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(tiny_inplace.base, tiny_inplace.finetune, src, out, "--quiet", "--batch-size", "2").exit_code == 0
    # Another batch size (or device) moves outputs by rounding only: recorded, not foreign.
    same = run(tiny_inplace.base, tiny_inplace.finetune, src, out, "--quiet", "--batch-size", "3")
    assert same.exit_code == 0 and warnings_of(same) == []
    assert report_of(out / REPORT_NAME)["totals"]["made_by_other"] == 0
    assert {f["made_by"]["batch_size"] for f in report_of(out / REPORT_NAME)["files"]} == {2}
    for args, said in (
        (["--seed", "7"], "seed 4242 (now 7)"),
        (["--no-ttt"], "TTT on (now off)"),
        (["--delta-clip", "1e-3"], "delta clip 400.0 (now 0.001)"),
        (["--temp", "0.5"], "sampling"),
    ):
        result = run(tiny_inplace.base, tiny_inplace.finetune, src, out, "--quiet", *args)
        assert result.exit_code == 0, result.output
        assert len(warnings_of(result)) == 1 and f"({said})" in warnings_of(result)[0], (args, result.stderr)
        assert report_of(out / REPORT_NAME)["totals"]["made_by_other"] == 3


def test_redo_other_is_a_checked_option() -> None:
    from moshi_ttt.options import OptionError, RunOptions

    assert RunOptions(redo_other=True).validate().redo_other is True
    with pytest.raises(OptionError, match="redo_other must be true or false"):
        RunOptions(redo_other="yes").validate()  # type: ignore[arg-type]


# -- merging parts made by different models -------------------------------------------------------


def test_merge_refuses_parts_made_by_different_checkpoints_unless_mixed(tiny_inplace, training_run, src, tmp_path):
    out = tmp_path / "out"
    newer = newer_checkpoint(training_run, 300)
    try:
        # Shard 0 ran with step 100, shard 1 with step 300 (someone pointed it at the newer one).
        old = run(
            tiny_inplace.base, training_run / "checkpoints" / "checkpoint_000100", src, out, "--shard", "0/2", "-q"
        )
        new = run(tiny_inplace.base, newer, src, out, "--shard", "1/2", "-q")
        assert old.exit_code == 0 and new.exit_code == 0, old.output + new.output
        merged = CliRunner().invoke(app, ["report", "merge", str(out)], env={"COLUMNS": "300"})
        assert_no_traceback(merged)
        assert merged.exit_code == 2, merged.output
        lines = merged.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: refusing to merge outputs made by different models")
        assert "moshi-ttt-report.shard-0-of-2.json (checkpoint_000100 step 100" in lines[0]
        assert "moshi-ttt-report.shard-1-of-2.json (checkpoint_000300 step 300" in lines[0]
        assert not (out / REPORT_NAME).exists()

        mixed = CliRunner().invoke(app, ["report", "merge", str(out), "--mixed"], env={"COLUMNS": "300"})
        assert mixed.exit_code == 0, mixed.output
        assert "made by 2 different models or settings (--mixed)" in " ".join(mixed.stderr.split())
        report = report_of(out / REPORT_NAME)
        assert "made_by" not in report["settings"]
        assert sorted(o["step"] for o in report["settings"]["mixed_origins"]) == [100, 300]
        parts = {
            f["input"]: f["made_by"]["step"]
            for i in range(2)
            for f in report_of(out / f"moshi-ttt-report.shard-{i}-of-2.json")["files"]
        }
        assert {f["input"]: f["made_by"]["step"] for f in report["files"]} == parts
    finally:
        shutil.rmtree(newer)


# -- fingerprints ---------------------------------------------------------------------------------


class CountingReads:
    """A file handle that counts the bytes read through it."""

    def __init__(self, handle):
        self.handle, self.bytes = handle, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def seek(self, *args):
        return self.handle.seek(*args)

    def read(self, size=-1):
        data = self.handle.read(size)
        self.bytes += len(data)
        return data


def test_fingerprint_tells_checkpoints_apart_ignores_copies_and_reads_little(tmp_path, monkeypatch) -> None:
    import os

    import torch
    from safetensors.torch import save_file

    big = tmp_path / "a" / "lora.safetensors"
    big.parent.mkdir()
    save_file({"w": torch.randn(2048, 2048), "b": torch.randn(7)}, str(big))  # 16 MiB
    copy = tmp_path / "b" / "lora.safetensors"
    copy.parent.mkdir()
    shutil.copy(big, copy)
    os.utime(copy, ns=(1, 1))
    assert provenance.fingerprint(copy) == provenance.fingerprint(big)  # a copy is the same model

    opened: list[CountingReads] = []
    monkeypatch.setattr(
        provenance, "open", lambda *a, **k: opened.append(CountingReads(open(*a, **k))) or opened[-1], raising=False
    )
    provenance.fingerprint(big)
    monkeypatch.undo()
    assert 0 < sum(h.bytes for h in opened) < 64 * 1024  # a few KiB of 16 MiB

    edit_weights(copy, lambda t: t.update(w=t["w"] * 1.0001))  # another step of the same training
    assert provenance.fingerprint(copy) != provenance.fingerprint(big)
    small = tmp_path / "config.json"
    small.write_text('{"a": 1}')
    before = provenance.fingerprint(small)
    small.write_text('{"a": 2}')
    assert provenance.fingerprint(small) != before


def test_the_same_checkpoints_elsewhere_are_the_same_origin(tiny_inplace, src, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    assert run(tiny_inplace.base, tiny_inplace.finetune, src, out, "--quiet").exit_code == 0
    # Copied (new mtimes, another folder) and named by a relative path: the same model.
    shutil.copytree(tiny_inplace.base, tmp_path / "copies" / "base")
    shutil.copytree(tiny_inplace.finetune, tmp_path / "copies" / "finetune")
    monkeypatch.chdir(tmp_path / "copies")
    again = run(Path("base"), Path("finetune"), src, out, "--quiet")
    assert again.exit_code == 0 and warnings_of(again) == [], again.stderr
    report = report_of(out / REPORT_NAME)
    assert report["totals"]["made_by_other"] == 0 and report["settings"]["made_by"]["checkpoint"] == "finetune"
    assert {f["made_by"]["checkpoint"] for f in report["files"]} == {str(tiny_inplace.finetune)}  # as recorded
