"""`--timeline` on the tiny checkpoints: the recorded updates agree with the layer totals, leave
the outputs bit-identical, reach the report JSON only when asked for, and `moshi-ttt plot` draws
them (one line, not a traceback, for a report without a timeline)."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.options import RunOptions
from moshi_ttt.report.schema import FileResult, LayerReport
from moshi_ttt.run import run_batch
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt_cli.app import app


def assert_agrees_with_totals(layer: LayerReport) -> None:
    """The timeline, summed up, is the layer's report."""
    timeline = layer.timeline
    assert timeline is not None and len(timeline) == layer.updates > 0
    assert sum(r.tokens for r in timeline) == layer.tokens and timeline[-1].token == layer.tokens
    assert [r.token for r in timeline] == sorted({r.token for r in timeline})  # strictly increasing
    assert sum(r.clipped for r in timeline) == layer.clipped_updates
    assert timeline[-1].drift == pytest.approx(layer.drift, rel=1e-6)


@pytest.mark.parametrize("family", ["inplace", "ttt-mlp"])
def test_timeline_on_a_tiny_model(family: str, tiny_inplace, tiny_ttt_mlp, recordings: list[Path]) -> None:
    tiny = {"inplace": tiny_inplace, "ttt-mlp": tiny_ttt_mlp}[family]
    model = load_model(str(tiny.base), str(tiny.finetune), device="cpu", dtype=torch.float32)
    pcm = read_audio(recordings[0])
    plain = StreamingRunner(model).run(pcm)
    timed = StreamingRunner(model, timeline=True).run(pcm)
    assert np.array_equal(plain.pcm, timed.pcm) and plain.text_tokens == timed.text_tokens
    for without, layer in zip(plain.ttt_layers, timed.ttt_layers):
        assert without.timeline is None
        assert dataclasses.replace(layer, timeline=None) == without
        assert_agrees_with_totals(layer)
        if family == "inplace":
            assert all(r.update_norm_unclipped is not None and r.loss_before is None for r in layer.timeline)
        else:
            assert all(None not in (r.loss_before, r.loss_after, r.loss_initial) for r in layer.timeline)
    if family == "inplace":  # the fixture's tau clips some chunks and not others
        clips = [r.clipped for layer in timed.ttt_layers for r in layer.timeline]
        assert any(clips) and not all(clips)


# -- the report and the plot -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reports(tiny_ttt_mlp, recordings: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reports of two recordings through the TTT-MLP fine-tune: with the timeline, with it and
    --no-ttt, and without it."""
    root = tmp_path_factory.mktemp("timeline")
    inputs = root / "in"
    inputs.mkdir()
    for recording in recordings[:2]:
        (inputs / recording.name).write_bytes(recording.read_bytes())
    paths = {}
    for name, ttt, timeline in [("timeline", True, True), ("no-ttt", False, True), ("plain", True, False)]:
        options = RunOptions(
            base=str(tiny_ttt_mlp.base),
            checkpoint=str(tiny_ttt_mlp.finetune),
            device="cpu",
            dtype="float32",
            ttt_enabled=ttt,
            timeline=timeline,
        )
        outcome = run_batch(inputs, root / name, options)
        assert outcome.exit_code == 0
        paths[name] = outcome.report_path
    return paths


def test_report_json_carries_the_timeline_only_when_asked(reports: dict[str, Path]) -> None:
    data = json.loads(reports["timeline"].read_text())
    for entry in data["files"]:
        for layer in entry["ttt"]["layers"]:
            assert len(layer["timeline"]) == layer["updates"]
            assert {"token", "tokens", "update_norm", "drift", "loss_before", "loss_after"} <= layer["timeline"][
                0
            ].keys()
        read_back = FileResult.from_json(entry)
        for layer in read_back.ttt.layers:
            assert_agrees_with_totals(layer)
    plain = json.loads(reports["plain"].read_text())
    assert all("timeline" not in layer for entry in plain["files"] for layer in entry["ttt"]["layers"])
    frozen = json.loads(reports["no-ttt"].read_text())
    assert all(layer["timeline"] == [] for entry in frozen["files"] for layer in entry["ttt"]["layers"])


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, checking the signature and the chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def pixels_of(path: Path, colour: str, columns: int) -> list[int]:
    """How many pixels of each of `columns` vertical strips of the image are (nearly) `colour`:
    the layers' lines are drawn in matplotlib's tab10 colours, which axes, text and grid never use."""
    import matplotlib.colors
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))[..., :3]
    close = np.abs(pixels - np.array(matplotlib.colors.to_rgb(colour))).max(-1) < 0.05
    return [int(strip.sum()) for strip in np.array_split(close, columns, axis=1)]


@pytest.mark.parametrize("compare", [None, "timeline", "no-ttt"])
def test_plot_draws_a_png_of_the_requested_size(reports: dict[str, Path], tmp_path: Path, compare: str | None) -> None:
    """Both TTT layers' lines in the report's column; with --compare, the other report's in a
    second column (none for a --no-ttt run, whose layers never updated)."""
    figure = tmp_path / "figure.png"
    args = ["plot", str(reports["timeline"]), "-o", str(figure), "--width", "900", "--height", "700"]
    result = CliRunner().invoke(app, args + (["--compare", str(reports[compare])] if compare else []))
    assert result.exit_code == 0, result.output
    assert png_size(figure.read_bytes()) == (900, 700)
    left, right = pixels_of(figure, "tab:blue", columns=2), pixels_of(figure, "tab:orange", columns=2)
    assert min(left[0], right[0]) > 300  # both layers drawn in the first column
    if compare == "timeline":
        assert min(left[1], right[1]) > 300
    elif compare == "no-ttt":
        assert left[1] == right[1] == 0


def test_plot_refuses_a_report_without_timeline_in_one_line(reports: dict[str, Path], tmp_path: Path) -> None:
    for report, reason in [
        (reports["plain"], "rerun `moshi-ttt infer` with --timeline"),
        (tmp_path / "missing.json", "cannot read a moshi-ttt report"),
    ]:
        result = CliRunner().invoke(app, ["plot", str(report), "-o", str(tmp_path / "x.png")])
        assert result.exit_code == 2
        assert "Traceback" not in result.output and reason in result.output
        assert result.output.strip().count("\n") == 0, result.output
        assert not (tmp_path / "x.png").exists()
