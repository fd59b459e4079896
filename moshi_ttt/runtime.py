"""Process-level choices made before moshi is imported: torch.compile, threads, device, dtype.

torch is imported inside the functions, so importing this module (and `moshi_ttt`) stays cheap:
`moshi-ttt --help` must not wait for torch.
"""

from __future__ import annotations

import os
import typing as tp

if tp.TYPE_CHECKING:
    import torch

DEFAULT_BASE = "kyutai/moshiko-pytorch-bf16"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# The device a library user (or the CLI's --device) chose; read when moshi is about to be imported.
DEVICE_VARIABLE = "MOSHI_TTT_DEVICE"


def prepare_environment(device: str | None = None) -> None:
    """Disable moshi's torch.compile when running on CPU.

    moshi decides at import time (`torch_compile_lazy`), and on CPU its compiled `_rms_norm`
    costs ~9 s on the first step while gaining nothing, so this must run before moshi is
    imported: the package's import hook (see `moshi_ttt/__init__.py`) calls it when moshi is
    first imported. `device` defaults to $MOSHI_TTT_DEVICE, else "auto". A value the user set
    explicitly is respected.
    """
    if "NO_TORCH_COMPILE" in os.environ:
        return
    if resolve_device(device or os.environ.get(DEVICE_VARIABLE, "auto")).type == "cpu":
        os.environ["NO_TORCH_COMPILE"] = "1"


def prepare_runtime(
    device: str = "auto", dtype: str = "auto", threads: int | None = None
) -> tuple[torch.device, torch.dtype, int]:
    """Everything a run settles about the process before moshi loads: the device (remembered in
    $MOSHI_TTT_DEVICE for `prepare_environment`), the dtype and the intra-op threads."""
    os.environ[DEVICE_VARIABLE] = device
    prepare_environment(device)
    torch_device = resolve_device(device)
    return torch_device, resolve_dtype(dtype, torch_device), set_threads(threads, torch_device)


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"--device {device} was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU (what Moshi ships in) and float32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


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
    import torch

    n = threads if threads is not None else default_threads(device)
    if n < 1:
        from .errors import MoshiTTTError

        raise MoshiTTTError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n
