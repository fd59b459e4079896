"""What `moshi-ttt inspect` shows: a fine-tune's TTT config, its layers and parameter counts."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

from .checkpoint import FineTune, base_checkpoint_info, check_compatible, check_safetensors, load_finetune
from .families import FAMILY_NAMES, family


@dataclass
class Inspection:
    finetune: FineTune
    num_layers: int | None
    settings: dict[str, tp.Any]
    tensors_per_layer: dict[int, int] = field(default_factory=dict)  # parameters in the weights file
    other_tensors: int = 0  # parameters not under a TTT layer (e.g. a full consolidated state)
    base_parameters: int | None = None  # the base LM's, when --base is given


def inspect_finetune(checkpoint: str, base: str | None = None) -> Inspection:
    """Reads configs and safetensors headers only; with `base`, loads the base LM to count it."""
    import re

    from safetensors import safe_open

    lm_model = None
    base_config: dict | None = None
    if base is not None:
        from .model import load_model

        lm_model = load_model(base).lm
        base_config = {"num_layers": len(lm_model.transformer.layers)}
    probe = load_finetune(checkpoint, 10_000) if base_config is None else None
    num_layers = (base_config or {}).get("num_layers") or ((probe.lm_config or {}).get("num_layers") if probe else None)
    finetune = load_finetune(checkpoint, num_layers or 10_000)
    if base is not None:
        check_compatible(finetune, base_checkpoint_info(base).lm_config)
    ttt = finetune.ttt
    settings: dict[str, tp.Any] = {"config file": str(finetune.config_source)}
    if ttt is not None:
        settings = {"variant": ttt.variant, **vars(ttt), **settings}
    result = Inspection(finetune=finetune, num_layers=num_layers, settings=settings)
    if finetune.weights is not None:
        check_safetensors(finetune.weights)
        with safe_open(str(finetune.weights), framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                match = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
                if match and any(family(name).owns_key(match.group(2)) for name in FAMILY_NAMES):
                    layer = int(match.group(1))
                    result.tensors_per_layer[layer] = result.tensors_per_layer.get(layer, 0) + count
                else:
                    result.other_tensors += count
    if lm_model is not None:
        result.base_parameters = sum(p.numel() for p in lm_model.parameters())
    return result
