"""Loading checkpoints offline, resolving fine-tune folders, the config sources we read, and the
one-line `CheckpointError` every broken checkpoint gives (library and CLI)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json
import shutil
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import block_hub, check_counts, copy_tree, edit_json, edit_weights, run_stream
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.checkpoints.tiny import FINETUNE_STEP_DIR, TinyPaths
from moshi_ttt.errors import CheckpointError, MoshiTTTError
from moshi_ttt.ttt.base import TTTController
from moshi_ttt.ttt.families import family
from moshi_ttt.ttt.inplace import InPlaceTTTGating
from moshi_ttt.ttt.mlp import TTTMLP

torch.set_num_threads(1)

MLP_W1 = "transformer.layers.1.seq_modeling_block.ttt_layer.ttt.W1"


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_recording(recordings: list[Path]) -> Path:
    return recordings[0]


# -- offline loading ------------------------------------------------------------------------------


def test_local_folders_load_fully_offline(
    tiny_inplace: TinyPaths, tiny_ttt_mlp: TinyPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = block_hub(monkeypatch)

    base = load_model(str(tiny_inplace.base))
    assert base.finetune is None and not TTTController(base.lm)
    # The weights are the folder's, not a fresh random init.
    saved = load_file(str(tiny_inplace.base / "model.safetensors"))
    key = "transformer.layers.0.gating.linear_out.weight"
    assert torch.equal(base.lm.state_dict()[key], saved[key])
    assert base.text_tokenizer.vocab_size() == base.lm.text_card

    for paths, kind in ((tiny_inplace, InPlaceTTTGating), (tiny_ttt_mlp, TTTMLP)):
        model = load_model(str(paths.base), str(paths.finetune))
        assert {type(m) for m in TTTController(model.lm).layers} == {kind}
    assert calls == []


# -- one-line errors naming the file ------------------------------------------------------------


@dataclass
class Broken:
    base: Path
    finetune: Path | None
    culprit: Path  # the path the error must name
    words: str  # something the reason must say


def _consolidated(run: Path) -> Path:
    return run / FINETUNE_STEP_DIR


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mangle_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def _drop_layer(layer: int) -> tp.Callable[[dict], None]:
    def fn(tensors: dict) -> None:
        for key in [k for k in tensors if k.startswith(f"transformer.layers.{layer}.")]:
            del tensors[key]

    return fn


def _set(key: str, value: tp.Any, section: str | None = None) -> tp.Callable[[dict], None]:
    def fn(data: dict) -> None:
        (data[section] if section else data)[key] = value

    return fn


def make_broken(case: str, root: Path, inplace: TinyPaths, mlp: TinyPaths) -> Broken:
    """Build one broken checkpoint under `root` (copies of the tiny ones)."""
    if case.startswith("base-"):
        base = copy_tree(inplace.base, root / "base")
        config, weights = base / "config.json", base / "model.safetensors"
        if case == "base-missing-config":
            config.unlink()
            return Broken(base, None, config, "not found")
        if case == "base-malformed-config":
            config.write_text('{"dim": 64,,}')
            return Broken(base, None, config, "malformed JSON")
        if case == "base-missing-weights":
            edit_json(config, _set("moshi_name", "lm-weights.safetensors"))
            return Broken(base, None, base / "lm-weights.safetensors", "not found")
        if case == "base-truncated-weights":
            _truncate(weights)
            return Broken(base, None, weights, "safetensors")
        if case == "base-corrupt-weights":
            _mangle_header(weights)
            return Broken(base, None, weights, "safetensors")
        if case == "base-empty-weights":
            weights.write_bytes(b"")
            return Broken(base, None, weights, "safetensors")
        if case == "base-yarn":
            edit_json(config, _set("yarn_config", {"enabled": True, "factor": 4.0}))
            return Broken(base, None, config, "yarn")
        if case == "base-weight-shape":
            key = "transformer.layers.0.gating.linear_out.weight"
            edit_weights(weights, lambda t: t.__setitem__(key, t[key][:, :10].contiguous()))
            return Broken(base, None, weights, "cannot load")
        raise AssertionError(case)

    source = inplace if case.startswith("inplace-") else mlp
    run = copy_tree(source.finetune, root / "run")
    folder = _consolidated(run)
    training, config, weights = folder / "training_config.json", folder / "config.json", folder / "lora.safetensors"
    b = source.base
    if case == "mlp-no-ttt-config":
        training.unlink()
        return Broken(b, run, folder, "no TTT config")
    if case == "mlp-missing-layer-weights":  # config says layers 1,2,3; weights hold 1 and 2 only
        edit_json(training, _set("layers", "1,2,3", "ttt"))
        return Broken(b, run, weights, "transformer.layers.3.")
    if case == "mlp-dropped-layer-weights":
        edit_weights(weights, _drop_layer(2))
        return Broken(b, run, weights, "transformer.layers.2.")
    if case == "inplace-missing-layer-weights":
        edit_weights(weights, _drop_layer(3))
        return Broken(b, run, weights, "transformer.layers.3.")
    if case == "mlp-weight-shape":
        edit_weights(weights, lambda t: t.__setitem__(MLP_W1, t[MLP_W1][..., :5].contiguous()))
        return Broken(b, run, weights, "shape")
    if case == "mlp-other-model-size":
        edit_json(config, _set("dim", 128))
        return Broken(b, run, config, "dim 128")
    if case == "inplace-other-model-size":
        edit_json(config, _set("dim", 4096))
        return Broken(b, run, config, "dim 4096")
    if case == "inplace-yarn":
        edit_json(config, _set("yarn_config", {"enabled": True, "factor": 2.0}))
        return Broken(b, run, config, "yarn")
    if case == "mlp-unknown-variant":
        edit_json(training, _set("variant", "ttt-linear", "ttt"))
        return Broken(b, run, training, "ttt-linear")
    if case == "mlp-deep-inner-model":
        edit_json(training, _set("ttt_mlp_layers", 3, "ttt"))
        return Broken(b, run, training, "ttt_mlp_layers")
    if case == "mlp-lora-keys":
        lora_key = "transformer.layers.0.self_attn.in_projs.0.lora_A.weight"
        edit_weights(weights, lambda t: t.__setitem__(lora_key, torch.zeros(4, 64, dtype=torch.bfloat16)))
        return Broken(b, run, weights, "LoRA")
    if case == "inplace-truncated-weights":
        _truncate(weights)
        return Broken(b, run, weights, "safetensors")
    if case == "mlp-malformed-training-config":
        training.write_text('{"ttt": {')
        return Broken(b, run, training, "malformed JSON")
    if case == "mlp-no-weights":
        weights.unlink()
        return Broken(b, run, folder, "no TTT weights")
    raise AssertionError(case)


BASE_CASES = [
    "base-missing-config",
    "base-malformed-config",
    "base-missing-weights",
    "base-truncated-weights",
    "base-corrupt-weights",
    "base-empty-weights",
    "base-yarn",
    "base-weight-shape",
]
FINETUNE_CASES = [
    "mlp-no-ttt-config",
    "mlp-missing-layer-weights",
    "mlp-dropped-layer-weights",
    "inplace-missing-layer-weights",
    "mlp-weight-shape",
    "mlp-other-model-size",
    "inplace-other-model-size",
    "inplace-yarn",
    "mlp-unknown-variant",
    "mlp-deep-inner-model",
    "mlp-lora-keys",
    "inplace-truncated-weights",
    "mlp-malformed-training-config",
    "mlp-no-weights",
]
CASES = BASE_CASES + FINETUNE_CASES


@pytest.mark.parametrize("case", CASES)
def test_broken_checkpoint_is_one_line_naming_the_file(
    case: str, tmp_path: Path, tiny_inplace: TinyPaths, tiny_ttt_mlp: TinyPaths
) -> None:
    broken = make_broken(case, tmp_path, tiny_inplace, tiny_ttt_mlp)
    with pytest.raises(CheckpointError) as info:
        load_model(str(broken.base), None if broken.finetune is None else str(broken.finetune))
    message = str(info.value)
    assert "\n" not in message
    assert info.value.path == str(broken.culprit)
    assert message.startswith(f"{broken.culprit}: ")
    assert broken.words.lower() in message.lower(), message


@pytest.mark.parametrize(
    "case",
    [
        "base-missing-config",
        "base-truncated-weights",
        "base-yarn",
        "mlp-no-ttt-config",
        "mlp-missing-layer-weights",
        "mlp-weight-shape",
        "mlp-other-model-size",
        "inplace-yarn",
        "mlp-unknown-variant",
        "mlp-deep-inner-model",
        "mlp-lora-keys",
        "inplace-truncated-weights",
    ],
)
def test_cli_reports_broken_checkpoint_in_one_line(
    case: str,
    tmp_path: Path,
    tiny_inplace: TinyPaths,
    tiny_ttt_mlp: TinyPaths,
    short_recording: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moshi_ttt_cli.app import app

    monkeypatch.setenv("MOSHI_TTT_DEVICE", "cpu")  # the CLI sets it; restored after the test
    broken = make_broken(case, tmp_path / "ckpt", tiny_inplace, tiny_ttt_mlp)
    target = tmp_path / "out" / "reply.wav"
    args = [
        "infer",
        str(short_recording),
        str(target),
        "--base",
        str(broken.base),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--quiet",
    ]
    if broken.finetune is not None:
        args += ["--checkpoint", str(broken.finetune)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(broken.culprit) in lines[0]
    assert result.stdout.strip() == ""
    assert not target.exists() and not target.parent.exists()


def test_cli_error_keeps_brackets_in_paths(
    tmp_path: Path, tiny_inplace: TinyPaths, short_recording: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moshi_ttt_cli.app import app

    monkeypatch.setenv("MOSHI_TTT_DEVICE", "cpu")
    base = copy_tree(tiny_inplace.base, tmp_path / "[old] base")
    (base / "config.json").unlink()
    result = CliRunner().invoke(
        app,
        [
            "infer",
            str(short_recording),
            str(tmp_path / "o.wav"),
            "--base",
            str(base),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert str(base / "config.json") in result.stderr


# -- real-layout details ---------------------------------------------------------------------------


def test_ttt_mlp_backward_gating_tensors_are_accepted_and_unused(
    tiny_ttt_mlp: TinyPaths, tmp_path: Path, short_recording: Path
) -> None:
    """moshi-finetune saves `backward_ssm_gating.gating_alpha` beside the forward one; only the
    forward gate is used, so the checkpoint must load and behave exactly as without it."""
    run = copy_tree(tiny_ttt_mlp.finetune, tmp_path / "run")

    def add_backward(tensors: dict) -> None:
        for i in (1, 2):
            tensors[f"transformer.layers.{i}.seq_modeling_block.backward_ssm_gating.gating_alpha"] = torch.full(
                (64,), 3.0, dtype=torch.bfloat16
            )

    edit_weights(_consolidated(run) / "lora.safetensors", add_backward)
    with_backward = load_model(str(tiny_ttt_mlp.base), str(run))
    plain = load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune))
    assert not any("backward_ssm_gating" in name for name in with_backward.lm.state_dict())
    seq = torch.zeros(1, plain.lm.num_codebooks, 9, dtype=torch.long)
    seq[:, 0] = torch.arange(9)
    with torch.no_grad():
        assert torch.equal(with_backward.lm.forward_text(seq)[0], plain.lm.forward_text(seq)[0])


@pytest.mark.parametrize("variant", ["inplace", "ttt-mlp"])
def test_full_consolidated_safetensors(
    variant: str, tiny_inplace: TinyPaths, tiny_ttt_mlp: TinyPaths, tmp_path: Path
) -> None:
    """`consolidated.safetensors` = the whole fine-tuned LM state (bf16) plus the TTT tensors: the
    base weights it carries replace the base folder's, and In-Place's W^(0) is its down projection."""
    paths = tiny_inplace if variant == "inplace" else tiny_ttt_mlp
    run = copy_tree(paths.finetune, tmp_path / "run")
    folder = _consolidated(run)
    tensors = load_file(str(folder / "lora.safetensors"))
    (folder / "lora.safetensors").unlink()
    base_state = load_file(str(paths.base / "model.safetensors"))
    key = "transformer.layers.1.gating.linear_out.weight"
    base_state[key] = base_state[key] * -3.0
    tensors.update({k: v.to(torch.bfloat16) for k, v in base_state.items()})
    save_file(tensors, str(folder / "consolidated.safetensors"))

    model = load_model(str(paths.base), str(run))
    assert model.finetune.weights == folder / "consolidated.safetensors"
    expected = base_state[key].to(torch.bfloat16).float()
    layer = model.lm.transformer.layers[1]
    assert torch.equal(layer.gating.linear_out.weight.detach(), expected)
    if variant == "inplace":
        assert torch.equal(layer.gating.w_down, expected)
    else:
        assert torch.equal(layer.seq_modeling_block.ttt.W1.detach(), tensors[MLP_W1].float())


# -- fine-tune folder resolution -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tiny_ttt_mlp: TinyPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoint_000100 (the fixture's) and an older checkpoint_000050 whose TTT
    weights differ."""
    run = copy_tree(tiny_ttt_mlp.finetune, tmp_path_factory.mktemp("resolve") / "run")
    older = run / "checkpoints" / "checkpoint_000050" / "consolidated"
    shutil.copytree(_consolidated(run), older)
    edit_weights(
        older / "lora.safetensors", lambda t: t.__setitem__(MLP_W1, (t[MLP_W1].float() * -2.0).to(torch.bfloat16))
    )
    return run


def _loaded_w1(model) -> torch.Tensor:
    return model.lm.transformer.layers[1].seq_modeling_block.ttt.W1.detach()


@pytest.mark.parametrize(
    "relative, step",
    [
        ("", 100),
        ("checkpoints/checkpoint_000100", 100),
        ("checkpoints/checkpoint_000100/consolidated", 100),
        ("checkpoints/checkpoint_000050", 50),
        ("checkpoints/checkpoint_000050/consolidated", 50),
        ("checkpoints/checkpoint_000050/consolidated/lora.safetensors", 50),
        ("checkpoints/checkpoint_000100/consolidated/lora.safetensors", 100),
    ],
)
def test_finetune_resolution(tiny_ttt_mlp: TinyPaths, two_checkpoints: Path, relative: str, step: int) -> None:
    path = two_checkpoints / relative if relative else two_checkpoints
    model = load_model(str(tiny_ttt_mlp.base), str(path))
    folder = two_checkpoints / "checkpoints" / f"checkpoint_{step:06d}" / "consolidated"
    assert model.finetune.folder == folder
    assert model.finetune.weights == folder / "lora.safetensors"
    expected = load_file(str(folder / "lora.safetensors"))[MLP_W1].float()
    assert torch.equal(_loaded_w1(model), expected)
    other = 50 if step == 100 else 100
    other_w1 = load_file(
        str(two_checkpoints / "checkpoints" / f"checkpoint_{other:06d}" / "consolidated" / "lora.safetensors")
    )[MLP_W1].float()
    assert not torch.equal(_loaded_w1(model), other_w1)


# -- In-Place config sources -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inplace_default(tiny_inplace: TinyPaths, short_recording: Path):
    model = load_model(str(tiny_inplace.base), str(tiny_inplace.finetune))
    return model, run_stream(model, short_recording)


def test_inplace_ttt_config_section(inplace_default) -> None:
    model, result = inplace_default
    assert model.finetune.config_source.name == "config.json"
    assert model.ttt.layers == [1, 3]
    assert (model.ttt.chunk_size, model.ttt.learning_rate, model.ttt.conv_kernel_size) == (8, 0.002, 2)
    assert model.ttt.delta_clip == family("inplace").tiny_section["delta_clip_fro_norm"]
    assert model.ttt.delta_clip_origin == "config"
    gatings = [type(layer.gating).__name__ for layer in model.lm.transformer.layers]
    assert gatings == ["ActivationGating", "InPlaceTTTGating", "ActivationGating", "InPlaceTTTGating"]
    check_counts(result, [1, 3])


def _inplace_copy(tiny_inplace: TinyPaths, root: Path) -> tuple[Path, Path]:
    run = copy_tree(tiny_inplace.finetune, root / "run")
    folder = _consolidated(run)
    edit_json(folder / "config.json", lambda d: d.pop("ttt_config"))
    return run, folder


def test_inplace_ttt_section_with_layer_list_and_delta_clip(
    tiny_inplace: TinyPaths, tmp_path: Path, short_recording: Path, inplace_default
) -> None:
    clip = 1e-4
    run, folder = _inplace_copy(tiny_inplace, tmp_path)
    edit_json(
        folder / "config.json",
        _set(
            "ttt", {"variant": "inplace", "layers": [3, 1], "chunk_size": 8, "learning_rate": 0.002, "delta_clip": clip}
        ),
    )
    model = load_model(str(tiny_inplace.base), str(run))
    assert model.finetune.config_source == folder / "config.json"
    assert model.ttt.layers == [1, 3] and model.ttt.delta_clip == clip
    result = run_stream(model, short_recording)
    check_counts(result, [1, 3])
    _, unclipped = inplace_default
    lr = model.ttt.learning_rate
    for report, free in zip(result.ttt_layers, unclipped.ttt_layers):
        # The clip bounds each chunk's delta before the learning rate: W moves by at most lr * clip.
        assert report.drift <= report.updates * lr * clip * (1 + 1e-4)
        assert report.drift >= report.updates * lr * clip * 0.5  # every update clipped, none vanishing
        assert report.clipped_updates == report.updates
        assert free.drift > report.updates * lr * clip  # with the fixture's looser clip it moved further


def _copy_with_clip(tiny_inplace: TinyPaths, root: Path, clip: tp.Callable[[dict], None]) -> Path:
    run = copy_tree(tiny_inplace.finetune, root / "run")
    edit_json(_consolidated(run) / "config.json", lambda d: clip(d["ttt_config"]))
    return run


@pytest.mark.parametrize(
    "edit, expected, origin",
    [
        # moshi_in_place without the key: the research module's default applied in training and inference.
        (lambda s: s.pop("delta_clip_fro_norm"), 1e-5, "research default"),
        (lambda s: s.update(delta_clip_fro_norm=None), None, "config"),
        (lambda s: s.update(delta_clip_fro_norm=0), None, "config"),
        (lambda s: s.update(delta_clip_fro_norm=-1.0), None, "config"),
        (lambda s: s.update(delta_clip=3e-4) or s.pop("delta_clip_fro_norm"), 3e-4, "config"),  # the alias
        (lambda s: s.update(delta_clip_fro_norm=2.5, delta_clip_epsilon=0.5), 2.5, "config"),
    ],
)
def test_inplace_delta_clip_keys(tiny_inplace: TinyPaths, tmp_path: Path, edit, expected, origin: str) -> None:
    from moshi_ttt.checkpoints.layouts import load_finetune

    ttt = load_finetune(_copy_with_clip(tiny_inplace, tmp_path, edit), 4).ttt
    assert ttt.delta_clip == expected
    assert ttt.delta_clip_origin.startswith(origin)
    assert ttt.delta_clip_epsilon == (0.5 if expected == 2.5 else 1e-12)


def test_research_default_clip_fires_on_every_update(
    tiny_inplace: TinyPaths, tmp_path: Path, short_recording: Path, inplace_default
) -> None:
    run = _copy_with_clip(tiny_inplace, tmp_path, lambda s: s.pop("delta_clip_fro_norm"))
    result = run_stream(load_model(str(tiny_inplace.base), str(run)), short_recording)
    _, fixture = inplace_default
    for report, loose in zip(result.ttt_layers, fixture.ttt_layers):
        assert report.clipped_updates == report.updates > 0
        assert report.drift <= report.updates * 0.002 * 1e-5 * (1 + 1e-4)  # lr * tau per update
        assert loose.clipped_updates < loose.updates  # the fixture's tau=400 lets some through


def test_override_delta_clip_at_load(
    tiny_inplace: TinyPaths, tiny_ttt_mlp: TinyPaths, short_recording: Path, inplace_default
) -> None:
    model = load_model(
        str(tiny_inplace.base),
        str(tiny_inplace.finetune),
        ttt_overrides={"delta_clip": None, "delta_clip_origin": "--delta-clip"},
    )
    assert model.ttt.delta_clip is None and model.describe_ttt()["delta_clip_origin"] == "--delta-clip"
    free = run_stream(model, short_recording)
    _, clipped = inplace_default
    assert all(r.clipped_updates == 0 for r in free.ttt_layers)
    assert any(r.clipped_updates for r in clipped.ttt_layers)
    assert free.pcm.tobytes() != clipped.pcm.tobytes()
    with pytest.raises(MoshiTTTError, match="delta_clip does not apply to ttt-mlp"):
        load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune), ttt_overrides={"delta_clip": 1.0})
    with pytest.raises(MoshiTTTError, match="no TTT layers"):
        load_model(str(tiny_inplace.base), ttt_overrides={"delta_clip": 1.0})


def test_research_w_down_tensor_is_the_initial_fast_weight(
    tiny_inplace: TinyPaths, tmp_path: Path, short_recording: Path, inplace_default
) -> None:
    """moshi_in_place saves the fast weight as `gating.w_down` (float32), plus a reset copy
    `w_down_pretrained`; W^(0) must come from `w_down`, not the base down projection."""
    run = copy_tree(tiny_inplace.finetune, tmp_path / "run")
    base_state = load_file(str(tiny_inplace.base / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    trained = {}

    def add_w_down(tensors: dict) -> None:
        for layer in (1, 3):
            base_w = base_state[f"transformer.layers.{layer}.gating.linear_out.weight"]
            trained[layer] = (base_w + 0.05 * torch.randn(base_w.shape, generator=gen)).float()
            tensors[f"transformer.layers.{layer}.gating.w_down"] = trained[layer]
            tensors[f"transformer.layers.{layer}.gating.w_down_pretrained"] = torch.zeros_like(base_w)

    edit_weights(_consolidated(run) / "lora.safetensors", add_w_down)
    model = load_model(str(tiny_inplace.base), str(run))
    for layer in (1, 3):
        gating = model.lm.transformer.layers[layer].gating
        assert torch.equal(gating.w_down, trained[layer])
        assert not torch.equal(gating.linear_out.weight.float(), trained[layer])  # the slow weight is kept
    result = run_stream(model, short_recording)
    _, from_base = inplace_default
    assert [r.norm_initial for r in result.ttt_layers] == pytest.approx(
        [float(trained[layer].norm()) for layer in (1, 3)], rel=1e-6
    )
    assert result.pcm.tobytes() != from_base.pcm.tobytes()


@pytest.mark.parametrize("where", ["consolidated", "run"])
def test_inplace_args_yaml_section(
    tiny_inplace: TinyPaths, tmp_path: Path, short_recording: Path, inplace_default, where: str
) -> None:
    """`ttt:` in an args.yaml beside config.json (or at the run level, where moshi-finetune writes
    it): the same settings as the fixture's ttt_config give exactly the same stream."""
    run, folder = _inplace_copy(tiny_inplace, tmp_path)
    section = {
        "enable": True,
        "start_layer": 1,
        "layer_frequency": 2,
        "chunk_size": 8,
        "learning_rate": 0.002,
        "conv_kernel_size": 2,
        "delta_clip_fro_norm": family("inplace").tiny_section["delta_clip_fro_norm"],
    }
    args_yaml = (folder if where == "consolidated" else run) / "args.yaml"
    args_yaml.write_text(yaml.safe_dump({"run_dir": str(run), "seed": 0, "ttt": section}))
    model = load_model(str(tiny_inplace.base), str(run))
    assert model.finetune.config_source == args_yaml
    assert model.ttt.layers == [1, 3]
    result = run_stream(model, short_recording)
    check_counts(result, [1, 3])
    _, reference = inplace_default
    assert result.ttt_layers == reference.ttt_layers
    assert (result.pcm == reference.pcm).all() and result.text_tokens == reference.text_tokens


# -- inspect ----------------------------------------------------------------------------------------


def _per_layer_counts(weights: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for key, value in load_file(str(weights)).items():
        layer = int(key.split(".")[2])
        counts[layer] = counts.get(layer, 0) + value.numel()
    return counts


@pytest.mark.parametrize("variant", ["inplace", "ttt-mlp"])
@pytest.mark.parametrize("with_base", [False, True])
def test_inspect_cli(variant: str, with_base: bool, tiny_inplace: TinyPaths, tiny_ttt_mlp: TinyPaths) -> None:
    from moshi_ttt_cli.app import app

    paths = tiny_inplace if variant == "inplace" else tiny_ttt_mlp
    args = ["inspect", str(paths.finetune)] + (["--base", str(paths.base)] if with_base else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()]
    layers = [1, 3] if variant == "inplace" else [1, 2]
    assert f"variant {variant}" in lines
    assert f"layers {layers}" in lines
    assert f"layer map {''.join('T' if i in layers else '.' for i in range(4))} (T = TTT layer)" in lines
    counts = _per_layer_counts(paths.finetune / FINETUNE_STEP_DIR / "lora.safetensors")
    assert sorted(counts) == layers
    for layer in layers:
        assert f"layer {layer} TTT params {counts[layer]:,}" in lines
    assert f"TTT params total {sum(counts.values()):,}" in lines
    base_line = [line for line in lines if line.startswith("base LM params")]
    if with_base:
        base_params = sum(p.numel() for p in load_model(str(paths.base)).lm.parameters())
        assert base_line == [f"base LM params {base_params:,}"]
    else:
        assert base_line == []


def test_inspect_without_an_lm_config_needs_the_base(tiny_ttt_mlp: TinyPaths, tmp_path: Path) -> None:
    """`layers: middle` can only be resolved with a layer count: without the fine-tune's
    config.json, inspect must say to pass --base (not list layers of a 10,000-layer model)."""
    from moshi_ttt_cli.app import app

    run = copy_tree(tiny_ttt_mlp.finetune, tmp_path / "run")
    (_consolidated(run) / "config.json").unlink()
    alone = CliRunner().invoke(app, ["inspect", str(run)])
    assert alone.exit_code == 2
    assert "pass --base" in alone.output and "Traceback" not in alone.output
    with_base = CliRunner().invoke(app, ["inspect", str(run), "--base", str(tiny_ttt_mlp.base)])
    assert with_base.exit_code == 0, with_base.output
    assert "layers [1, 2]" in " ".join(with_base.stdout.replace("│", " ").split())


def test_ttt_mlp_use_rope_checkpoint_streams(tiny_ttt_mlp: TinyPaths, tmp_path: Path, short_recording: Path) -> None:
    """`use_rope: true` in a moshi-finetune training_config: same tensors, rotated inner Q/K."""
    run = copy_tree(tiny_ttt_mlp.finetune, tmp_path / "run")
    edit_json(_consolidated(run) / "training_config.json", _set("use_rope", True, "ttt"))
    model = load_model(str(tiny_ttt_mlp.base), str(run))
    assert model.ttt.use_rope and model.ttt.rope_theta == 10000.0
    roped = run_stream(model, short_recording)
    check_counts(roped, [1, 2])
    plain = run_stream(load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune)), short_recording)
    assert roped.pcm.tobytes() != plain.pcm.tobytes()
    assert [r.drift for r in roped.ttt_layers] != [r.drift for r in plain.ttt_layers]


def test_make_tiny_sets_ttt_section_keys(tmp_path: Path) -> None:
    from moshi_ttt_cli.app import app

    result = CliRunner().invoke(
        app,
        ["make-tiny", str(tmp_path / "t"), "--variant", "ttt-mlp", "--ttt", "use_rope=true", "--ttt", "rope_theta=500"],
    )
    assert result.exit_code == 0, result.output
    section = json.loads((_consolidated(tmp_path / "t" / "ttt-mlp") / "training_config.json").read_text())["ttt"]
    assert section["use_rope"] is True and section["rope_theta"] == 500
    model = load_model(str(tmp_path / "t" / "base"), str(tmp_path / "t" / "ttt-mlp"))
    assert model.ttt.use_rope and model.ttt.rope_theta == 500.0
    bad = CliRunner().invoke(app, ["make-tiny", str(tmp_path / "u"), "--variant", "ttt-mlp", "--ttt", "use_rope"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
