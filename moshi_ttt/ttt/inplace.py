"""In-Place Test-Time Training (ICLR 2026, Algorithm 1) on Moshi's gated MLP.

The gated MLP computes `Z = act(X W_gate^T) * (X W_up^T)` and `O = Z W_down^T`. In a TTT layer
`W_down` is a fast weight `W` (float32). Tokens are split into chunks of C; for chunk i:

    O_i     = Z_i W^(i)T                      (weights from *before* the chunk)
    V_i     = Conv1D_K(X0_i) W_target^T       (X0: the transformer's input embeddings; the conv
                                               looks ahead, zero-padded at the chunk's end)
    D_i     = V_i^T Z_i
    W^(i+1) = W^(i) + lr * D_i * min(1, tau / (||D_i||_F + eps))

The clip bounds the delta *before* the learning rate, as Algorithm 1 and the research
`TTTGating` (moshi_in_place, `delta_clip_fro_norm`, `delta_clip_epsilon`) do; tau = None is
no clipping.

Streaming (one token per `LMGen.step`) buffers each token's Z and X0 and applies the update when
the controller commits a full chunk (only then is the look-ahead available) or flushes a partial
one. Each stream of a streaming batch has its own W and chunk buffer, and streams that fill a
chunk at the same step are updated together (see `base.py`). The parallel path computes the
same thing over a whole sequence at once.
"""

from __future__ import annotations

import json
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from .base import AppliedUpdate, FastWeightModule, FastWeightState, StreamRows, chunk_buffer
from .config import number
from .families import SectionLayout, TTTFamily


@dataclass
class InPlaceTTTConfig:
    """TTT hyper-parameters of an In-Place fine-tune (read from its checkpoint)."""

    layers: list[int]
    chunk_size: int
    learning_rate: float
    conv_kernel_size: int = 2
    # Frobenius-norm bound tau on each chunk's delta V^T Z (before the learning rate); None = off.
    delta_clip: float | None = None
    delta_clip_epsilon: float = 1e-12
    # Where delta_clip came from ("config", "research default", "--delta-clip"): shown by
    # `inspect` and recorded in reports, since a silent 1e-5 default changes outputs a lot.
    delta_clip_origin: str = "config"

    variant: tp.ClassVar[str] = "inplace"


class TokenEmbeddingTap:
    """Holds the temporal transformer's current input (X0), captured by a forward pre-hook.

    The In-Place target is built from X0 rather than from the layer's own input, so each TTT
    layer needs the tensor the transformer was called with. Under a CUDA graph the hook runs at
    capture time and the captured kernels keep reading the same (graph-owned) memory on replay.
    """

    def __init__(self, transformer: nn.Module):
        self.current: torch.Tensor | None = None
        self._handle = transformer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.current = args[0]

    def get(self) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("TTT target needs the transformer input, but none was captured")
        return self.current


class Conv1dWrapper(nn.Module):
    """Named to match the checkpoint keys `target_generator.conv1d.conv.weight`."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, bias=False)


class TargetGenerator(nn.Module):
    """V = Conv1D(X0) W_target^T over one or more chunks, never looking past a chunk's end."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d = Conv1dWrapper(dim, kernel_size)
        self.W_target = nn.Linear(dim, dim, bias=False)

    def forward(self, x0_chunks: torch.Tensor) -> torch.Tensor:
        """`x0_chunks` [N, L, D] (N independent chunks of L tokens) -> V [N, L, D], float32.

        Kernel index k multiplies token t + k (index 0 = current token, 1 = next), so the input
        is zero-padded on the right: the last tokens of a chunk see zeros, not the next chunk.
        """
        x = x0_chunks.float().transpose(1, 2)
        x = F.pad(x, (0, self.kernel_size - 1))
        conv = F.conv1d(x, self.conv1d.conv.weight.float())
        return F.linear(conv.transpose(1, 2), self.W_target.weight.float())


def clip_scale(norm: torch.Tensor, delta_clip: float | None, eps: float) -> torch.Tensor:
    """The factor a chunk's delta is multiplied by: `min(1, tau / (||D||_F + eps))`."""
    if delta_clip is None:
        return torch.ones_like(norm)
    return (delta_clip / (norm + eps)).clamp(max=1.0)


def chunk_scales(
    v: torch.Tensor, z: torch.Tensor, chunk_ids: torch.Tensor, n_chunks: int, delta_clip: float | None, eps: float
) -> torch.Tensor:
    """Per-token factor that applies each chunk's delta clipping, [B, T].

    ||V_c^T Z_c||_F^2 = sum_{t,u in c} (v_t . v_u)(z_t . z_u), so the norms come from Gram
    matrices without materialising one [D, H] delta per chunk.
    """
    if delta_clip is None:
        return torch.ones(v.shape[:2], dtype=v.dtype, device=v.device)
    same_chunk = chunk_ids[:, None] == chunk_ids[None, :]
    gram = (v @ v.transpose(1, 2)) * (z @ z.transpose(1, 2)) * same_chunk
    per_token = gram.sum(dim=2)  # sum over u in t's chunk
    sq = torch.zeros(v.shape[0], n_chunks, dtype=v.dtype, device=v.device)
    sq.index_add_(1, chunk_ids, per_token)
    return clip_scale(sq.clamp_min(0).sqrt(), delta_clip, eps)[:, chunk_ids]


def inplace_ttt_parallel(
    z: torch.Tensor,
    x0: torch.Tensor,
    w0: torch.Tensor,
    target: TargetGenerator,
    chunk_size: int,
    lr: float,
    delta_clip: float | None = None,
    delta_clip_epsilon: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel In-Place TTT over whole sequences (as in training).

    z [B, T, H], x0 [B, T, D], w0 [D, H] -> outputs [B, T, D] and final fast weights [B, D, H],
    all float32. Equivalent to a prefix sum of chunk deltas, written in its dual form:
    `Z_i (sum_{j<i} dW_j)^T = lr * sum_{j<i} (Z_i Z_j^T) V_j`, i.e. a block-causal product that
    never materialises per-chunk weights. Tokens past T never exist, so no padding enters an update.
    """
    B, T, _ = z.shape
    z = z.float()
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T
    x0_chunks = F.pad(x0.float(), (0, 0, 0, pad)).view(B * n_chunks, chunk_size, -1)
    v = target(x0_chunks).view(B, n_chunks * chunk_size, -1)[:, :T]

    chunk_ids = torch.arange(T, device=z.device) // chunk_size
    v = v * chunk_scales(v, z, chunk_ids, n_chunks, delta_clip, delta_clip_epsilon)[..., None]
    out = F.linear(z, w0.float())
    w_final = w0.float().expand(B, -1, -1)
    if lr != 0.0:
        strictly_earlier_chunk = chunk_ids[None, :] < chunk_ids[:, None]  # [t, u]: chunk(u) < chunk(t)
        scores = (z @ z.transpose(1, 2)) * strictly_earlier_chunk
        out = out + lr * (scores @ v)
        w_final = w_final + lr * (v.transpose(1, 2) @ z)
    return out, w_final


class InPlaceTTTGating(FastWeightModule):
    """Drop-in replacement for a layer's `ActivationGating` whose down projection adapts.

    Keeps the original `linear_in` / `linear_out` (same state-dict keys as the base model) and adds
    `target_generator.{conv1d.conv,W_target}` (the fine-tune's keys). `w_down` is W^(0) in
    float32: the base `linear_out.weight`, unless the checkpoint carries its own `gating.w_down`
    (the research module's name for the fast weight), which then loads over it.
    """

    def __init__(self, gating: nn.Module, layer_index: int, config: InPlaceTTTConfig, x0_tap: TokenEmbeddingTap):
        super().__init__(layer_index, config.chunk_size)
        self.linear_in = gating.linear_in
        self.linear_out = gating.linear_out
        self.activation = gating.activation
        self.config = config
        self.x0_tap = x0_tap
        dim, hidden = self.linear_out.weight.shape
        device = self.linear_out.weight.device
        self.target_generator = TargetGenerator(dim, config.conv_kernel_size).to(device)
        self.register_buffer("w_down", self.linear_out.weight.detach().float().clone())
        self.last_parallel_state: dict[str, torch.Tensor] = {}

    def initial_fast_weights(self) -> dict[str, torch.Tensor]:
        return {"W": self.w_down}

    def _make_scratch(self, batch_size: int) -> dict[str, torch.Tensor]:
        dim, hidden = self.w_down.shape
        device = self.w_down.device
        return {
            "z": chunk_buffer(batch_size, self.chunk_size, hidden, device),
            "x0": chunk_buffer(batch_size, self.chunk_size, dim, device),
        }

    @property
    def learning_rate(self) -> float:
        return 0.0 if self.frozen else self.config.learning_rate

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        # Same ops as moshi's gating kernel, so with a zero learning rate the output is identical.
        h = F.linear(x, self.linear_in.weight)
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        return self.activation(h[..., 0, :]) * h[..., 1, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self._gate(x)
        x0 = self.x0_tap.get()
        state = self._streaming_state
        if state is None:
            out, w_final = inplace_ttt_parallel(
                z,
                x0,
                self.w_down,
                self.target_generator,
                self.chunk_size,
                self.learning_rate,
                self.config.delta_clip,
                self.config.delta_clip_epsilon,
            )
            self.last_parallel_state = {"W": w_final}
            return out.to(x.dtype)
        self._begin_step(state, x.shape[1])
        out = torch.bmm(z.float(), state.fast["W"].transpose(1, 2))  # each stream reads its own W: [B, 1, D]
        # Fixed-shape writes at device-side positions: graph-capturable, no host sync.
        state.buffer_tokens({"z": z[:, 0], "x0": x0[:, 0]})
        state.advance()
        return out.to(x.dtype)

    def _apply_chunk(self, state: FastWeightState, rows: StreamRows, n: int) -> AppliedUpdate:
        z = rows.read(state.scratch["z"])[:, :n]  # [S, n, H]
        v = self.target_generator(rows.read(state.scratch["x0"])[:, :n])  # [S, n, D]
        delta = v.transpose(1, 2) @ z  # [S, D, H]
        # torch ops only (no .item()): commits run outside the graph but need not sync.
        norm = torch.linalg.matrix_norm(delta)
        scale = clip_scale(norm, self.config.delta_clip, self.config.delta_clip_epsilon)
        lr = self.config.learning_rate
        rows.add_(state.fast["W"], lr * (delta * scale[:, None, None]))
        if state.timeline is None:
            return AppliedUpdate(clipped=scale < 1.0)
        # The applied change is lr * scale * D, so its norm is |lr| * scale * ||D||_F.
        return AppliedUpdate(
            clipped=scale < 1.0, update_norm=abs(lr) * scale * norm, update_norm_unclipped=abs(lr) * norm
        )


# -- the family: config, attachment, checkpoint keys, tiny checkpoints ----------------------------


def _delta_clip(section: dict, source: Path, default: float | None) -> tuple[float | None, str]:
    """tau from `delta_clip_fro_norm` (research key) or `delta_clip` (alias); null or <= 0 is off."""
    values = {
        key: number(section, key, source, float, None)
        for key in ("delta_clip_fro_norm", "delta_clip")
        if key in section
    }
    if not values:
        return default, "config" if default is None else "research default (no delta_clip_fro_norm in config)"
    if len(set(map(str, values.values()))) > 1:
        raise CheckpointError(f"delta_clip_fro_norm and its alias delta_clip disagree ({values})", source)
    key, value = next(iter(values.items()))
    if value is not None and not math.isfinite(value):  # NaN must not silently mean "off"
        raise CheckpointError(f"TTT config {key!r} must be a finite number, got {value}", source)
    return (value if value is not None and value > 0 else None), "config"


class InPlaceFamily(TTTFamily):
    """moshi_in_place fine-tunes: `ttt_config` in config.json, target generators in lora.safetensors."""

    name = "inplace"
    marker_keys = ("chunk_size", "learning_rate")
    # On the tiny 4-layer model: layers 1 and 3, chunks of 8 tokens. The clip is written
    # explicitly (without it the layout implies the research default 1e-5, which clips every
    # update); at 400 it fires on some chunks of the sample recordings and not on others (their
    # deltas' norms are ~270-480), so clipped and unclipped updates both get exercised.
    tiny_section = {
        "enabled": True,
        "start_layer": 1,
        "layer_frequency": 2,
        "chunk_size": 8,
        "learning_rate": 0.002,
        "conv_kernel_size": 2,
        "delta_clip_fro_norm": 400.0,
    }
    tiny_std = 0.3

    def parse(self, section: dict, layers: list[int], source: Path, layout: SectionLayout) -> InPlaceTTTConfig:
        delta_clip, delta_clip_origin = _delta_clip(section, source, layout.defaults.get("delta_clip"))
        config = InPlaceTTTConfig(
            layers=layers,
            chunk_size=number(section, "chunk_size", source, int),
            learning_rate=number(section, "learning_rate", source),
            conv_kernel_size=number(section, "conv_kernel_size", source, int, 2),
            delta_clip=delta_clip,
            delta_clip_epsilon=number(section, "delta_clip_epsilon", source, float, 1e-12),
            delta_clip_origin=delta_clip_origin,
        )
        if config.conv_kernel_size < 1:
            raise CheckpointError(f"conv_kernel_size must be >= 1, got {config.conv_kernel_size}", source)
        return config

    def chunk_size(self, config: InPlaceTTTConfig) -> int:
        return config.chunk_size

    def attach(self, lm: nn.Module, config: InPlaceTTTConfig) -> list[FastWeightModule]:
        tap = TokenEmbeddingTap(lm.transformer)
        modules: list[FastWeightModule] = []
        for index in config.layers:
            layer = lm.transformer.layers[index]
            if (
                not isinstance(layer.gating, nn.Module)
                or not hasattr(layer.gating, "linear_out")
                or isinstance(layer.gating, nn.ModuleList)
            ):
                raise CheckpointError(f"layer {index} has no gated MLP to adapt (In-Place TTT needs one)")
            layer.gating = InPlaceTTTGating(layer.gating, index, config, tap)
            modules.append(layer.gating)
        return modules

    def ignored_keys(self, config: InPlaceTTTConfig) -> tuple[str, ...]:
        # The research module saves `w_down_pretrained`, a copy of `w_down` it resets to on request.
        return tuple(f"transformer.layers.{i}.gating.w_down_pretrained" for i in config.layers)

    def owns_key(self, key_in_layer: str) -> bool:
        return key_in_layer.startswith(("gating.target_generator.", "gating.w_down"))

    def write_tiny_config(self, folder: Path, lm_config: dict, section: dict, run_dir: Path, seed: int) -> None:
        config = {
            **lm_config,
            "ttt_config": section,
            "yarn_config": {"enabled": False},
            "lora": True,
            "lora_rank": 16,
            "lora_scaling": 2.0,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


FAMILY = InPlaceFamily()
