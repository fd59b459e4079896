"""Building the model a run uses: base Moshi + Mimi + tokenizer, with TTT layers attached.

Order matters: fine-tune weights that belong to the base model (a full `consolidated.safetensors`)
are loaded first, then TTT layers are attached (In-Place takes W^(0) from the down projection as
it is then), then the TTT weights are loaded and checked key by key against the config.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, MoshiTTTError
from ..ttt.base import FastWeightModule, TTTController
from ..ttt.config import TTTConfig, chunk_size_of, override_ttt_config
from ..ttt.families import family_of
from .layouts import (
    LORA_SUFFIXES,
    FineTune,
    LoraAdapters,
    base_checkpoint_info,
    check_compatible,
    check_safetensors,
    lm_settings,
    load_finetune,
)
from .rope_scaling import YarnConfig, apply_yarn


@dataclass
class LoadedModel:
    base: str
    checkpoint_info: tp.Any  # moshi.models.loaders.CheckpointInfo
    mimi: tp.Any  # moshi.models.MimiModel
    lm: tp.Any  # moshi.models.LMModel, TTT layers attached
    text_tokenizer: tp.Any  # sentencepiece.SentencePieceProcessor
    device: torch.device
    dtype: torch.dtype
    finetune: FineTune | None = None
    yarn: YarnConfig | None = None  # RoPE scaling the LM runs with

    @property
    def context(self) -> int | None:
        """The attention context (KV cache span, in frames) the LM runs with."""
        return self.lm.context

    @property
    def ttt(self) -> TTTConfig | None:
        return None if self.finetune is None else self.finetune.ttt

    def controller(self) -> TTTController:
        return TTTController(self.lm)

    def describe_ttt(self) -> dict | None:
        """The TTT settings as a report records them."""
        if self.ttt is None:
            return None
        return {
            "variant": self.ttt.variant,
            "chunk_size": chunk_size_of(self.ttt),
            **{k: v for k, v in vars(self.ttt).items()},
        }

    def describe_lm(self) -> dict:
        """What the report records about the LM beyond the base: context, RoPE scaling, LoRA, step."""
        lora = None if self.finetune is None else self.finetune.lora
        return {
            "context": self.context,
            "rope_scaling": None if self.yarn is None else self.yarn.describe(),
            "lora": None
            if lora is None
            else {"modules": len(lora.modules), "rank": lora.rank, "scaling": lora.scaling},
            "step": None if self.finetune is None else self.finetune.step,
        }


def resolve_checkpoints(
    base: str,
    checkpoint: str | None = None,
    ttt_overrides: tp.Mapping[str, tp.Any] | None = None,
    step: int | None = None,
) -> tuple[tp.Any, FineTune | None]:
    """Find the base and the fine-tune and check their configs, reading no weights: a run calls
    this before loading anything, so bad settings fail in a moment, not after the load.
    `ttt_overrides` replace fields of the checkpoint's TTT config (e.g. `{"delta_clip": None}`);
    `step` picks a `checkpoint_NNNNNN/` of a run folder (default: the latest)."""
    info = base_checkpoint_info(base)
    finetune = None
    if checkpoint is not None:
        lm_config = info.lm_config or {}
        finetune = load_finetune(
            checkpoint, lm_config.get("num_layers", 32), context=lm_config.get("context"), step=step
        )
        check_compatible(finetune, info.lm_config)
        finetune.ttt = override_ttt_config(finetune.ttt, ttt_overrides or {})
    else:
        if step is not None:
            raise MoshiTTTError("--step given, but no fine-tune checkpoint")
        if ttt_overrides:
            override_ttt_config(None, ttt_overrides)  # raises: nothing to override
    return info, finetune


def load_model(
    base: str,
    checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ttt_overrides: tp.Mapping[str, tp.Any] | None = None,
    step: int | None = None,
    streams: int | str | None = None,
) -> LoadedModel:
    """Base + fine-tune, TTT layers attached and loaded (see `resolve_checkpoints`). With
    `streams` (a batch size, or "auto" for at least one), a model and streams that cannot fit in
    the memory free on `device` are refused before anything loads (`check_streams_fit`)."""
    device = torch.device(device)
    info, finetune = resolve_checkpoints(base, checkpoint, ttt_overrides, step)
    config_path = Path(base) / "config.json"
    settings = lm_settings(info.raw_config, config_path, finetune)
    yarn = settings.yarn
    if info.lm_config is not None and settings.context is not None:
        info.lm_config["context"] = settings.context  # the KV cache span moshi builds the LM with
        if finetune is not None and finetune.lm_config is not None and "context" in finetune.lm_config:
            config_path = finetune.folder / "config.json"  # where the context came from
    if streams is not None:
        from ..streaming.batch_size import check_streams_fit

        check_streams_fit(streams, info, finetune, device, dtype, config_path)
    mimi = _load(info.get_mimi, info.mimi_weights, device=device)
    lm = _load(info.get_moshi, info.moshi_weights, device=device, dtype=dtype, fuse_lora=True)
    if yarn is not None:
        apply_yarn(lm, yarn)
    text_tokenizer = _load(info.get_text_tokenizer, info.tokenizer)
    _check_tokenizer(text_tokenizer, lm, info.tokenizer)
    if finetune is not None and (finetune.ttt is not None or finetune.lora is not None):
        apply_finetune(lm, finetune)
    return LoadedModel(
        base=base,
        checkpoint_info=info,
        mimi=mimi,
        lm=lm,
        text_tokenizer=text_tokenizer,
        device=device,
        dtype=dtype,
        finetune=finetune,
        yarn=yarn,
    )


def _load(fn: tp.Callable, path: tp.Any, **kwargs: tp.Any) -> tp.Any:
    try:
        return fn(**kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # moshi/torch raise many types for bad weights; name the file
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot load ({type(exc).__name__}: {message[:300]})", path) from None


def _check_tokenizer(tokenizer: tp.Any, lm: tp.Any, path: tp.Any) -> None:
    if tokenizer.vocab_size() > lm.text_card:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size()} pieces but the LM's text_card is {lm.text_card}", path
        )


def attach_ttt(lm: nn.Module, config: TTTConfig) -> list[FastWeightModule]:
    """Turn the configured temporal-transformer layers into TTT layers (weights still to load)."""
    return family_of(config).attach(lm, config)


def apply_finetune(lm: nn.Module, finetune: FineTune) -> None:
    """Load a fine-tune's weights into a loaded base LM.

    Order, as the training code built the model: base-model tensors of a full
    `consolidated.safetensors` first, then TTT layers attached (In-Place takes W^(0) from the
    down projection as it is then, i.e. before LoRA, as moshi_in_place initialises `w_down` before
    wrapping linears in LoRA) and their tensors loaded, then LoRA adapters merged by moshi into
    every linear they name (TTT layers' own linears included, which training also wrapped).
    """
    from safetensors.torch import load_file

    assert finetune.weights is not None
    path = finetune.weights
    check_safetensors(path)
    try:
        weights = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read weights ({exc})", path) from None
    for key, value in weights.items():  # NaN weights would stream "fine" and say nothing useful
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"tensor {key} holds NaN or infinite values", path)
    lora_weights = {k: weights.pop(k) for k in [k for k in weights if k.endswith(LORA_SUFFIXES)]}

    base_keys = set(lm.state_dict())
    _copy_into(lm, {k: v for k, v in weights.items() if k in base_keys}, path)
    if finetune.ttt is not None:
        _load_ttt(lm, finetune.ttt, {k: v for k, v in weights.items() if k not in base_keys}, path)
    else:
        unknown = sorted(set(weights) - base_keys)
        if unknown:
            raise CheckpointError(f"{len(unknown)} tensors match no parameter of the model (e.g. {unknown[0]})", path)
    if finetune.lora is not None:
        merge_lora(lm, finetune.lora, lora_weights, path)


def _load_ttt(lm: nn.Module, config: TTTConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Attach the TTT layers and load their tensors, checked key by key against the config."""
    base_keys = set(lm.state_dict())
    ttt_family = family_of(config)
    ttt_family.attach(lm, config)
    ignored = ttt_family.ignored_keys(config)
    ttt_weights = {k: v for k, v in weights.items() if not k.startswith(ignored)}
    params = dict(lm.named_parameters())
    unknown = sorted(set(ttt_weights) - set(lm.state_dict()))
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors match no parameter of this TTT config "
            f"(e.g. {unknown[0]}); check the TTT layers and variant",
            path,
        )
    optional = ttt_family.optional_keys(config)
    required = [k for k in params if k not in base_keys and not any(u in k for u in optional)]
    missing = [k for k in required if k not in ttt_weights]
    if missing:
        raise CheckpointError(f"missing {len(missing)} TTT tensors for the configured layers (e.g. {missing[0]})", path)
    _copy_into(lm, ttt_weights, path)


def merge_lora(lm: nn.Module, adapters: LoraAdapters, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Merge LoRA adapters into the linears they name with moshi's own LoRA modules.

    Each named `nn.Linear` is wrapped in moshi's `LoRALinear` (the frozen weight kept as is, the
    adapters loaded in the layer's dtype, as moshi's `get_lora_moshi` casts them), then moshi's
    `replace_lora_with_linear` fuses every wrapper into a plain linear `W + scaling * B @ A`.
    """
    from moshi.modules.lora import LoRALinear, replace_lora_with_linear

    modules = dict(lm.named_modules())
    for name in adapters.modules:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"LoRA adapter {name} names no linear layer of this model", path)
        weight = linear.weight
        wrapper = LoRALinear(
            linear.in_features,
            linear.out_features,
            adapters.rank,
            adapters.scaling,
            device=weight.device,
            dtype=weight.dtype,
        )
        wrapper.frozen_W = linear
        for half in ("lora_A", "lora_B"):
            value = weights[f"{name}.{half}.weight"]
            target = getattr(wrapper, half).weight
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"tensor {name}.{half}.weight has shape {list(value.shape)}, the "
                    f"model expects {list(target.shape)}",
                    path,
                )
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else lm, child, wrapper)
    with torch.no_grad():
        replace_lora_with_linear(lm)


def _copy_into(lm: nn.Module, weights: dict[str, torch.Tensor], path: tp.Any) -> None:
    """Copy tensors into existing parameters/buffers, keeping their dtype and device."""
    targets = lm.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in weights.items():
            target = targets[key]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"tensor {key} has shape {list(value.shape)}, the model expects {list(target.shape)}", path
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))
