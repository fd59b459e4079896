"""Process-level choices made before moshi is imported: torch.compile, threads, device, dtype."""

from __future__ import annotations

import os

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def prepare_environment(device: str = "auto") -> None:
    """Disable moshi's torch.compile when running on CPU.

    moshi decides at import time (`torch_compile_lazy`), and on CPU its compiled `_rms_norm`
    costs ~9 s on the first step while gaining nothing, so this must run before moshi is
    imported. A value the user set explicitly is respected.
    """
    if resolve_device(device).type == "cpu":
        os.environ.setdefault("NO_TORCH_COMPILE", "1")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"--device {device} was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU (what Moshi ships in) and float32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}") from None


def default_threads(device: torch.device) -> int:
    """Intra-op thread count chosen on purpose rather than left to torch.

    Streaming runs one 80 ms frame at a time: small matmuls and convs where thread hand-off
    dominates. On 2-core machines torch's default of 2 threads made a small conv1d ~200x slower
    than 1 thread. On GPU the CPU only launches kernels. Larger CPUs get half their logical
    cores (roughly the physical ones), capped at 8, where a 7B model's matmuls do benefit.
    """
    cores = os.cpu_count() or 1
    if device.type != "cpu" or cores <= 2:
        return 1
    return min(8, cores // 2)


def set_threads(threads: int | None, device: torch.device) -> int:
    n = threads if threads is not None else default_threads(device)
    if n < 1:
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n
