"""Resource limits decided before anything loads: a batch size, thread count or config dimension
that cannot fit is one line (exit 2) naming the flag or the config file and key, and so is a
config value of the wrong type. The memory estimate is `--batch-size auto`'s, read off the model
built on the meta device from its configs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.cli import one_error_line
from moshi_ttt.checkpoints.model import load_model, resolve_checkpoints
from moshi_ttt.options import usable_cpus
from moshi_ttt.streaming import batch_size as bs
from moshi_ttt_cli.app import app


def run(tiny, recording: Path, out: Path, *extra: str, base: Path | None = None, finetune: Path | None = None):
    args = ["infer", str(recording), str(out), "--base", str(base or tiny.base), "--device", "cpu", *extra]
    if finetune is not None or base is None:
        args += ["--checkpoint", str(finetune or tiny.finetune)]
    return CliRunner().invoke(app, args)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are loaded: refusals come first."""
    from moshi.models import loaders

    monkeypatch.setattr(loaders.CheckpointInfo, "get_moshi", lambda *a, **k: pytest.fail("the LM was loaded"))
    monkeypatch.setattr(loaders.CheckpointInfo, "get_mimi", lambda *a, **k: pytest.fail("Mimi was loaded"))


def base_with(tiny, dest: Path, **changes) -> Path:
    """A copy of the tiny base whose config.json has `changes`."""
    shutil.copytree(tiny.base, dest)
    config = dest / "config.json"
    data = json.loads(config.read_text())
    data.update(changes)
    config.write_text(json.dumps(data))
    return dest


# -- 1. a batch size whose streams cannot fit ------------------------------------------------------------


def test_a_batch_size_of_a_million_is_refused_before_loading(tiny_inplace, recordings, tmp_path, no_loading) -> None:
    line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", "--batch-size", "1000000"))
    assert line.startswith("error: --batch-size 1000000 needs about ") and "fit (auto takes what fits)" in line
    assert not (tmp_path / "o.wav").exists()


def test_a_batch_size_says_how_many_fit(tiny_inplace, recordings, tmp_path, no_loading, monkeypatch) -> None:
    info, finetune = resolve_checkpoints(str(tiny_inplace.base), str(tiny_inplace.finetune))
    outline = bs.model_outline(info, finetune, torch.float32)
    per_stream = bs.stream_bytes(outline, headroom=1.0)
    weights = bs.weight_bytes(outline.lm) + Path(info.mimi_weights).stat().st_size
    monkeypatch.setattr(bs, "free_memory", lambda device: weights + 10 * per_stream + per_stream // 2)
    line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", "--batch-size", "11"))
    assert "at most 10 fit" in line and "available in memory" in line


def test_the_estimate_before_loading_is_the_loaded_models(tiny_inplace, tiny_ttt_mlp) -> None:
    """`check_streams_fit` reads `stream_bytes` off the meta-device outline: the same number auto
    reads off the loaded model, for both families; the weights are what loading takes."""
    for tiny in (tiny_inplace, tiny_ttt_mlp):
        info, finetune = resolve_checkpoints(str(tiny.base), str(tiny.finetune))
        outline = bs.model_outline(info, finetune, torch.float32)
        assert all(p.device.type == "meta" for p in outline.lm.parameters())
        model = load_model(str(tiny.base), str(tiny.finetune), dtype=torch.float32)
        assert bs.stream_bytes(outline) == bs.stream_bytes(model) > 0
        assert bs.weight_bytes(outline.lm) == bs.weight_bytes(model.lm)


# -- 2. threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [usable_cpus() + 1, 100000])
def test_more_threads_than_cpus_are_refused_before_loading(threads, tiny_inplace, recordings, tmp_path) -> None:
    line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", "--threads", str(threads)))
    assert line.startswith("error: --threads must be")
    assert str(min(usable_cpus(), 1024)) in line


# -- 3. config dimensions and types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"context": "lots"}, "context must be a whole number >= 1, got 'lots'"),
        ({"context": 1e9}, "context must be a whole number >= 1, got 1000000000.0"),
        ({"num_heads": None}, "num_heads must be a whole number >= 1, got None"),
        ({"hidden_scale": "4"}, "hidden_scale must be a positive number, got '4'"),
        ({"causal": "yes"}, "causal must be true or false, got 'yes'"),
        ({"delays": "0,1"}, "delays must be a list of whole numbers >= 0"),
        ({"gating": 1}, "gating must be a name, got 1"),
        ({"num_heads": 7}, "dim 64 is not a multiple of num_heads 7"),
        ({"context": 10**9}, "the model cannot run here: its weights"),
        ({"num_layers": 10**6}, "num_layers is 1000000, but the weights hold 4 (transformer.layers.N)"),
        ({"dep_q": 10**9}, "dep_q is 1000000000, but the weights hold 2 (linears.N)"),
        ({"dim": 10**6}, "dim is 1000000, but the weights (model.safetensors) have 64"),
        ({"card": 10**9}, "card is 1000000000, but the weights (model.safetensors) have 128"),
        (
            {"depformer_dim": 32, "depformer_num_heads": 2},
            "depformer_dim is 32, but the weights (model.safetensors) have 16",
        ),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_a_base_config_that_cannot_run_is_one_line_naming_file_and_key(
    changes, message, tiny_inplace, recordings, tmp_path, no_loading
) -> None:
    base = base_with(tiny_inplace, tmp_path / "base", **changes)
    start = time.monotonic()
    for finetune in (None, tiny_inplace.finetune):  # with or without a fine-tune on top
        line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", base=base, finetune=finetune))
        assert line.startswith(f"error: {base / 'config.json'}: ") and message in line, line
    assert time.monotonic() - start < 60  # not after building a million layers


def test_a_finetune_config_value_of_the_wrong_type_names_its_file(tiny_inplace, recordings, tmp_path) -> None:
    finetune = shutil.copytree(tiny_inplace.finetune, tmp_path / "ft")
    config = next(finetune.rglob("config.json"))
    data = json.loads(config.read_text())
    data["context"] = "lots"
    config.write_text(json.dumps(data))
    line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", finetune=finetune))
    assert line == f"error: {config}: context must be a whole number >= 1, got 'lots'"


def test_a_mimi_config_disagreeing_with_its_weights_is_refused(tiny_inplace, recordings, tmp_path, no_loading) -> None:
    base = shutil.copytree(tiny_inplace.base, tmp_path / "base")
    mimi_config = base / "mimi_config.json"
    data = json.loads(mimi_config.read_text())
    data["transformer"]["num_layers"] = 10**6
    mimi_config.write_text(json.dumps(data))
    line = one_error_line(run(tiny_inplace, recordings[0], tmp_path / "o.wav", base=base))
    assert line == f"error: {mimi_config}: transformer.num_layers is 1000000, but the weights hold 1 " + (
        "(encoder_transformer.transformer.layers.N)"
    )
