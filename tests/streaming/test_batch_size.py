"""`--batch-size B|auto`: what auto picks from free memory, and what is refused."""

from __future__ import annotations

import types

import pytest
import torch
from moshi.modules.transformer import StreamingMultiheadAttention

from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.options import RunOptions
from moshi_ttt.streaming import batch_size as bs
from moshi_ttt.ttt.base import FastWeightModule


@pytest.fixture(scope="module")
def models(tiny_inplace):
    return (load_model(str(tiny_inplace.base)), load_model(str(tiny_inplace.base), str(tiny_inplace.finetune)))


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "many", "8x"])
def test_bad_batch_sizes_are_refused(text: str) -> None:
    with pytest.raises(MoshiTTTError, match="batch_size must be a positive number or auto"):
        RunOptions(batch_size=text).validate()


def test_batch_sizes_parse() -> None:
    assert [RunOptions(batch_size=v).validate().batch_size for v in ("auto", None, "4", 3)] == ["auto", "auto", 4, 3]


def test_stream_bytes_counts_every_kv_cache_and_the_fast_weights(models) -> None:
    plain, ttt = models
    kv = 0
    for module in [*plain.lm.modules(), *plain.mimi.modules()]:
        if isinstance(module, StreamingMultiheadAttention) and not module.cross_attention:
            # What moshi allocates: a [2, B, heads, capacity, head_dim] ring buffer.
            state = module._init_streaming_state(1)
            kv += state.kv_cache.cache.numel() * state.kv_cache.cache.element_size()
    assert kv > 0 and bs.stream_bytes(plain) == int(kv * bs.STREAM_HEADROOM)
    fast = sum(
        w.numel()
        for m in ttt.lm.modules()
        if isinstance(m, FastWeightModule)
        for w in m.initial_fast_weights().values()
    )
    assert fast > 0
    assert bs.stream_bytes(ttt) == int((kv + 2 * 4 * fast) * bs.STREAM_HEADROOM)


def test_auto_fills_free_memory_and_is_capped(models, monkeypatch) -> None:
    _, model = models
    per_stream = bs.stream_bytes(model)
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0), lm=model.lm, mimi=model.mimi)
    monkeypatch.setattr(bs, "free_memory", lambda device: int(10.5 * per_stream / bs.FREE_MEMORY_SHARE))
    size, why = bs.choose_batch_size(None, gpu, files=100)
    assert size == 10 and why.startswith("auto: at most 64 on GPU, 10 fit in")
    assert bs.choose_batch_size(None, gpu, files=3) == (3, why + ", 3 files in the run")
    monkeypatch.setattr(bs, "free_memory", lambda device: 1000 * per_stream)
    assert bs.choose_batch_size(None, gpu, files=1000)[0] == bs.MAX_AUTO_BATCH_SIZE
    assert bs.choose_batch_size(None, model, files=1000)[0] == bs.CPU_BATCH_SIZE  # CPU
    monkeypatch.setattr(bs, "free_memory", lambda device: per_stream // 10)
    assert bs.choose_batch_size(None, model, files=5)[0] == 1  # never below one stream
    assert bs.choose_batch_size(4, model, files=5) == (4, "--batch-size 4")
    assert bs.choose_batch_size(16, model, files=5) == (16, "--batch-size 16")  # as asked: reproducible


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be a positive number or auto"),
        (["--batch-size", "lots"], "--batch-size must be a positive number or auto"),
        (["--decode-chunk", "0"], "--decode-chunk must be a positive number"),
    ],
)
def test_bad_batch_options_exit_2_before_loading(
    args, message, tiny_inplace, recordings, tmp_path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from moshi_ttt_cli import app as app_module

    monkeypatch.setattr(app_module, "_load_model_stack", lambda *a, **k: pytest.fail("imported the model stack"))
    argv = ["infer", str(recordings[0]), str(tmp_path / "o.wav"), *args, "--base", str(tiny_inplace.base)]
    result = CliRunner().invoke(app_module.app, argv)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {message}")
    assert not (tmp_path / "o.wav").exists()
