"""Finding and validating checkpoints: the base Moshi folder or repo, and TTT fine-tunes.

Base: a Hugging Face repo id or a local folder laid out like Kyutai's repos (`config.json`
naming its files with moshi's keys). Local folders are resolved file by file and handed to
moshi's `CheckpointInfo.from_hf_repo` as explicit paths, which is the only way it never touches
the hub. Fine-tunes: a `consolidated/` folder (or a checkpoint / run folder above it) holding a
TTT config and safetensors weights; see `config.py` for the config sections we accept. The
fine-tune may also change the LM itself: LoRA adapters in its weights (`find_lora`) and YaRN
RoPE scaling in its LM config (`lm_settings`, math in `rope_scaling.py`).
"""

from __future__ import annotations

import json
import math
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import safe_open

from ..errors import CheckpointError
from ..ttt.config import TTTConfig, check_ttt_config, ttt_config_from_section
from ..ttt.families import SectionLayout
from .rope_scaling import DEFAULT_CONTEXT, YarnConfig, extended_context, parse_yarn_config

# File names in a config.json that moshi's loader resolves, with its defaults.
MOSHI_FILE_KEYS = {
    "moshi_name": "model.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model",
}
# Every key moshi's loader (`CheckpointInfo.from_hf_repo`) pops from a config.json before the
# rest becomes `LMModel(...)` kwargs: file names and generation settings.
LOADER_KEYS = (
    *MOSHI_FILE_KEYS,
    "mimi_config_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
)
# Keys fine-tunes add to an LM config that `LMModel(...)` would reject.
NON_LM_KEYS = ("ttt", "ttt_config", "yarn_config")
WEIGHT_NAMES = ("consolidated.safetensors", "lora.safetensors")


def read_mapping(path: Path) -> dict:
    """A JSON (or, for `.yaml`, YAML) config file that must hold a mapping; errors name the file."""
    is_yaml = path.suffix in (".yaml", ".yml")
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except FileNotFoundError:
        raise CheckpointError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read: {exc}", path) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"malformed JSON ({exc.msg} at line {exc.lineno})", path) from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"malformed YAML: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a {'YAML mapping' if is_yaml else 'JSON object'}", path)
    return data


def check_safetensors(path: Path) -> list[str]:
    """Read the header only: a truncated or foreign file fails here with its name, not deep in torch."""
    if not path.is_file():
        raise CheckpointError("file not found", path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises several unrelated types for bad files
        raise CheckpointError(f"not a valid safetensors file ({str(exc).splitlines()[0]})", path) from None


# What each LM config key moshi's `LMModel` reads must hold; a wrong type would otherwise fail deep
# in torch, or compare a string with a number. Whole numbers: the least value each takes.
LM_WHOLE_KEYS = {
    "dim": 1,
    "num_heads": 1,
    "num_layers": 1,
    "card": 1,
    "text_card": 1,
    "n_q": 0,
    "dep_q": 0,
    "depformer_dim": 1,
    "depformer_num_heads": 1,
    "depformer_num_layers": 0,
    "existing_text_padding_id": 0,
    "existing_text_end_padding_id": 0,
}
LM_OPTIONAL_WHOLE_KEYS = {"context": 1, "depformer_context": 1, "text_card_out": 1, "depformer_low_rank_embeddings": 1}
LM_NUMBER_KEYS = ("hidden_scale", "max_period", "depformer_max_period")  # positive and finite
LM_FLAG_KEYS = ("causal", "depformer_multi_linear", "depformer_weights_per_step", "norm_emb", "bias_proj", "lora")
LM_NAME_KEYS = ("norm", "gating", "positional_embedding", "depformer_gating", "depformer_pos_emb")
# Mimi's transformer (`mimi_config.json` -> `transformer`).
MIMI_WHOLE_KEYS = {"d_model": 1, "num_heads": 1, "num_layers": 0, "context": 1, "dim_feedforward": 1}
# How the LM weights show each size of the config, so that a config disagreeing with them is
# refused before a model is built from it (moshi builds some modules on the CPU whatever the
# device: a `card` or `dim` of 10^9 would allocate for minutes): counts of numbered modules...
LM_COUNTED = {
    "num_layers": "transformer.layers.",
    "depformer_num_layers": "depformer.layers.",
    "n_q": "emb.",
    "dep_q": "linears.",
}
# ...and (tensor, axis, offset) of sizes: `text_emb` is [text_card + 1, dim], `depformer_in.0`
# [depformer_dim, dim] (the depformer's embeddings may be low-rank, its input projection is not).
LM_SHAPED = {
    "dim": ("text_emb.weight", 1, 0),
    "text_card": ("text_emb.weight", 0, 1),
    "card": ("emb.0.weight", 0, 1),
    "depformer_dim": ("depformer_in.0.weight", 0, 0),
}
MIMI_LAYER_PREFIX = "encoder_transformer.transformer.layers."


def _is_whole(value: tp.Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _whole_number(config: dict, key: str, least: int, source: Path, where: str = "") -> None:
    if not _is_whole(config[key], least):
        raise CheckpointError(f"{where}{key} must be a whole number >= {least}, got {_shown(config[key])}", source)


def _shown(value: tp.Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_lm_config(config: dict, source: Path, weights: Path | None = None) -> None:
    """Every LM setting of a moshi config of the type `LMModel` needs, one `CheckpointError`
    naming the file and the key otherwise; with the `weights` (a safetensors file: its header is
    read), every size the weights show must be theirs (`LM_COUNTED`, `LM_SHAPED`: a config of a
    million layers is refused here, not after building them)."""
    for key, least in LM_WHOLE_KEYS.items():
        if key in config:
            _whole_number(config, key, least, source)
    for key, least in LM_OPTIONAL_WHOLE_KEYS.items():
        if config.get(key) is not None:
            _whole_number(config, key, least, source)
    for key in LM_NUMBER_KEYS:
        value = config.get(key)
        if key in config and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ):
            raise CheckpointError(f"{key} must be a positive number, got {_shown(value)}", source)
    for key in LM_FLAG_KEYS:
        if key in config and not isinstance(config[key], bool):
            raise CheckpointError(f"{key} must be true or false, got {_shown(config[key])}", source)
    for key in LM_NAME_KEYS:
        if key in config and not isinstance(config[key], str):
            raise CheckpointError(f"{key} must be a name, got {_shown(config[key])}", source)
    delays = config.get("delays")
    if "delays" in config and not (isinstance(delays, list) and all(_is_whole(d, 0) for d in delays)):
        raise CheckpointError(f"delays must be a list of whole numbers >= 0, got {_shown(delays)}", source)
    feedforward = config.get("depformer_dim_feedforward")
    if feedforward is not None and not (
        _is_whole(feedforward, 1) or (isinstance(feedforward, list) and all(_is_whole(d, 1) for d in feedforward))
    ):
        raise CheckpointError(
            f"depformer_dim_feedforward must be a whole number >= 1 (or a list of them), got {_shown(feedforward)}",
            source,
        )
    for dim, heads in (("dim", "num_heads"), ("depformer_dim", "depformer_num_heads")):
        if dim in config and heads in config and config[dim] % config[heads]:
            raise CheckpointError(f"{dim} {config[dim]} is not a multiple of {heads} {config[heads]}", source)
    if weights is not None and weights.suffix == ".safetensors" and weights.is_file():
        keys = check_safetensors(weights)
        for key, prefix in LM_COUNTED.items():
            _check_count(config, key, keys, prefix, source)
        with safe_open(str(weights), framework="pt") as handle:
            for key, (name, axis, offset) in LM_SHAPED.items():
                if key in config and name in keys:
                    shape = handle.get_slice(name).get_shape()
                    if len(shape) > axis and config[key] != shape[axis] - offset:
                        raise CheckpointError(
                            f"{key} is {config[key]}, but the weights ({weights.name}) have {shape[axis] - offset}",
                            source,
                        )


def check_mimi_config(config: dict, source: Path, weight_keys: tp.Sequence[str] | None = None) -> None:
    """Mimi's transformer settings as `check_lm_config` checks the LM's."""
    transformer = config.get("transformer")
    if transformer is None:
        return
    if not isinstance(transformer, dict):
        raise CheckpointError(f"transformer must be a mapping, got {_shown(transformer)}", source)
    for key, least in MIMI_WHOLE_KEYS.items():
        if transformer.get(key) is not None:
            _whole_number(transformer, key, least, source, "transformer.")
    if weight_keys is not None:
        _check_count(transformer, "num_layers", weight_keys, MIMI_LAYER_PREFIX, source, "transformer.")


def _check_count(
    config: dict, key: str, weight_keys: tp.Sequence[str], prefix: str, source: Path, where: str = ""
) -> None:
    """`config[key]` is the number of modules `prefix`N. the weights hold (where they hold any)."""
    held = {name[len(prefix) :].split(".", 1)[0] for name in weight_keys if name.startswith(prefix)}
    count = len({index for index in held if index.isdigit()})
    if key in config and count and config[key] != count:
        raise CheckpointError(f"{where}{key} is {config[key]}, but the weights hold {count} ({prefix}N)", source)


def _lm_dims(config: dict) -> dict:
    return {key: config.get(key) for key in ("dim", "num_layers", "num_heads") if key in config}


# --- base ---------------------------------------------------------------------------------------


def looks_like_repo_id(base: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", base)) and not base.startswith(".")


def base_checkpoint_info(base: str) -> tp.Any:
    """moshi `CheckpointInfo` for a local folder (fully offline) or a hub repo id."""
    from moshi.models import loaders

    folder = Path(base).expanduser()
    if folder.is_dir():
        return _local_checkpoint_info(folder)
    if folder.exists():
        raise CheckpointError("expected a checkpoint folder (with config.json) or a Hugging Face repo id", base)
    if not looks_like_repo_id(base):
        raise CheckpointError("no such checkpoint folder", base)
    try:
        info = loaders.CheckpointInfo.from_hf_repo(base)
    except Exception as exc:
        raise CheckpointError(
            f"cannot fetch from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass a local "
            "folder with --base",
            base,
        ) from None
    _sanitize_lm_config(info, Path(base))
    return info


def _local_checkpoint_info(folder: Path) -> tp.Any:
    from moshi.models import loaders

    config_path = folder / "config.json"
    config = read_mapping(config_path)
    paths: dict[str, Path] = {}
    for key, default in MOSHI_FILE_KEYS.items():
        name = config.get(key, default)
        if not isinstance(name, str):
            raise CheckpointError(f"{key!r} must be a file name, got {name!r}", config_path)
        paths[key] = folder / name
        if not paths[key].is_file():
            raise CheckpointError(f"file not found (named by {key!r} in config.json)", paths[key])
    check_safetensors(paths["moshi_name"])  # its sizes are checked against the config below (_sanitize_lm_config)
    mimi_keys = check_safetensors(paths["mimi_name"])
    mimi_config_path = None
    if config.get("mimi_config_name"):
        mimi_config_path = folder / config["mimi_config_name"]
        check_mimi_config(read_mapping(mimi_config_path), mimi_config_path, mimi_keys)  # fail early, naming the file
    lora_weights = None
    if config.get("lora") and config.get("lora_name"):
        lora_weights = folder / config["lora_name"]
        check_safetensors(lora_weights)
    info = loaders.CheckpointInfo.from_hf_repo(
        str(folder),
        moshi_weights=paths["moshi_name"],
        mimi_weights=paths["mimi_name"],
        tokenizer=paths["tokenizer_name"],
        config_path=config_path,
        mimi_config_path=mimi_config_path,
        lora_weights=lora_weights,
    )
    _sanitize_lm_config(info, config_path)
    return info


def _sanitize_lm_config(info: tp.Any, source: Path) -> None:
    """Make the LM kwargs safe for `LMModel(...)` (moshi passes every unknown key through)."""
    if info.lm_config is None:
        return
    check_lm_config(info.lm_config, source, Path(info.moshi_weights) if info.moshi_weights else None)
    parse_yarn_config(info.lm_config, source)  # a setting we cannot honour fails here, naming the file
    for key in NON_LM_KEYS:
        info.lm_config.pop(key, None)
    # `lora: true` without an adapter file would silently add random LoRA weights: such a
    # checkpoint has its adapters merged already.
    if info.lm_config.get("lora") and info.lora_weights is None:
        info.lm_config["lora"] = False


# --- fine-tunes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraAdapters:
    """LoRA adapters in a fine-tune's weights file (moshi-finetune: `<linear>.lora_A.weight`
    [rank, in] and `<linear>.lora_B.weight` [out, rank], merged as `W + scaling * B @ A`)."""

    modules: tuple[str, ...]  # the adapted linear layers, e.g. "transformer.layers.0.gating.linear_in"
    rank: int
    scaling: float


@dataclass
class FineTune:
    """A TTT fine-tune on disk: where it is, what its TTT config says, where its weights are."""

    folder: Path  # the folder holding config.json / training_config.json and the weights
    ttt: TTTConfig | None
    config_source: Path | None  # the file the TTT config was read from
    weights: Path | None
    lm_config: dict | None  # the LM config saved with the fine-tune, to check against the base
    step: int | None = None  # the training step of a `checkpoint_NNNNNN/` folder
    yarn: YarnConfig | None = None  # RoPE scaling from the fine-tune's LM config
    lora: LoraAdapters | None = None


CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# moshi's `get_moshi_lm` default when a config enables LoRA without saying its scaling.
DEFAULT_LORA_SCALING = 2.0


def _has_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("config.json", "training_config.json", "args.yaml"))


def _checkpoint_steps(run: Path) -> dict[int, Path]:
    """`checkpoint_NNNNNN/` folders under a run's `checkpoints/` (or the folder itself), by step."""
    steps: dict[int, Path] = {}
    for where in (run / "checkpoints", run):
        if where.is_dir():
            for child in where.iterdir():
                if (match := CHECKPOINT_DIR.fullmatch(child.name)) and child.is_dir():
                    steps[int(match.group(1))] = child
    return steps


def resolve_finetune_folder(path: str | Path, step: int | None = None) -> Path:
    """Accept the consolidated folder itself, a checkpoint folder above it, or a run folder
    with `checkpoints/checkpoint_NNNNNN/` (the latest is taken unless `step` names one), or a
    weights file inside one."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError("no such fine-tune checkpoint", path)
    steps = _checkpoint_steps(path)
    if step is not None:
        if step not in steps:
            if _step_of(path) == step:
                return resolve_finetune_folder(path)
            listing = ", ".join(str(s) for s in sorted(steps)) or "none"
            raise CheckpointError(f"no checkpoint for step {step} (steps found: {listing})", path)
        return resolve_finetune_folder(steps[step])
    if _has_config(path) and any((path / name).is_file() for name in WEIGHT_NAMES):
        return path
    if (path / "consolidated").is_dir():
        return path / "consolidated"
    if steps:
        return resolve_finetune_folder(steps[max(steps)])
    if _has_config(path):
        return path
    raise CheckpointError(
        "not a fine-tune checkpoint: no config.json / training_config.json "
        "or consolidated/ or checkpoints/ folder inside",
        path,
    )


def _step_of(folder: Path) -> int | None:
    """The step of `checkpoint_NNNNNN/` or of `checkpoint_NNNNNN/consolidated/`."""
    for part in (folder, folder.parent):
        if match := CHECKPOINT_DIR.fullmatch(part.name):
            return int(match.group(1))
    return None


def find_lora(weights: Path, lm_config: dict | None) -> LoraAdapters | None:
    """LoRA adapters named in a weights file's header, with their rank and the config's scaling.

    Each adapted linear needs both halves with matching ranks; `lora: false` beside adapters
    is a contradiction moshi's loader refuses too.
    """
    keys = check_safetensors(weights)
    halves = [key for key in keys if key.endswith(LORA_SUFFIXES)]
    if not halves:
        return None
    config = lm_config or {}
    if "lora" in config and not config["lora"]:
        raise CheckpointError(f"holds {len(halves)} LoRA tensors but its config.json says lora: false", weights)
    modules = sorted({key.rsplit(".", 2)[0] for key in halves})
    with safe_open(str(weights), framework="pt") as handle:
        ranks = set()
        for module in modules:
            names = [f"{module}{suffix}" for suffix in LORA_SUFFIXES]
            if not all(name in keys for name in names):
                raise CheckpointError(f"LoRA adapter {module} lacks one of lora_A / lora_B", weights)
            a_shape, b_shape = (handle.get_slice(name).get_shape() for name in names)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(
                    f"LoRA adapter {module} has lora_A {a_shape} and lora_B {b_shape}; "
                    "expected [rank, in] and [out, rank]",
                    weights,
                )
            ranks.add(a_shape[0])
    if len(ranks) != 1:
        raise CheckpointError(f"LoRA adapters of different ranks {sorted(ranks)}", weights)
    rank = ranks.pop()
    if config.get("lora_rank", rank) != rank:
        raise CheckpointError(
            f"LoRA adapters have rank {rank} but config.json says lora_rank {config['lora_rank']}", weights
        )
    scaling = config.get("lora_scaling", DEFAULT_LORA_SCALING)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise CheckpointError(f"lora_scaling must be a finite number, got {scaling!r}", weights.parent / "config.json")
    return LoraAdapters(modules=tuple(modules), rank=rank, scaling=float(scaling))


# The research In-Place module (moshi_in_place `TTTGating`) clipped every chunk's delta to this
# Frobenius norm when its config had no `delta_clip_fro_norm`, in training and inference alike.
RESEARCH_DELTA_CLIP = 1e-5


def _section_layouts(folder: Path) -> list[SectionLayout]:
    """Where TTT sections may be, in the order we look, with the defaults each layout implies.

    - `config.json` -> `ttt`: our own layout; `variant` names the family.
    - `config.json` -> `ttt_config`: moshi_in_place (In-Place TTT; clip 1e-5 unless it says).
    - `training_config.json` / `args.yaml` -> `ttt`: moshi-finetune (TTT-MLP, or In-Place if it
      carries `chunk_size`), which never applied `post_norm`/`wo`. Run-level copies may also sit
      above `checkpoints/`.
    """
    above = [folder.parent, folder.parent.parent.parent] if folder.name == "consolidated" else []
    config_json = folder / "config.json"
    out = [
        SectionLayout(config_json, "ttt", "ttt-mlp", {"apply_output_proj": True}),
        SectionLayout(
            config_json, "ttt_config", "inplace", {"apply_output_proj": True, "delta_clip": RESEARCH_DELTA_CLIP}
        ),
    ]
    for where in [folder, *above]:
        out += [
            SectionLayout(where / name, "ttt", "ttt-mlp", {"apply_output_proj": False})
            for name in ("training_config.json", "args.yaml")
        ]
    return out


def find_ttt_config(folder: Path, num_layers: int, missing_ok: bool = False) -> tuple[TTTConfig | None, Path | None]:
    """The first TTT section found in a fine-tune folder (see `_section_layouts`), parsed, and
    the file it came from; the config is None when the section disables TTT (or, with
    `missing_ok`, when there is none)."""
    for layout in _section_layouts(folder):
        if not layout.file.is_file():
            continue
        data = read_mapping(layout.file)
        if data.get(layout.key) is not None:
            return ttt_config_from_section(data[layout.key], num_layers, layout), layout.file
    if missing_ok:
        return None, None
    raise CheckpointError(
        "found no TTT config (a 'ttt' or 'ttt_config' section in config.json, or "
        "'ttt' in training_config.json / args.yaml)",
        folder,
    )


def load_finetune(
    path: str | Path, num_layers: int, step: int | None = None, *, context: int | None = None
) -> FineTune:
    """Find and parse a fine-tune (configs and file names only, no weights). `context` is the base
    model's, to bound the TTT chunk size (extended when the fine-tune's YaRN extends it); `step`
    picks a checkpoint of a run folder (default: the latest)."""
    folder = resolve_finetune_folder(path, step)
    config_json = folder / "config.json"
    lm_config = read_mapping(config_json) if config_json.is_file() else None
    if lm_config is not None:
        check_lm_config(lm_config, config_json)
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    given = Path(path).expanduser()
    if given.is_file() and given.suffix == ".safetensors":
        weights = given  # the user named the file: do not pick another one beside it
    lora = None if weights is None else find_lora(weights, lm_config)
    # A LoRA-only fine-tune (moshi-finetune without TTT) has no TTT section at all.
    ttt, source = find_ttt_config(folder, num_layers, missing_ok=lora is not None)
    if ttt is not None and weights is None:
        raise CheckpointError(f"no TTT weights: expected one of {', '.join(WEIGHT_NAMES)}", folder)
    yarn = None if lm_config is None else parse_yarn_config(lm_config, config_json)
    if ttt is not None:
        check_ttt_config(ttt, extended_context(context, yarn) if yarn and context else context, source)
    return FineTune(
        folder=folder,
        ttt=ttt,
        config_source=source,
        weights=weights,
        lm_config=lm_config,
        step=_step_of(folder),
        yarn=yarn,
        lora=lora,
    )


@dataclass(frozen=True)
class LMSettings:
    """LM settings a fine-tune changes at inference: RoPE scaling and the attention context."""

    yarn: YarnConfig | None = None
    context: int | None = None  # the context the LM runs with; None: the base's, unchanged
    trained_context: int | None = None  # the LM config's `context`, before YaRN extends it


def lm_settings(base_lm_config: dict | None, base_source: Path, finetune: FineTune | None) -> LMSettings:
    """RoPE scaling and the attention context the run uses.

    Both belong to the LM config the fine-tune was trained with: its own config.json when it
    has one (moshi_in_place's `run_inference.py` reads `yarn_config` and `context` from there),
    else the base's. Under YaRN the context is extended to `int(context * scale)`.
    """
    own = finetune.lm_config if finetune is not None and finetune.lm_config is not None else None
    if own is not None and "yarn_config" in own:
        yarn = finetune.yarn
    else:
        yarn = parse_yarn_config(base_lm_config or {}, base_source)
    if yarn is None:
        return LMSettings()
    context = next((c["context"] for c in (own, base_lm_config) if c is not None and "context" in c), DEFAULT_CONTEXT)
    return LMSettings(yarn, extended_context(context, yarn), context)


def check_compatible(finetune: FineTune, base_lm_config: dict | None) -> None:
    """A fine-tune of another model size would load with confusing shape errors; say so plainly."""
    if finetune.lm_config is None or base_lm_config is None:
        return
    ours, theirs = _lm_dims(base_lm_config), _lm_dims(finetune.lm_config)
    diff = {k: (theirs[k], ours[k]) for k in theirs if k in ours and theirs[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k} {a} vs base {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"fine-tune does not match the base model: {detail}", finetune.folder / "config.json")


# moshi-finetune's `TrainArgs` defaults for the loss weights its training arguments may record.
LOSS_WEIGHT_DEFAULTS = {"first_codebook_weight_multiplier": 1.0, "text_padding_weight": 0.5}


def training_loss_weights(finetune: FineTune | None) -> dict[str, tuple[float, str]]:
    """The training loss's weights, each with where it came from: the fine-tune's training
    arguments (`training_config.json` / `args.yaml`, beside it or at the run level) where they
    record it, else moshi-finetune's default."""
    found: dict[str, tuple[float, str]] = {}
    if finetune is not None:
        folder = finetune.folder
        above = [folder.parent, folder.parent.parent.parent] if folder.name == "consolidated" else []
        for where in [folder, *above]:
            for name in ("training_config.json", "args.yaml"):
                path = where / name
                if not path.is_file():
                    continue
                data = read_mapping(path)
                for key in LOSS_WEIGHT_DEFAULTS:
                    value = data.get(key)
                    if key not in found and isinstance(value, (int, float)) and not isinstance(value, bool):
                        if not math.isfinite(value) or value < 0:
                            raise CheckpointError(f"{key} must be a number >= 0, got {value!r}", path)
                        found[key] = (float(value), str(path))
    for key, value in LOSS_WEIGHT_DEFAULTS.items():
        found.setdefault(key, (value, "moshi-finetune's default"))
    return found
