"""TTT configs as fine-tune checkpoints write them, parsed into our dataclasses.

Sections we read (first found wins, see `finetune.find_ttt_section`):
- `config.json` -> `ttt`: our own layout; `variant` says which family (else inferred from keys).
- `config.json` -> `ttt_config`: the moshi_in_place research layout (In-Place TTT).
- `training_config.json` / `args.yaml` -> `ttt`: the moshi-finetune TTT-MLP layout (or In-Place
  if it carries `chunk_size`).
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

from .errors import CheckpointError
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
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
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


def ttt_config_from_section(section: tp.Any, num_layers: int, source: Path, *,
                            default_variant: str, apply_output_proj_default: bool) -> TTTConfig | None:
    """Parse one TTT section; None when it says TTT is disabled or names no layer."""
    if not isinstance(section, dict):
        raise CheckpointError(f"TTT config must be a mapping, got {type(section).__name__}", source)
    if not section.get("enabled", section.get("enable", True)):
        return None
    variant = _infer_variant(section, default_variant, source)
    layers = parse_layers(section.get("layers"), num_layers, source,
                          start_layer=_number(section, "start_layer", source, int, None),
                          layer_frequency=_number(section, "layer_frequency", source, int, None))
    if not layers:  # silently running without TTT would ignore the fine-tune's weights
        raise CheckpointError(f"TTT is enabled but its layer selection picks no layer of this {num_layers}-layer "
                              "model; fix 'layers' / 'start_layer', or set enabled: false", source)
    if variant == "inplace":
        config: TTTConfig = InPlaceTTTConfig(
            layers=layers,
            chunk_size=_number(section, "chunk_size", source, int),
            learning_rate=_number(section, "learning_rate", source),
            conv_kernel_size=_number(section, "conv_kernel_size", source, int, 2),
            delta_clip=_number(section, "delta_clip", source, float, None),
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


def check_ttt_config(config: TTTConfig, context: int | None, source: Path) -> None:
    """Refuse settings that would make every file fail, misbehave or blow up memory, before any
    weights load: non-finite numbers (NaN passed as success before), negative learning rates,
    and chunks longer than the model's context (their buffers grow with the chunk)."""
    for name, value in vars(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"TTT config {name!r} must be a finite number, got {value}", source)
    for name in ("learning_rate", "base_lr"):
        if getattr(config, name, 0.0) < 0:
            raise CheckpointError(f"TTT config {name!r} must be >= 0, got {getattr(config, name)}", source)
    for name, value in vars(config).items():
        if name.startswith("delta_clip") and value is not None and value <= 0:
            raise CheckpointError(f"TTT config {name!r} must be > 0, got {value}", source)
    size = chunk_size_of(config)
    if context is not None and size > context:
        raise CheckpointError(f"TTT chunk size {size} is larger than the model's context ({context} tokens)", source)
    for name in ("ttt_layer_context", "non_ttt_layer_context"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            raise CheckpointError(f"TTT config {name!r} must be >= 1, got {value}", source)
