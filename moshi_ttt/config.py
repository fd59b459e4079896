"""TTT configs as fine-tune checkpoints write them, parsed into our dataclasses.

Sections we read (first found wins, see `finetune.find_ttt_section`):
- `config.json` -> `ttt`: our own layout; `variant` says which family (else inferred from keys).
- `config.json` -> `ttt_config`: the moshi_in_place research layout (In-Place TTT).
- `training_config.json` / `args.yaml` -> `ttt`: the moshi-finetune TTT-MLP layout (or In-Place
  if it carries `chunk_size`).
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

from .errors import CheckpointError, MoshiTTTError
from .ttt.inplace import InPlaceTTTConfig
from .ttt.mlp import TTTMLPConfig

TTTConfig = tp.Union[InPlaceTTTConfig, TTTMLPConfig]

VARIANTS = ("inplace", "ttt-mlp")


def parse_layers(spec: tp.Any, num_layers: int, source: Path,
                 start_layer: int | None = None, layer_frequency: int | None = None) -> list[int]:
    """Which temporal-transformer layers carry TTT.

    Accepts a list of indices, a comma string ("29,30,31"), "all", "none", "middle" (the middle
    half: 8..23 of 32 layers), or `start_layer` + `layer_frequency` (every `layer_frequency`-th
    layer from `start_layer`, as moshi_in_place writes it).
    """
    if spec is None and start_layer is not None:
        frequency = 1 if layer_frequency is None else int(layer_frequency)
        if frequency < 1:
            raise CheckpointError(f"layer_frequency must be >= 1, got {layer_frequency}", source)
        layers = [i for i in range(num_layers) if i >= start_layer and (i - start_layer) % frequency == 0]
    elif isinstance(spec, str) and spec.strip().lower() in ("all", "none", "middle"):
        word = spec.strip().lower()
        layers = {"all": list(range(num_layers)), "none": [],
                  "middle": list(range(num_layers // 4, 3 * num_layers // 4))}[word]
    elif isinstance(spec, str):
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise CheckpointError(f"cannot read TTT layers {spec!r}: expected indices like '29,30,31', "
                                  "'all', 'none' or 'middle'", source) from None
    elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        layers = list(spec)
    else:
        raise CheckpointError(f"cannot read TTT layers {spec!r}: give a list of indices, 'all', 'none', "
                              "'middle', or start_layer + layer_frequency", source)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"TTT layers {bad} do not exist in a model with {num_layers} layers", source)
    return sorted(set(layers))


def _number(section: dict, key: str, source: Path, kind: type = float, default: tp.Any = ...) -> tp.Any:
    value = section.get(key, default)
    if value is ...:
        raise CheckpointError(f"TTT config has no {key!r}", source)
    if value is None:
        return None
    try:
        if kind is int and (isinstance(value, bool) or int(value) != float(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"TTT config {key!r} must be a {kind.__name__}, got {value!r}", source) from None


def _infer_variant(section: dict, default: str, source: Path) -> str:
    variant = section.get("variant")
    if variant is None:
        if "chunk_size" in section or "learning_rate" in section:
            variant = "inplace"
        elif "mini_batch_size" in section or "base_lr" in section:
            variant = "ttt-mlp"
        else:
            variant = default
    if variant not in VARIANTS:
        raise CheckpointError(f"unknown TTT variant {variant!r}; expected one of {', '.join(VARIANTS)}", source)
    return variant


# The research In-Place module (moshi_in_place `TTTGating`) clipped every chunk's delta to this
# Frobenius norm when its config had no `delta_clip_fro_norm`, in training and inference alike.
RESEARCH_DELTA_CLIP = 1e-5


def _delta_clip(section: dict, source: Path, default: float | None) -> tuple[float | None, str]:
    """tau from `delta_clip_fro_norm` (research key) or `delta_clip` (alias); null or <= 0 is off."""
    keys = [key for key in ("delta_clip_fro_norm", "delta_clip") if key in section]
    if not keys:
        return default, "config" if default is None else "research default (no delta_clip_fro_norm in config)"
    value = _number(section, keys[0], source, float, None)
    return (value if value is not None and value > 0 else None), "config"


def ttt_config_from_section(section: tp.Any, num_layers: int, source: Path, *,
                            default_variant: str, apply_output_proj_default: bool,
                            delta_clip_default: float | None = None) -> TTTConfig | None:
    """Parse one TTT section; None when it says TTT is disabled or names no layer.

    `delta_clip_default` is the In-Place clip a layout implies when its section has no clip key
    (`RESEARCH_DELTA_CLIP` for moshi_in_place's `ttt_config`).
    """
    if not isinstance(section, dict):
        raise CheckpointError(f"TTT config must be a mapping, got {type(section).__name__}", source)
    if not section.get("enabled", section.get("enable", True)):
        return None
    variant = _infer_variant(section, default_variant, source)
    layers = parse_layers(section.get("layers"), num_layers, source,
                          start_layer=_number(section, "start_layer", source, int, None),
                          layer_frequency=_number(section, "layer_frequency", source, int, None))
    if not layers:
        return None
    if variant == "inplace":
        delta_clip, delta_clip_origin = _delta_clip(section, source, delta_clip_default)
        config: TTTConfig = InPlaceTTTConfig(
            layers=layers,
            chunk_size=_number(section, "chunk_size", source, int),
            learning_rate=_number(section, "learning_rate", source),
            conv_kernel_size=_number(section, "conv_kernel_size", source, int, 2),
            delta_clip=delta_clip,
            delta_clip_epsilon=_number(section, "delta_clip_epsilon", source, float, 1e-12),
            delta_clip_origin=delta_clip_origin,
        )
        if config.conv_kernel_size < 1:
            raise CheckpointError(f"conv_kernel_size must be >= 1, got {config.conv_kernel_size}", source)
        size = config.chunk_size
    else:
        inner_layers = section.get("ttt_mlp_layers")
        if inner_layers not in (None, 2):
            raise CheckpointError(f"only 2-layer TTT-MLP inner models are supported, got ttt_mlp_layers="
                                  f"{inner_layers}", source)
        config = TTTMLPConfig(
            layers=layers,
            mini_batch_size=_number(section, "mini_batch_size", source, int),
            base_lr=_number(section, "base_lr", source),
            initial_gating_alpha=_number(section, "initial_gating_alpha", source, float, 0.1),
            apply_output_proj=bool(section.get("apply_output_proj", apply_output_proj_default)),
            ttt_layer_context=_number(section, "ttt_layer_context", source, int, None),
            non_ttt_layer_context=_number(section, "non_ttt_layer_context", source, int, None),
            persistent_states=bool(section.get("persistent_states") or False),
            use_rope=bool(section.get("use_rope") or False),
            mlp_expansion=_number(section, "ttt_mlp_expansion_factor", source, int, None) or 4,
        )
        if config.use_rope:
            raise CheckpointError("TTT-MLP with use_rope is not supported", source)
        size = config.mini_batch_size
    if size < 1:
        raise CheckpointError(f"TTT chunk size must be >= 1, got {size}", source)
    return config


def variant_of(config: TTTConfig) -> str:
    return "inplace" if isinstance(config, InPlaceTTTConfig) else "ttt-mlp"


def chunk_size_of(config: TTTConfig) -> int:
    return config.chunk_size if isinstance(config, InPlaceTTTConfig) else config.mini_batch_size


def parse_delta_clip(text: str) -> float | None:
    """A user's `--delta-clip`: a positive Frobenius-norm bound, or `none` (also 0) for no clip."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise MoshiTTTError(f"--delta-clip must be a number or 'none', got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise MoshiTTTError(f"--delta-clip must be a finite number >= 0 or 'none', got {text!r}")
    return value if value > 0 else None


def override_ttt_config(config: TTTConfig | None, overrides: tp.Mapping[str, tp.Any]) -> TTTConfig | None:
    """The checkpoint's TTT config with settings given at run time (e.g. `--delta-clip`) replaced.

    A setting the checkpoint's family does not have is an error, not silently ignored.
    """
    if not overrides:
        return config
    if config is None:
        raise MoshiTTTError(f"{', '.join(sorted(overrides))} given, but the run has no TTT layers")
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MoshiTTTError(f"{', '.join(unknown)} does not apply to {config.variant} checkpoints")
    return dataclasses.replace(config, **overrides)
