"""Building the model a run uses: base Moshi + Mimi + tokenizer, with TTT layers attached.

Order matters: fine-tune weights that belong to the base model (a full `consolidated.safetensors`)
are loaded first, then TTT layers are attached (In-Place takes W^(0) from the down projection as
it is then), then the TTT weights are loaded and checked key by key against the config.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import FineTune, base_checkpoint_info, check_compatible, check_safetensors, load_finetune
from .config import TTTConfig, chunk_size_of, override_ttt_config
from .errors import CheckpointError
from .families import family_of
from .ttt.base import FastWeightModule, TTTController


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

    @property
    def ttt(self) -> TTTConfig | None:
        return None if self.finetune is None else self.finetune.ttt

    def controller(self) -> TTTController:
        return TTTController(self.lm)

    def describe_ttt(self) -> dict | None:
        """The TTT settings as a report records them."""
        if self.ttt is None:
            return None
        return {"variant": self.ttt.variant, "chunk_size": chunk_size_of(self.ttt),
                **{k: v for k, v in vars(self.ttt).items()}}


def resolve_checkpoints(base: str, checkpoint: str | None = None,
                        ttt_overrides: tp.Mapping[str, tp.Any] | None = None) -> tuple[tp.Any, FineTune | None]:
    """Find the base and the fine-tune and check their configs, reading no weights: a run calls
    this before loading anything, so bad settings fail in a moment, not after the load.
    `ttt_overrides` replace fields of the checkpoint's TTT config (e.g. `{"delta_clip": None}`)."""
    info = base_checkpoint_info(base)
    finetune = None
    if checkpoint is not None:
        lm_config = info.lm_config or {}
        finetune = load_finetune(checkpoint, lm_config.get("num_layers", 32), context=lm_config.get("context"))
        check_compatible(finetune, info.lm_config)
        finetune.ttt = override_ttt_config(finetune.ttt, ttt_overrides or {})
    elif ttt_overrides:
        override_ttt_config(None, ttt_overrides)  # raises: nothing to override
    return info, finetune


def load_model(base: str, checkpoint: str | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32,
               ttt_overrides: tp.Mapping[str, tp.Any] | None = None) -> LoadedModel:
    """Base + fine-tune, TTT layers attached and loaded (see `resolve_checkpoints`)."""
    device = torch.device(device)
    info, finetune = resolve_checkpoints(base, checkpoint, ttt_overrides)
    mimi = _load(info.get_mimi, info.mimi_weights, device=device)
    lm = _load(info.get_moshi, info.moshi_weights, device=device, dtype=dtype, fuse_lora=True)
    text_tokenizer = _load(info.get_text_tokenizer, info.tokenizer)
    _check_tokenizer(text_tokenizer, lm, info.tokenizer)
    if finetune is not None and finetune.ttt is not None:
        apply_finetune(lm, finetune)
    return LoadedModel(base=base, checkpoint_info=info, mimi=mimi, lm=lm, text_tokenizer=text_tokenizer,
                       device=device, dtype=dtype, finetune=finetune)


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
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size()} pieces but the LM's text_card is "
                              f"{lm.text_card}", path)


def attach_ttt(lm: nn.Module, config: TTTConfig) -> list[FastWeightModule]:
    """Turn the configured temporal-transformer layers into TTT layers (weights still to load)."""
    return family_of(config).attach(lm, config)


def apply_finetune(lm: nn.Module, finetune: FineTune) -> None:
    from safetensors.torch import load_file

    assert finetune.ttt is not None and finetune.weights is not None
    path = finetune.weights
    check_safetensors(path)
    try:
        weights = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read weights ({exc})", path) from None
    for key, value in weights.items():  # NaN weights would stream "fine" and say nothing useful
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"tensor {key} holds NaN or infinite values", path)
    lora_keys = [k for k in weights if ".lora_A." in k or ".lora_B." in k]
    if lora_keys:
        raise CheckpointError(f"holds {len(lora_keys)} LoRA adapter tensors (e.g. {lora_keys[0]}); merge "
                              "LoRA into the base weights first, TTT-only fine-tunes are supported", path)

    base_keys = set(lm.state_dict())
    _copy_into(lm, {k: v for k, v in weights.items() if k in base_keys}, path)
    ttt_family = family_of(finetune.ttt)
    ttt_family.attach(lm, finetune.ttt)
    ignored = ttt_family.ignored_keys(finetune.ttt)
    ttt_weights = {k: v for k, v in weights.items() if k not in base_keys and not k.startswith(ignored)}
    params = dict(lm.named_parameters())
    unknown = sorted(set(ttt_weights) - set(lm.state_dict()))
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensors match no parameter of this TTT config "
                              f"(e.g. {unknown[0]}); check the TTT layers and variant", path)
    optional = ttt_family.optional_keys(finetune.ttt)
    required = [k for k in params if k not in base_keys and not any(u in k for u in optional)]
    missing = [k for k in required if k not in ttt_weights]
    if missing:
        raise CheckpointError(f"missing {len(missing)} TTT tensors for the configured layers "
                              f"(e.g. {missing[0]})", path)
    _copy_into(lm, ttt_weights, path)


def _copy_into(lm: nn.Module, weights: dict[str, torch.Tensor], path: tp.Any) -> None:
    """Copy tensors into existing parameters/buffers, keeping their dtype and device."""
    targets = lm.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in weights.items():
            target = targets[key]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"tensor {key} has shape {list(value.shape)}, the model expects "
                                      f"{list(target.shape)}", path)
            target.copy_(value.to(device=target.device, dtype=target.dtype))
