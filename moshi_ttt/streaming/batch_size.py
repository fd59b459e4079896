"""How many recordings stream at once (`--batch-size B|auto`).

On a GPU one Moshi step at B=1 leaves most of the device idle, so `auto` fills the memory left
after loading the model with as many streams as fit: each stream needs its own KV caches (LM,
depformer and Mimi attention: `2 x heads x head_dim x context` values per layer) and its own TTT
fast weights (float32, with as much again for the chunk buffers and the update's temporaries),
plus headroom for activations. For Moshi 7B at context 3000 in bfloat16 that is about 1.6 GB of
KV cache per stream, and 185 MB per In-Place TTT layer.

On CPU `auto` takes at most `CPU_BATCH_SIZE` streams (as host memory allows): what
`bench/throughput.py` measured fastest on the project's 2-core machine (see the README's table).

`auto` never picks more streams than the run has files (masked streams cost as much compute as
live ones); it counts every file of the plan, also those kept from an earlier run, so resuming
an interrupted run streams the rest at the batch size the first run used.

The batch size is part of what a run computes: with B rows BLAS sums in another order than with
1 (~1e-7), which can flip near-tie samples, so the report records it (`settings.batch_size`), and
an explicit `--batch-size B` is used as given (never lowered to the number of files): a file
streamed at B gives the same output whatever streams beside it, alone or in any folder.

Before anything loads, `check_streams_fit` refuses in one line a run that cannot fit: an explicit
B whose streams (or a config whose single stream, e.g. `context` 10^9) need more memory than is
free. It reads the same estimate (`stream_bytes`) off `model_outline`: the run's model built on
torch's meta device from its configs, every shape and dtype and no memory.
"""

from __future__ import annotations

import os
import typing as tp
from pathlib import Path
from types import SimpleNamespace

from ..errors import CheckpointError, first_line
from ..options import AUTO, OptionError

CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 64
# Activations, allocator slack and Mimi's convolution states on top of the caches and fast weights.
STREAM_HEADROOM = 1.25
# Share of the free memory `auto` plans to use.
FREE_MEMORY_SHARE = 0.85


def stream_bytes(model: tp.Any, headroom: float = STREAM_HEADROOM) -> int:
    """Device memory one more stream needs, from the model's modules (loaded, or the meta-device
    `model_outline`): KV caches of every self-attention (LM, depformer, Mimi) and TTT fast weights
    with their buffers, times `headroom` for activations."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    from ..ttt.base import FastWeightModule

    total = 0
    for module in [*model.lm.modules(), *model.mimi.modules()]:
        if isinstance(module, StreamingMultiheadAttention) and not module.cross_attention:
            capacity = module.context or module.weights_per_step or 0
            heads = module.num_heads // module.kv_repeat
            element = next(module.parameters()).element_size()
            total += 2 * heads * (module.embed_dim // module.num_heads) * capacity * element
        elif isinstance(module, FastWeightModule):
            fast = sum(weight.numel() for weight in module.initial_fast_weights().values())
            total += 2 * fast * 4  # float32 fast weights, and as much for buffers and temporaries
    return int(total * headroom)


def weight_bytes(module: tp.Any) -> int:
    """Memory a module's parameters and buffers take (read off shapes and dtypes: meta works too)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_outline(info: tp.Any, finetune: tp.Any, dtype: tp.Any) -> SimpleNamespace:
    """The model a run builds from `info` (moshi's `CheckpointInfo`, its LM config as the run
    loads it) and `finetune`, on the meta device: the LM in `dtype` with the TTT layers attached
    (LoRA adapters are merged, so they add nothing), and Mimi's two transformers (float32, as
    loaded). `stream_bytes` reads it as it reads a loaded model."""
    import torch
    from moshi.models import loaders
    from moshi.modules.transformer import ProjectedTransformer

    from ..ttt.families import family_of

    lm_kwargs = None
    if info.lm_config is not None:
        lm_kwargs = {k: v for k, v in info.lm_config.items() if k not in ("lora", "lora_rank", "lora_scaling")}
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=dtype)
    if finetune is not None and finetune.ttt is not None:
        family_of(finetune.ttt).attach(lm, finetune.ttt)
    transformer = (info.mimi_config or loaders._mimi_config)["transformer"]
    mimi = torch.nn.ModuleList(ProjectedTransformer(device="meta", **transformer) for _ in ("encoder", "decoder"))
    return SimpleNamespace(lm=lm, mimi=mimi)


def check_streams_fit(
    requested: int | str | None, info: tp.Any, finetune: tp.Any, device: tp.Any, dtype: tp.Any, source: Path
) -> None:
    """Refuse, before anything loads, a run that cannot fit in the memory free on `device`: the
    model's weights and `requested` streams (one for "auto"), estimated as `stream_bytes` does
    (without the activation headroom: only what is sure not to fit is refused). An explicit
    batch size that is too large is an `OptionError` saying how many fit; a model whose weights
    and single stream cannot fit (a config's `context` of 10^9) a `CheckpointError` naming
    `source`, the config it came from."""
    free = free_memory(device)
    if free is None:
        return
    try:
        outline = model_outline(info, finetune, dtype)
    except Exception as exc:  # moshi asserts on inconsistent configs; say which file
        raise CheckpointError(f"cannot build the model its config describes ({first_line(exc)})", source) from None
    per_stream = stream_bytes(outline, headroom=1.0)
    weights = weight_bytes(outline.lm) + _file_size(info.mimi_weights)
    streams = 1 if requested in (None, AUTO) else int(requested)
    if weights + streams * per_stream <= free:
        return
    here = f"{size_text(free)} {'free on the GPU' if device.type == 'cuda' else 'available in memory'}"
    fit = max(0, (free - weights) // max(per_stream, 1))
    if streams > 1 and fit >= 1:
        raise OptionError(
            "batch_size",
            f"{streams} needs about {size_text(streams * per_stream)} for its streams ({size_text(per_stream)} each) "
            f"beside {size_text(weights)} of weights, but {here}: at most {fit} fit (auto takes what fits)",
        )
    context = (info.lm_config or {}).get("context")
    raise CheckpointError(
        f"the model cannot run here: its weights ({size_text(weights)}) and one stream ({size_text(per_stream)}: "
        f"KV caches for a context of {context} frames, TTT fast weights) need more than the {here}",
        source,
    )


def _file_size(path: tp.Any) -> int:
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0


def size_text(count: int) -> str:
    """Bytes as people read them (1.5 GiB)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_memory(device: tp.Any) -> int | None:
    """Bytes free for new streams on `device`: the GPU's free memory, or the host's available
    memory (Linux `MemAvailable`) on CPU; None where unknown."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_batch_size(requested: int | str, model: tp.Any, files: int) -> tuple[int, str]:
    """The batch size for a run of `files` recordings, and why (said to the user, recorded in
    the report). `requested` "auto" (or None): as many streams as fit in free memory, at most
    `CPU_BATCH_SIZE` on CPU and `MAX_AUTO_BATCH_SIZE` on a GPU."""
    files = max(files, 1)
    if isinstance(requested, int):  # exactly as asked: the same B gives the same outputs (see above)
        return requested, f"--batch-size {requested}"
    cap, where = (MAX_AUTO_BATCH_SIZE, "GPU") if model.device.type == "cuda" else (CPU_BATCH_SIZE, "CPU")
    free, per_stream = free_memory(model.device), stream_bytes(model)
    fit = cap if free is None else int(free * FREE_MEMORY_SHARE // max(per_stream, 1))
    size = max(1, min(fit, cap, files))
    why = [f"auto: at most {cap} on {where}"]
    if free is not None:
        gib = 1024**3
        why.append(f"{fit} fit in {free / gib:.1f} GiB free at {per_stream / gib:.2f} GiB each")
    if size == files and files < min(fit, cap):
        why.append(f"{files} file{'s' if files > 1 else ''} in the run")
    return size, ", ".join(why)
