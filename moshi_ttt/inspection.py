"""What `moshi-ttt inspect` shows: a fine-tune's TTT config, its layers and parameter counts."""

from __future__ import annotations

import math
import re
import typing as tp
from dataclasses import dataclass, field

from .checkpoint import (FineTune, base_checkpoint_info, check_compatible, check_safetensors, load_finetune,
                         read_mapping, resolve_finetune_folder)
from .errors import CheckpointError
from .families import FAMILY_NAMES, family


@dataclass
class Inspection:
    finetune: FineTune
    num_layers: int | None
    settings: dict[str, tp.Any]
    tensors_per_layer: dict[int, int] = field(default_factory=dict)  # parameters in the weights file
    other_tensors: int = 0  # parameters not under a TTT layer (e.g. a full consolidated state)
    base_parameters: int | None = None  # the base LM's, when --base is given


def _parameter_count(weights: tp.Any) -> int:
    """Number of values in a safetensors file, from its header (nothing is loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def inspect_finetune(checkpoint: str, base: str | None = None) -> Inspection:
    """Reads configs and safetensors headers only (the base's too, with `base`): no model loads.

    The layer count comes from the base's LM config if given, else from the config.json saved
    with the fine-tune; without either a spec like "middle" cannot be resolved, so say so.
    """
    base_info = base_checkpoint_info(base) if base is not None else None
    folder = resolve_finetune_folder(checkpoint)
    own_config = folder / "config.json"
    lm_config = base_info.lm_config if base_info is not None else (
        read_mapping(own_config) if own_config.is_file() else None)
    num_layers = (lm_config or {}).get("num_layers")
    if not isinstance(num_layers, int):
        raise CheckpointError("cannot tell how many layers the model has (no config.json with num_layers "
                              "beside the fine-tune); pass --base", folder)
    finetune = load_finetune(checkpoint, num_layers)
    if base_info is not None:
        check_compatible(finetune, base_info.lm_config)
    ttt = finetune.ttt
    settings: dict[str, tp.Any] = {"config file": str(finetune.config_source)}
    if ttt is not None:
        settings = {"variant": ttt.variant, **vars(ttt), **settings}
    result = Inspection(finetune=finetune, num_layers=num_layers, settings=settings)
    if base_info is not None:
        result.base_parameters = _parameter_count(base_info.moshi_weights)
    if finetune.weights is not None:
        from safetensors import safe_open

        check_safetensors(finetune.weights)
        with safe_open(str(finetune.weights), framework="pt") as handle:
            for key in handle.keys():
                count = math.prod(handle.get_slice(key).get_shape())
                match = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
                if match and any(family(name).owns_key(match.group(2)) for name in FAMILY_NAMES):
                    layer = int(match.group(1))
                    result.tensors_per_layer[layer] = result.tensors_per_layer.get(layer, 0) + count
                else:
                    result.other_tensors += count
    return result
