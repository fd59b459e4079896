"""Shared fixtures: tiny checkpoints in the real on-disk layouts, and recordings, written once."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi reads it at import time; CPU tests

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # small streaming ops: 1 thread is far faster on small CPUs

from helpers import N_LONG  # noqa: E402
from moshi_ttt.checkpoints.tiny import TinyPaths, write_sample_recordings, write_tiny_variant  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_inplace(tiny_root: Path) -> TinyPaths:
    """`base/` and an In-Place fine-tune (moshi_in_place layout, TTT on layers 1 and 3, C=8)."""
    return write_tiny_variant(tiny_root, "inplace", seed=0)


@pytest.fixture(scope="session")
def tiny_ttt_mlp(tiny_root: Path, tiny_inplace: TinyPaths) -> TinyPaths:
    """A TTT-MLP fine-tune (moshi-finetune layout, layers 'middle' = 1 and 2, C=8) of the same base."""
    return write_tiny_variant(tiny_root, "ttt-mlp", seed=0)


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three distinct 24 kHz mono recordings of 1.6, 2.4 and 3.0 s."""
    return write_sample_recordings(tmp_path_factory.mktemp("recordings"), seed=0)


@pytest.fixture(scope="session")
def long_recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 4 s recordings, two folders deep: long enough that a run can be interrupted mid-way."""
    folder = tmp_path_factory.mktemp("long")
    write_sample_recordings(folder / "nested", seed=3, durations=[4.0] * (N_LONG // 2))
    write_sample_recordings(folder, seed=4, durations=[4.0] * (N_LONG - N_LONG // 2))
    assert len(list(folder.rglob("*.wav"))) == N_LONG
    return folder
