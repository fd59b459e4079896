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
"""

from __future__ import annotations

import typing as tp

CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 64
# Activations, allocator slack and Mimi's convolution states on top of the caches and fast weights.
STREAM_HEADROOM = 1.25
# Share of the free memory `auto` plans to use.
FREE_MEMORY_SHARE = 0.85


def stream_bytes(model: tp.Any) -> int:
    """Device memory one more stream needs, from the loaded model's modules: KV caches of every
    self-attention (LM, depformer, Mimi) and TTT fast weights with their buffers, plus headroom."""
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
    return int(total * STREAM_HEADROOM)


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
