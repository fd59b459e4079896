"""What `moshi-ttt inspect` shows: a fine-tune's TTT config, its layers and parameter counts."""

from __future__ import annotations

import math
import re
import typing as tp
from dataclasses import dataclass, field

from ..errors import CheckpointError
from ..ttt.families import FAMILY_NAMES, family
from .layouts import (
    LORA_SUFFIXES,
    FineTune,
    base_checkpoint_info,
    check_compatible,
    check_safetensors,
    lm_settings,
    load_finetune,
    read_mapping,
    resolve_finetune_folder,
)


@dataclass
class Inspection:
    finetune: FineTune
    num_layers: int | None
    settings: dict[str, tp.Any]
    tensors_per_layer: dict[int, int] = field(default_factory=dict)  # parameters in the weights file
    other_tensors: int = 0  # parameters not under a TTT layer (e.g. a full consolidated state)
    lora_parameters: int = 0  # LoRA adapter values (lora_A / lora_B)
    base_parameters: int | None = None  # the base LM's, when --base is given


def _parameter_count(weights: tp.Any) -> int:
    """Number of values in a safetensors file, from its header (nothing is loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def inspect_finetune(checkpoint: str, base: str | None = None, step: int | None = None) -> Inspection:
    """Reads configs and safetensors headers only (the base's too, with `base`): no model loads.

    The layer count comes from the base's LM config if given, else from the config.json saved
    with the fine-tune; without either a spec like "middle" cannot be resolved, so say so.
    """
    base_info = base_checkpoint_info(base) if base is not None else None
    folder = resolve_finetune_folder(checkpoint, step)
    own_config = folder / "config.json"
    lm_config = (
        base_info.lm_config if base_info is not None else (read_mapping(own_config) if own_config.is_file() else None)
    )
    num_layers = (lm_config or {}).get("num_layers")
    if not isinstance(num_layers, int):
        raise CheckpointError(
            "cannot tell how many layers the model has (no config.json with num_layers "
            "beside the fine-tune); pass --base",
            folder,
        )
    finetune = load_finetune(checkpoint, num_layers, step)
    if base_info is not None:
        check_compatible(finetune, base_info.lm_config)
    ttt = finetune.ttt
    settings: dict[str, tp.Any] = {"config file": str(finetune.config_source or "none (no TTT section)")}
    if ttt is not None:
        settings = {"variant": ttt.variant, **vars(ttt), **settings}
    settings.update(_lm_rows(finetune, lm_config, base_info))
    result = Inspection(finetune=finetune, num_layers=num_layers, settings=settings)
    if base_info is not None:
        result.base_parameters = _parameter_count(base_info.moshi_weights)
    if finetune.weights is not None:
        from safetensors import safe_open

        check_safetensors(finetune.weights)
        with safe_open(str(finetune.weights), framework="pt") as handle:
            for key in handle.keys():
                count = math.prod(handle.get_slice(key).get_shape())
                if key.endswith(LORA_SUFFIXES):
                    result.lora_parameters += count
                    continue
                match = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
                if match and any(family(name).owns_key(match.group(2)) for name in FAMILY_NAMES):
                    layer = int(match.group(1))
                    result.tensors_per_layer[layer] = result.tensors_per_layer.get(layer, 0) + count
                else:
                    result.other_tensors += count
    if finetune.lora is not None:
        lora = finetune.lora
        result.settings["LoRA"] = (
            f"{len(lora.modules)} linears, rank {lora.rank}, scaling {lora.scaling}, {result.lora_parameters:,} params"
        )
    return result


def _lm_rows(finetune: FineTune, lm_config: dict | None, base_info: tp.Any) -> dict[str, tp.Any]:
    """Step, RoPE scaling and the attention context the run will use."""
    rows: dict[str, tp.Any] = {}
    if finetune.step is not None:
        rows["step"] = finetune.step
    base_config = base_info.raw_config if base_info is not None else None
    lm = lm_settings(base_config, finetune.folder / "config.json", finetune)
    if lm.yarn is None:
        rows["context"] = (lm_config or {}).get("context")
        return rows
    yarn = lm.yarn
    rows["rope scaling"] = (
        f"YaRN scale {yarn.scale:g} (original_max_seq_len {yarn.original_max_seq_len}, "
        f"beta_fast {yarn.beta_fast:g}, beta_slow {yarn.beta_slow:g}, mscale "
        f"{yarn.mscale:g}, mscale_all_dim {yarn.mscale_all_dim:g}; query factor "
        f"{yarn.describe()['attention_factor']:g})"
    )
    rows["context"] = f"{lm.context} (extended from {lm.trained_context} by the YaRN scale)"
    return rows
