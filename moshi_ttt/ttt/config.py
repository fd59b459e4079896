"""TTT config sections as fine-tune checkpoints write them: what every family shares.

The sections we read, and the defaults each layout implies, are listed in
`checkpoint._section_layouts`. Here: recognising which family a section belongs to, the layer
selection and number parsing every family uses, and run-time overrides. Each family parses its
own settings (`families.TTTFamily.parse`, in the family's module).
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

from ..errors import CheckpointError, MoshiTTTError
from .families import FAMILY_NAMES, SectionLayout, family, family_of


class TTTConfig(tp.Protocol):
    """What every family's config dataclass has."""

    layers: list[int]
    variant: tp.ClassVar[str]  # the family's name


def parse_layers(
    spec: tp.Any, num_layers: int, source: Path, start_layer: int | None = None, layer_frequency: int | None = None
) -> list[int]:
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
        layers = {
            "all": list(range(num_layers)),
            "none": [],
            "middle": list(range(num_layers // 4, 3 * num_layers // 4)),
        }[word]
    elif isinstance(spec, str):
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise CheckpointError(
                f"cannot read TTT layers {spec!r}: expected indices like '29,30,31', 'all', 'none' or 'middle'", source
            ) from None
    elif isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        layers = list(spec)
    else:
        raise CheckpointError(
            f"cannot read TTT layers {spec!r}: give a list of indices, 'all', 'none', "
            "'middle', or start_layer + layer_frequency",
            source,
        )
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"TTT layers {bad} do not exist in a model with {num_layers} layers", source)
    return sorted(set(layers))


def number(section: dict, key: str, source: Path, kind: type = float, default: tp.Any = ...) -> tp.Any:
    """`section[key]` as `kind` (default if absent, `...` = required); errors name the file."""
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


def family_name_of_section(section: dict, layout: SectionLayout) -> str:
    """`variant` if the section names its family, else the family whose marker keys it carries,
    else the layout's default."""
    name = section.get("variant")
    if name is None:
        marked = [n for n in FAMILY_NAMES if any(key in section for key in family(n).marker_keys)]
        name = marked[0] if marked else layout.default_family
    if name not in FAMILY_NAMES:
        raise CheckpointError(f"unknown TTT variant {name!r}; expected one of {', '.join(FAMILY_NAMES)}", layout.file)
    return name


def ttt_config_from_section(section: tp.Any, num_layers: int, layout: SectionLayout) -> TTTConfig | None:
    """Parse one TTT section; None when it says TTT is disabled or names no layer."""
    source = layout.file
    if not isinstance(section, dict):
        raise CheckpointError(f"TTT config must be a mapping, got {type(section).__name__}", source)
    if not section.get("enabled", section.get("enable", True)):
        return None
    ttt_family = family(family_name_of_section(section, layout))
    layers = parse_layers(
        section.get("layers"),
        num_layers,
        source,
        start_layer=number(section, "start_layer", source, int, None),
        layer_frequency=number(section, "layer_frequency", source, int, None),
    )
    if not layers:  # silently running without TTT would ignore the fine-tune's weights
        raise CheckpointError(
            f"TTT is enabled but its layer selection picks no layer of this {num_layers}-layer "
            "model; fix 'layers' / 'start_layer', or set enabled: false",
            source,
        )
    config = ttt_family.parse(section, layers, source, layout)
    size = ttt_family.chunk_size(config)
    if size < 1:
        raise CheckpointError(f"TTT chunk size must be >= 1, got {size}", source)
    return config


def chunk_size_of(config: TTTConfig) -> int:
    return family_of(config).chunk_size(config)


def override_ttt_config(config: TTTConfig | None, overrides: tp.Mapping[str, tp.Any]) -> TTTConfig | None:
    """The checkpoint's TTT config with settings given at run time (e.g. the run's `delta_clip`) replaced.

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
    if getattr(config, "delta_clip_epsilon", 0.0) < 0:
        raise CheckpointError(f"TTT config 'delta_clip_epsilon' must be >= 0, got {config.delta_clip_epsilon}", source)
    size = chunk_size_of(config)
    if context is not None and size > context:
        raise CheckpointError(f"TTT chunk size {size} is larger than the model's context ({context} tokens)", source)
    for name in ("ttt_layer_context", "non_ttt_layer_context"):
        value = getattr(config, name, None)
        if value is not None and value < 1:
            raise CheckpointError(f"TTT config {name!r} must be >= 1, got {value}", source)
