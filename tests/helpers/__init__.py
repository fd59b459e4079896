"""Helpers the test modules share: signals, file edits, offline guards, and the streaming loops."""

from __future__ import annotations

import json
import math
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.jobs.files import PARTIAL_SUFFIX
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt.ttt.base import TTTController

# -- signals ----------------------------------------------------------------------------------------


def tone(rate: int, seconds: float, freq: float = 300.0, amp: float = 0.4) -> np.ndarray:
    """A pure sine (for checks on frequency and level)."""
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def sweep(rate: int, seconds: float, freq: float = 300.0, amp: float = 0.4, seed: int = 0) -> np.ndarray:
    """A rising tone with a little noise, so the model hears more than a pure tone."""
    t = np.arange(int(round(rate * seconds))) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return amp * np.sin(2 * np.pi * freq * t * (1 + 0.3 * t)) + noise


# -- files ------------------------------------------------------------------------------------------


def edit_json(path: Path, fn: tp.Callable[[dict], tp.Any]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_weights(path: Path, fn: tp.Callable[[dict], tp.Any]) -> None:
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def partials(folder: Path) -> list[Path]:
    """Temporary outputs of ours (or look-alikes) left under `folder`."""
    return sorted(folder.rglob(f"*{PARTIAL_SUFFIX}"))


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- offline --------------------------------------------------------------------------------------


def block_hub(monkeypatch: pytest.MonkeyPatch) -> list[tp.Any]:
    """Make any Hugging Face download fail the test; returns the list of attempts (for asserting
    none happened even where a caller swallowed the error)."""
    import huggingface_hub
    from moshi.models import loaders

    attempts: list[tp.Any] = []

    def no_hub(*args: tp.Any, **kwargs: tp.Any) -> tp.NoReturn:
        attempts.append((args, kwargs))
        raise AssertionError(f"hub download attempted: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(loaders, "hf_hub_download", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


# -- streaming --------------------------------------------------------------------------------------


def run_stream(model: tp.Any, recording: Path) -> tp.Any:
    """A recording through the real runner (seeded, TTT driven, flushed)."""
    return StreamingRunner(model).run(read_audio(recording))


@torch.no_grad()
def stream_lm(
    lm: tp.Any, tokens: torch.Tensor, inspect: tp.Callable[[tp.Any], tp.Any] | None = None
) -> tuple[torch.Tensor, tp.Any]:
    """`lm.forward_text` one token per step, the TTT controller driven as the runner drives it
    (after every step, flushed at the end). Returns the outputs [B, T, ...] and what `inspect(lm)`
    returned inside the stream after the flush (e.g. the final fast weights)."""
    controller = TTTController(lm)
    outs = []
    with lm.streaming(1):
        for t in range(tokens.shape[-1]):
            outs.append(lm.forward_text(tokens[:, :, t : t + 1])[0])
            controller.after_step()
        controller.flush()
        inspected = inspect(lm) if inspect is not None else None
    return torch.cat(outs, dim=1), inspected


# -- a small corpus for distributed runs -----------------------------------------------------------


def write_corpus(folder: Path, seconds: float = 1.0) -> dict[str, str]:
    """A nested folder of short good recordings and bad ones, as a corpus run over many workers
    meets them. Returns {relative path: expected status}."""
    import soundfile as sf

    from moshi_ttt.checkpoints.tiny import write_sample_recordings

    expected = {}
    for sub, seed in (("", 0), ("talks", 1), ("talks/day2", 2)):
        for path in write_sample_recordings(folder / sub, seed=seed, durations=[seconds, seconds * 0.8]):
            target = path.with_name(f"s{seed}_{path.name}")
            path.rename(target)
            expected[target.relative_to(folder).as_posix()] = "ok"
    (folder / "bad").mkdir()
    (folder / "bad" / "text.wav").write_text("these are words, not audio\n" * 40)
    expected["bad/text.wav"] = "failed"
    sf.write(folder / "bad" / "short.wav", sweep(24_000, 0.05), 24_000, subtype="PCM_16")
    expected["bad/short.wav"] = "skipped"
    return expected


def comparable(entry: dict) -> dict:
    """A report entry without what differs between runs of the same work (timings, and the stat
    of the output file each run wrote)."""
    return {k: v for k, v in entry.items() if k not in ("wall_s", "output_stat")}


# Files in `long_recordings` (conftest): enough that a run can be interrupted between files.
N_LONG = 6
CHUNK = 8  # chunk / mini-batch size of both tiny fine-tunes


def check_counts(result, layers: list[int]) -> None:
    assert [r.layer for r in result.ttt_layers] == layers
    for report in result.ttt_layers:
        assert report.tokens == result.steps
        assert report.updates == math.ceil(result.steps / CHUNK)
        assert report.pending_tokens == 0
        assert report.drift > 0
