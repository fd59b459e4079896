"""YaRN RoPE scaling as the moshi_in_place training code computes it, on top of moshi's LM.

A fine-tune whose LM config carries `yarn_config: {enabled: true, scale, original_max_seq_len,
beta_fast, beta_slow, mscale, mscale_all_dim}` was trained with scaled rotary frequencies, and its
inference code (`run_inference.py`) also extends the attention context to `int(context * scale)`
(the KV cache capacity). Both are properties of the LM, not of a TTT family, so they are applied
to whatever LM the run loads: the context in the LM config before moshi builds the model, the
frequencies by replacing each transformer's `RotaryEmbedding` afterwards.

The training code's variant differs from the YaRN paper (Peng et al. 2023), and the checkpoint
was trained with it, so that is what runs here:
- the ramp is linear in *wavelength*, from `beta_slow * L` (below: frequency kept) to
  `beta_fast * L` (above: frequency divided by `scale`), where the paper ramps in rotations
  `L / wavelength` between `beta_slow` and `beta_fast`;
- the attention factor is 1 whenever `mscale == 1.0` (whatever `mscale_all_dim`), and otherwise
  multiplies the rotated *queries only* (the paper scales both q and k, i.e. the logits by m^2).
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

# Defaults of the training code's `YaRNArgs` (moshi-finetune/finetune/args.py), which its
# loader also falls back to for absent keys.
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
# `run_inference.py` reads these two with `[]`: a config without them never ran there.
YARN_REQUIRED = ("scale", "original_max_seq_len")
YARN_KEYS = ("enabled", *YARN_REQUIRED, *YARN_DEFAULTS)
DEFAULT_CONTEXT = 3000  # run_inference.py's fallback when the LM config has no `context`


@dataclass(frozen=True)
class YarnConfig:
    scale: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def describe(self) -> dict[str, tp.Any]:
        return {"kind": "yarn", **asdict(self), "attention_factor": yarn_attention_factor(self)}


def parse_yarn_config(lm_config: dict, source: Path) -> YarnConfig | None:
    """The `yarn_config` of an LM config; None when absent or not enabled.

    As `run_inference.py`: only `enabled: true` turns it on. Keys the training code never wrote
    (e.g. Hugging Face's `factor`, `rope_type`) are refused rather than ignored: they mean the
    config came from other code, whose RoPE we would silently get wrong.
    """
    section = lm_config.get("yarn_config")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise CheckpointError(f"yarn_config must be a mapping, got {type(section).__name__}", source)
    unknown = sorted(set(section) - set(YARN_KEYS))
    if unknown:
        raise CheckpointError(
            f"yarn_config key {unknown[0]!r} is not supported (RoPE scaling keys: {', '.join(YARN_KEYS)})", source
        )
    if not section.get("enabled", False):
        return None
    values: dict[str, float] = {}
    for key in (*YARN_REQUIRED, *YARN_DEFAULTS):
        value = section.get(key, YARN_DEFAULTS.get(key))
        if value is None:
            raise CheckpointError(f"yarn_config has no {key!r}: cannot apply RoPE scaling", source)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"yarn_config {key!r} must be a finite number, got {value!r}", source)
        values[key] = float(value)
    config = YarnConfig(
        scale=values["scale"],
        original_max_seq_len=int(values["original_max_seq_len"]),
        beta_fast=values["beta_fast"],
        beta_slow=values["beta_slow"],
        mscale=values["mscale"],
        mscale_all_dim=values["mscale_all_dim"],
    )
    # The training code asserts these (YaRNArgs.__post_init__); anything else never trained.
    if config.scale < 1.0:
        raise CheckpointError(f"yarn_config 'scale' must be >= 1, got {config.scale}", source)
    if config.original_max_seq_len <= 0 or config.original_max_seq_len != values["original_max_seq_len"]:
        raise CheckpointError(
            f"yarn_config 'original_max_seq_len' must be a positive integer, got {section['original_max_seq_len']!r}",
            source,
        )
    if config.beta_fast <= config.beta_slow:
        raise CheckpointError(
            f"yarn_config 'beta_fast' ({config.beta_fast}) must be > 'beta_slow' ({config.beta_slow})", source
        )
    return config


def extended_context(context: int | None, yarn: YarnConfig | None) -> int | None:
    """The attention context inference runs with: `int(context * scale)` under YaRN, as
    `run_inference.py` sets it (e.g. 3000 -> 12000 at scale 4)."""
    if yarn is None or context is None:
        return context
    return int(context * yarn.scale)


def yarn_inverse_frequencies(head_dim: int, max_period: float, yarn: YarnConfig) -> torch.Tensor:
    """Scaled RoPE inverse frequencies [head_dim / 2], float32.

    With h = head_dim / 2 and i = 0..h-1:
        theta_i  = max_period^(-i / h)                    (plain RoPE)
        lambda_i = 2 pi / theta_i                          (wavelength, in tokens)
        r_i      = clamp((lambda_i - beta_slow L) / ((beta_fast - beta_slow) L), 0, 1)
        theta'_i = (1 - r_i) theta_i + r_i theta_i / scale
    where L = original_max_seq_len: short wavelengths (< beta_slow L) keep their frequency, long
    ones (> beta_fast L) are interpolated by 1 / scale, linearly in wavelength in between.
    Computed in float32 as the training code does.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    half = head_dim // 2
    exponent = torch.arange(half, dtype=torch.float32) / half
    theta = 1.0 / (max_period**exponent)
    if yarn.scale <= 1.0:
        return theta
    wavelength = 2 * math.pi * max_period**exponent
    low, high = yarn.beta_slow * yarn.original_max_seq_len, yarn.beta_fast * yarn.original_max_seq_len
    ramp = ((wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - ramp) * theta + ramp * (theta / yarn.scale)


def yarn_attention_factor(yarn: YarnConfig) -> float:
    """The factor the rotated queries are multiplied by.

    g(s, mu) = 0.1 mu ln(s) + 1 for s > 1 (1 otherwise); the factor is g(s, mscale), divided by
    g(s, mscale_all_dim) when mscale_all_dim > 0 -- and exactly 1 when mscale == 1.0, where the
    training code skips the computation altogether.
    """
    if yarn.mscale == 1.0:
        return 1.0

    def g(s: float, mu: float) -> float:
        return 1.0 if s <= 1.0 else 0.1 * mu * math.log(s) + 1.0

    factor = g(yarn.scale, yarn.mscale)
    if yarn.mscale_all_dim > 0:
        factor /= g(yarn.scale, yarn.mscale_all_dim)
    return factor


def rotate_with_frequencies(
    q: torch.Tensor,
    k: torch.Tensor,
    offset: torch.Tensor,
    inv_freq: torch.Tensor,
    q_factor: float = 1.0,
    interleave: bool = True,
    time_before_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with given inverse frequencies (moshi's `apply_rope` derives them from max_period).

    Pair j of a head vector (interleaved: dims 2j, 2j+1; else j, j + D/2) at position t = offset +
    index is rotated by the angle t * inv_freq[j], in float32; the rotated queries are then
    multiplied by `q_factor` (YaRN's attention factor; keys never are).
    """
    if time_before_heads:
        B, T, _, D = q.shape
    else:
        B, _, T, D = q.shape
    positions = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32)
    positions = positions.view(B, -1, 1, 1) if time_before_heads else positions.view(B, 1, -1, 1)
    angles = inv_freq.to(q.device) * positions
    cos, sin = torch.cos(angles), torch.sin(angles)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if interleave:
            pairs = x.view(*x.shape[:-1], D // 2, 2)
            return pairs[..., 0].float(), pairs[..., 1].float()
        return x[..., : D // 2].float(), x[..., D // 2 :].float()

    def join(real: torch.Tensor, imag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        real, imag = real.to(like.dtype), imag.to(like.dtype)
        if interleave:
            return torch.stack([real, imag], dim=-1).view(like.shape)
        return torch.cat([real, imag], dim=-1)

    qr, qi = split(q)
    kr, ki = split(k)
    q_real, q_imag = qr * cos - qi * sin, qr * sin + qi * cos
    k_real, k_imag = kr * cos - ki * sin, kr * sin + ki * cos
    if q_factor != 1.0:
        q_real, q_imag = q_real * q_factor, q_imag * q_factor
    return join(q_real, q_imag, q), join(k_real, k_imag, k)


class YarnRotaryEmbedding(nn.Module):
    """Stands in for moshi's `RotaryEmbedding` (same call signature, same attributes)."""

    def __init__(self, head_dim: int, max_period: float, interleave: bool, yarn: YarnConfig):
        super().__init__()
        self.max_period = max_period
        self.interleave = interleave
        self.yarn = yarn
        self.attention_factor = yarn_attention_factor(yarn)
        self.register_buffer("inv_freq", yarn_inverse_frequencies(head_dim, max_period, yarn), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, time_before_heads: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotate_with_frequencies(
            q, k, offset, self.inv_freq, self.attention_factor, self.interleave, time_before_heads
        )


def apply_yarn(lm: nn.Module, yarn: YarnConfig) -> int:
    """Replace the RoPE of every transformer in `lm` by the YaRN one; return how many were replaced.

    The training code passes the YaRN kwargs to every `StreamingTransformer` the LM builds (the
    depformer inherits the main kwargs), each with its own head dimension; the attention layers
    share their transformer's rope module, so each one is swapped where it is referenced. At
    scale 1 the training code keeps plain RoPE, and so do we.
    """
    from moshi.modules.transformer import StreamingTransformer

    if yarn.scale <= 1.0:
        return 0
    replaced = 0
    for transformer in lm.modules():
        if not isinstance(transformer, StreamingTransformer) or transformer.rope is None:
            continue
        old = transformer.rope
        first = transformer.layers[0].self_attn
        device = next(transformer.parameters()).device
        new = YarnRotaryEmbedding(
            first.embed_dim // first.num_heads, old.max_period, getattr(old, "interleave", True), yarn
        ).to(device)
        transformer.rope = new
        for layer in transformer.layers:
            if getattr(layer, "self_attn", None) is not None and layer.self_attn.rope is old:
                layer.self_attn.rope = new
        replaced += 1
    return replaced
