"""Finding and validating checkpoints: the base Moshi folder or repo, and TTT fine-tunes.

Base: a Hugging Face repo id or a local folder laid out like Kyutai's repos (`config.json`
naming its files with moshi's keys). Local folders are resolved file by file and handed to
moshi's `CheckpointInfo.from_hf_repo` as explicit paths, which is the only way it never touches
the hub. Fine-tunes: a `consolidated/` folder (or a checkpoint / run folder above it) holding a
TTT config and safetensors weights; see `config.py` for the config sections we accept.
"""

from __future__ import annotations

import json
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import safe_open

from .config import TTTConfig, check_ttt_config, ttt_config_from_section
from .families import SectionLayout
from .errors import CheckpointError


# File names in a config.json that moshi's loader resolves, with its defaults.
MOSHI_FILE_KEYS = {"moshi_name": "model.safetensors",
                   "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
                   "tokenizer_name": "tokenizer_spm_32k_3.model"}
# Every key moshi's loader (`CheckpointInfo.from_hf_repo`) pops from a config.json before the
# rest becomes `LMModel(...)` kwargs: file names and generation settings.
LOADER_KEYS = (*MOSHI_FILE_KEYS, "mimi_config_name", "lora_name", "model_type", "lm_gen_config",
               "tts_config", "stt_config", "model_id")
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
        raise CheckpointError(f"cannot fetch from the Hugging Face hub ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass a local "
                              "folder with --base", base) from None
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
    for key in ("moshi_name", "mimi_name"):
        check_safetensors(paths[key])
    mimi_config_path = None
    if config.get("mimi_config_name"):
        mimi_config_path = folder / config["mimi_config_name"]
        read_mapping(mimi_config_path)  # fail early, naming the file
    lora_weights = None
    if config.get("lora") and config.get("lora_name"):
        lora_weights = folder / config["lora_name"]
        check_safetensors(lora_weights)
    info = loaders.CheckpointInfo.from_hf_repo(
        str(folder), moshi_weights=paths["moshi_name"], mimi_weights=paths["mimi_name"],
        tokenizer=paths["tokenizer_name"], config_path=config_path,
        mimi_config_path=mimi_config_path, lora_weights=lora_weights)
    _sanitize_lm_config(info, config_path)
    return info


def _refuse_yarn(lm_config: dict, source: Path) -> None:
    """RoPE scaling is not implemented: refuse a config that enables it. A yarn_config section
    without `enabled` is taken as on: refusing beats silently wrong RoPE."""
    yarn = lm_config.get("yarn_config")
    if isinstance(yarn, dict) and bool(yarn.get("enabled", True)):
        raise CheckpointError("RoPE scaling (yarn_config) is not supported", source)


def _sanitize_lm_config(info: tp.Any, source: Path) -> None:
    """Make the LM kwargs safe for `LMModel(...)` (moshi passes every unknown key through)."""
    if info.lm_config is None:
        return
    _refuse_yarn(info.lm_config, source)
    for key in NON_LM_KEYS:
        info.lm_config.pop(key, None)
    # `lora: true` without an adapter file would silently add random LoRA weights: such a
    # checkpoint has its adapters merged already.
    if info.lm_config.get("lora") and info.lora_weights is None:
        info.lm_config["lora"] = False


# --- fine-tunes ---------------------------------------------------------------------------------

@dataclass
class FineTune:
    """A TTT fine-tune on disk: where it is, what its TTT config says, where its weights are."""

    folder: Path  # the folder holding config.json / training_config.json and the weights
    ttt: TTTConfig | None
    config_source: Path | None  # the file the TTT config was read from
    weights: Path | None
    lm_config: dict | None  # the LM config saved with the fine-tune, to check against the base


def resolve_finetune_folder(path: str | Path) -> Path:
    """Accept the consolidated folder itself, a checkpoint folder above it, or a run folder
    with `checkpoints/checkpoint_NNNNNN/` (the latest is taken), or a weights file inside one."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError("no such fine-tune checkpoint", path)

    def has_config(folder: Path) -> bool:
        return any((folder / name).is_file() for name in ("config.json", "training_config.json", "args.yaml"))

    if has_config(path) and any((path / name).is_file() for name in WEIGHT_NAMES):
        return path
    if (path / "consolidated").is_dir():
        return path / "consolidated"
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        steps = sorted((int(m.group(1)), p) for p in checkpoints.iterdir()
                       if (m := re.fullmatch(r"checkpoint_(\d+)", p.name)) and p.is_dir())
        if steps:
            return resolve_finetune_folder(steps[-1][1])
    if has_config(path):
        return path
    raise CheckpointError("not a fine-tune checkpoint: no config.json / training_config.json "
                          "or consolidated/ or checkpoints/ folder inside", path)


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
    out = [SectionLayout(config_json, "ttt", "ttt-mlp", {"apply_output_proj": True}),
           SectionLayout(config_json, "ttt_config", "inplace",
                         {"apply_output_proj": True, "delta_clip": RESEARCH_DELTA_CLIP})]
    for where in [folder, *above]:
        out += [SectionLayout(where / name, "ttt", "ttt-mlp", {"apply_output_proj": False})
                for name in ("training_config.json", "args.yaml")]
    return out


def find_ttt_config(folder: Path, num_layers: int) -> tuple[TTTConfig | None, Path]:
    """The first TTT section found in a fine-tune folder (see `_section_layouts`), parsed, and
    the file it came from; the config is None when the section disables TTT."""
    for layout in _section_layouts(folder):
        if not layout.file.is_file():
            continue
        data = read_mapping(layout.file)
        if data.get(layout.key) is not None:
            return ttt_config_from_section(data[layout.key], num_layers, layout), layout.file
    raise CheckpointError("found no TTT config (a 'ttt' or 'ttt_config' section in config.json, or "
                          "'ttt' in training_config.json / args.yaml)", folder)


def load_finetune(path: str | Path, num_layers: int, context: int | None = None) -> FineTune:
    """Find and parse a fine-tune (configs and file names only, no weights); `context` is the base
    model's, to bound the TTT chunk size."""
    folder = resolve_finetune_folder(path)
    lm_config = read_mapping(folder / "config.json") if (folder / "config.json").is_file() else None
    ttt, source = find_ttt_config(folder, num_layers)
    if ttt is not None:
        check_ttt_config(ttt, context, source)
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if ttt is not None and weights is None:
        raise CheckpointError(f"no TTT weights: expected one of {', '.join(WEIGHT_NAMES)}", folder)
    given = Path(path).expanduser()
    if given.is_file() and given.suffix == ".safetensors":
        weights = given  # the user named the file: do not pick another one beside it
    if lm_config is not None:
        _refuse_yarn(lm_config, folder / "config.json")
    return FineTune(folder=folder, ttt=ttt, config_source=source, weights=weights, lm_config=lm_config)


def check_compatible(finetune: FineTune, base_lm_config: dict | None) -> None:
    """A fine-tune of another model size would load with confusing shape errors; say so plainly."""
    if finetune.lm_config is None or base_lm_config is None:
        return
    ours, theirs = _lm_dims(base_lm_config), _lm_dims(finetune.lm_config)
    diff = {k: (theirs[k], ours[k]) for k in theirs if k in ours and theirs[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k} {a} vs base {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"fine-tune does not match the base model: {detail}", finetune.folder / "config.json")
