"""Checkpoints that change the LM itself: YaRN RoPE scaling, LoRA adapters, and the layout
variants real runs write (several checkpoint steps, args.yaml, bf16 weights)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json
import math
import shutil
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import check_counts, edit_json, edit_weights
from moshi_ttt.checkpoints.layouts import load_finetune
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.checkpoints.rope_scaling import (
    YarnConfig,
    YarnRotaryEmbedding,
    rotate_with_frequencies,
    yarn_attention_factor,
    yarn_inverse_frequencies,
)
from moshi_ttt.checkpoints.tiny import FINETUNE_STEP_DIR, TINY_LORA, TINY_YARN, TinyPaths, write_tiny_variant
from moshi_ttt.errors import CheckpointError
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.streaming.reference import StreamingRunner

torch.set_num_threads(1)


def stream(model, recording: Path):
    return StreamingRunner(model).run(read_audio(recording))


def same_stream(a, b) -> bool:
    return a.text_tokens == b.text_tokens and a.pcm.tobytes() == b.pcm.tobytes()


@pytest.fixture(scope="module")
def recording(recordings: list[Path]) -> Path:
    return recordings[0]


@pytest.fixture(scope="module")
def plain(tiny_inplace: TinyPaths, recording: Path):
    return stream(load_model(str(tiny_inplace.base), str(tiny_inplace.finetune)), recording)


# -- YaRN: the training code's formulas, re-derived independently --------------------------------


def reference_frequencies(
    dim: int, max_period: float, scale: float, length: int, beta_fast: float, beta_slow: float
) -> list[float]:
    """moshi_in_place's YaRN frequencies in double precision, one scalar at a time."""
    out = []
    for i in range(dim // 2):
        theta = max_period ** (-2 * i / dim)
        wavelength = 2 * math.pi / theta
        ramp = min(1.0, max(0.0, (wavelength - beta_slow * length) / ((beta_fast - beta_slow) * length)))
        out.append(theta * (1 - ramp) + theta / scale * ramp)
    return out


@pytest.mark.parametrize(
    "dim, max_period, scale, length, beta_fast, beta_slow",
    [
        (128, 10_000, 4.0, 3000, 32, 1),  # Moshi 7B heads, the published setting (3000 -> 12000)
        (16, 10_000, 4.0, 25, 32, 1),  # the tiny model's
        (64, 10_000, 2.5, 100, 16, 2),
        (32, 500.0, 8.0, 10, 64, 4),
    ],
)
def test_yarn_frequencies_match_the_training_formula(dim, max_period, scale, length, beta_fast, beta_slow) -> None:
    yarn = YarnConfig(scale=scale, original_max_seq_len=length, beta_fast=beta_fast, beta_slow=beta_slow)
    got = yarn_inverse_frequencies(dim, max_period, yarn)
    expected = reference_frequencies(dim, max_period, scale, length, beta_fast, beta_slow)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=2e-6)
    # The variant's ramp, in wavelengths: below beta_slow*L kept, above beta_fast*L divided by scale.
    plain = [max_period ** (-2 * i / dim) for i in range(dim // 2)]
    for f, p in zip(got.tolist(), plain):
        wavelength = 2 * math.pi / p
        if wavelength <= beta_slow * length:
            assert f == pytest.approx(p, rel=2e-6)
        elif wavelength >= beta_fast * length:
            assert f == pytest.approx(p / scale, rel=2e-6)
        else:
            assert p / scale < f < p


@pytest.mark.parametrize(
    "mscale, mscale_all_dim, expected",
    [
        (1.0, 0.0, 1.0),
        (1.0, 0.707, 1.0),  # the training code skips the factor whenever mscale == 1
        (2.0, 0.0, 0.2 * math.log(4.0) + 1),
        (2.0, 1.0, (0.2 * math.log(4.0) + 1) / (0.1 * math.log(4.0) + 1)),
    ],
)
def test_yarn_attention_factor(mscale: float, mscale_all_dim: float, expected: float) -> None:
    yarn = YarnConfig(scale=4.0, original_max_seq_len=100, mscale=mscale, mscale_all_dim=mscale_all_dim)
    assert yarn_attention_factor(yarn) == pytest.approx(expected, rel=1e-12)


def test_rotation_scales_queries_only_and_matches_complex_rotation() -> None:
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 5, 16
    q, k = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    offset = torch.tensor([7])
    yarn = YarnConfig(scale=4.0, original_max_seq_len=25, mscale=2.0)
    freqs = yarn_inverse_frequencies(D, 10_000, yarn)
    factor = yarn_attention_factor(yarn)
    q_out, k_out = rotate_with_frequencies(q, k, offset, freqs, factor)

    # Reference: pair j of a head is the complex number x[2j] + i x[2j+1], times exp(i t freq_j).
    t = (offset + torch.arange(T)).double()
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), t[:, None] * freqs.double()[None])

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.double().reshape(B, H, T, D // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation).reshape(B, H, T, D)

    torch.testing.assert_close(k_out.double(), rotate(k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_out.double(), factor * rotate(q), rtol=1e-5, atol=1e-5)
    assert factor > 1.1


def test_rotation_with_plain_frequencies_is_moshis_rope() -> None:
    """The same conventions as moshi's `apply_rope` (interleaved and concatenated halves)."""
    from moshi.modules.rope import apply_rope

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 3, 4, 16, generator=gen), torch.randn(1, 3, 4, 16, generator=gen)
    offset = torch.tensor([11])
    plain = yarn_inverse_frequencies(16, 10_000, YarnConfig(scale=1.0, original_max_seq_len=25))
    for interleave in (True, False):
        ours = rotate_with_frequencies(q, k, offset, plain, 1.0, interleave)
        theirs = apply_rope(q, k, offset, 10_000, interleave)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- YaRN: the whole model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_yarn(tiny_root: Path, tiny_inplace: TinyPaths) -> TinyPaths:
    return write_tiny_variant(tiny_root, "inplace", seed=0, yarn=TINY_YARN, name="inplace-yarn")


@pytest.fixture(scope="module")
def yarn_model(tiny_yarn: TinyPaths):
    return load_model(str(tiny_yarn.base), str(tiny_yarn.finetune))


def test_yarn_fine_tune_extends_context_and_scales_rope(yarn_model, recording: Path, plain) -> None:
    lm = yarn_model.lm
    assert yarn_model.context == lm.context == 800  # tiny context 200 * scale 4
    attentions = [layer.self_attn for layer in lm.transformer.layers]
    assert {a.context for a in attentions} == {800}
    assert all(isinstance(a.rope, YarnRotaryEmbedding) and a.rope is lm.transformer.rope for a in attentions)
    torch.testing.assert_close(
        lm.transformer.rope.inv_freq,
        torch.tensor(reference_frequencies(16, 10_000, 4.0, 25, 32, 1), dtype=torch.float32),
        rtol=2e-6,
        atol=0,
    )
    described = yarn_model.describe_lm()
    assert described["context"] == 800 and described["rope_scaling"]["scale"] == 4.0
    result = stream(yarn_model, recording)
    check_counts(result, [1, 3])
    # Same TTT tensors as the plain fixture: only the RoPE differs, and it changes what Moshi says.
    assert not same_stream(result, plain)


def _yarn_copy(tiny_yarn: TinyPaths, root: Path, **changes: tp.Any) -> Path:
    run = shutil.copytree(tiny_yarn.finetune, root / "run")
    edit_json(run / FINETUNE_STEP_DIR / "config.json", lambda d: d["yarn_config"].update(changes))
    return run


def test_yarn_scale_one_is_plain_rope_and_mscale_scales_queries(
    tiny_yarn: TinyPaths, tmp_path: Path, recording: Path, plain, yarn_model
) -> None:
    unit = load_model(str(tiny_yarn.base), str(_yarn_copy(tiny_yarn, tmp_path / "a", scale=1.0)))
    assert unit.context == 200 and not isinstance(unit.lm.transformer.rope, YarnRotaryEmbedding)
    assert same_stream(stream(unit, recording), plain)

    tempered = load_model(str(tiny_yarn.base), str(_yarn_copy(tiny_yarn, tmp_path / "b", mscale=3.0)))
    assert tempered.lm.transformer.rope.attention_factor == pytest.approx(0.3 * math.log(4) + 1)
    assert not same_stream(stream(tempered, recording), stream(yarn_model, recording))


def test_yarn_in_the_base_config_applies_too(tiny_inplace: TinyPaths, tmp_path: Path) -> None:
    base = shutil.copytree(tiny_inplace.base, tmp_path / "base")
    edit_json(base / "config.json", lambda d: d.update(yarn_config=TINY_YARN))
    model = load_model(str(base))
    assert model.context == 800 and isinstance(model.lm.transformer.rope, YarnRotaryEmbedding)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"factor": 4.0}, "'factor' is not supported"),
        ({"scale": None}, "no 'scale'"),
        ({"scale": 0.5}, "'scale' must be >= 1"),
        ({"beta_fast": 1}, "'beta_fast' (1.0) must be > 'beta_slow'"),
        ({"mscale": "big"}, "'mscale' must be a finite number"),
        ({"original_max_seq_len": 12.5}, "'original_max_seq_len' must be a positive integer"),
    ],
)
def test_yarn_settings_we_cannot_honour_are_refused(
    tiny_yarn: TinyPaths, tmp_path: Path, changes: dict, words: str
) -> None:
    run = _yarn_copy(tiny_yarn, tmp_path, **changes)
    with pytest.raises(CheckpointError) as info:
        load_finetune(run, 4)
    assert (
        str(info.value)
        == f"{run / FINETUNE_STEP_DIR / 'config.json'}: yarn_config " + str(info.value).split(": yarn_config ", 1)[1]
    )
    assert words in str(info.value) and "\n" not in str(info.value)


def test_disabled_yarn_is_ignored(tiny_yarn: TinyPaths, tmp_path: Path) -> None:
    assert load_finetune(_yarn_copy(tiny_yarn, tmp_path, enabled=False), 4).yarn is None


# -- LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny_root: Path, tiny_inplace: TinyPaths) -> TinyPaths:
    return write_tiny_variant(tiny_root, "inplace", seed=0, lora=True, name="inplace-lora")


def _merged_by_hand(tiny_lora: TinyPaths, root: Path) -> tuple[Path, Path]:
    """The LoRA fine-tune with its adapters merged by hand: W + scaling * B @ A into the base
    weights (and into the TTT layers' W_target in the fine-tune), adapters dropped. In-Place's
    W^(0) is the base down projection *before* LoRA, so it is saved explicitly as `gating.w_down`."""
    base = shutil.copytree(tiny_lora.base, root / "base")
    run = shutil.copytree(tiny_lora.finetune, root / "run")
    folder = run / FINETUNE_STEP_DIR
    base_state = load_file(str(base / "model.safetensors"))
    tuned = load_file(str(folder / "lora.safetensors"))
    scaling = TINY_LORA["lora_scaling"]
    for key in [k for k in tuned if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        delta = scaling * (tuned.pop(f"{module}.lora_B.weight").float() @ tuned.pop(key).float())
        target = base_state if f"{module}.weight" in base_state else tuned
        target[f"{module}.weight"] = target[f"{module}.weight"].float() + delta
    for layer in (1, 3):
        original = load_file(str(tiny_lora.base / "model.safetensors"))
        tuned[f"transformer.layers.{layer}.gating.w_down"] = original[
            f"transformer.layers.{layer}.gating.linear_out.weight"
        ]
    save_file(base_state, str(base / "model.safetensors"))
    save_file(tuned, str(folder / "lora.safetensors"))
    edit_json(folder / "config.json", lambda d: d.update(lora=False))
    return base, run


def test_lora_fine_tune_equals_adapters_merged_by_hand(
    tiny_lora: TinyPaths, tmp_path: Path, recording: Path, plain
) -> None:
    model = load_model(str(tiny_lora.base), str(tiny_lora.finetune))
    lora = model.finetune.lora
    assert (lora.rank, lora.scaling) == (TINY_LORA["lora_rank"], TINY_LORA["lora_scaling"])
    assert "transformer.layers.1.gating.target_generator.W_target" in lora.modules
    assert not any("lora" in name for name in model.lm.state_dict())  # fused by moshi
    result = stream(model, recording)
    check_counts(result, [1, 3])

    base, run = _merged_by_hand(tiny_lora, tmp_path)
    reference = stream(load_model(str(base), str(run)), recording)
    assert result.text_tokens == reference.text_tokens
    assert result.pcm.tobytes() == reference.pcm.tobytes()
    assert [r.norm_initial for r in result.ttt_layers] == [r.norm_initial for r in reference.ttt_layers]
    assert not same_stream(result, plain)  # the adapters do change the model


def test_lora_only_fine_tune_without_ttt(tiny_lora: TinyPaths, tmp_path: Path) -> None:
    """moshi-finetune without TTT: adapters only, no TTT section anywhere; merged, no TTT layers."""
    run, folder = _lora_copy(tiny_lora, tmp_path)
    edit_json(folder / "config.json", lambda d: d.pop("ttt_config"))
    edit_weights(folder / "lora.safetensors", lambda t: [t.pop(k) for k in list(t) if ".target_generator." in k])
    model = load_model(str(tiny_lora.base), str(run))
    assert model.ttt is None and not model.controller()
    key = "transformer.layers.0.gating.linear_in"
    adapters = load_file(str(folder / "lora.safetensors"))
    base = load_file(str(tiny_lora.base / "model.safetensors"))[f"{key}.weight"]
    expected = base + TINY_LORA["lora_scaling"] * (
        adapters[f"{key}.lora_B.weight"].float() @ adapters[f"{key}.lora_A.weight"].float()
    )
    assert torch.equal(model.lm.state_dict()[f"{key}.weight"], expected)
    lines = _inspect_lines(str(run))
    assert "TTT disabled in this checkpoint" in lines and "config file none (no TTT section)" in lines


def _lora_copy(tiny_lora: TinyPaths, root: Path) -> tuple[Path, Path]:
    run = shutil.copytree(tiny_lora.finetune, root / "run")
    return run, run / FINETUNE_STEP_DIR


def test_lora_mismatches_are_one_line_errors(tiny_lora: TinyPaths, tmp_path: Path) -> None:
    run, folder = _lora_copy(tiny_lora, tmp_path / "rank")
    edit_json(folder / "config.json", lambda d: d.update(lora_rank=16))
    with pytest.raises(CheckpointError, match="rank 4 but config.json says lora_rank 16"):
        load_finetune(run, 4)

    run, folder = _lora_copy(tiny_lora, tmp_path / "off")
    edit_json(folder / "config.json", lambda d: d.update(lora=False))
    with pytest.raises(CheckpointError, match="lora: false"):
        load_finetune(run, 4)

    run, folder = _lora_copy(tiny_lora, tmp_path / "stray")
    stray = "transformer.layers.0.no_such.lora_"
    edit_weights(
        folder / "lora.safetensors",
        lambda t: t.update(
            {
                stray + "A.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
                stray + "B.weight": torch.zeros(64, 4, dtype=torch.bfloat16),
            }
        ),
    )
    with pytest.raises(CheckpointError) as info:
        load_model(str(tiny_lora.base), str(run))
    assert info.value.path == str(folder / "lora.safetensors")
    assert "transformer.layers.0.no_such names no linear layer" in str(info.value)


# -- inspect ---------------------------------------------------------------------------------------


def _inspect_lines(*args: str) -> list[str]:
    from moshi_ttt_cli.app import app

    result = CliRunner().invoke(app, ["inspect", *args])
    assert result.exit_code == 0, result.output
    return [" ".join(line.replace("│", " ").split()) for line in result.stdout.splitlines()]


def test_inspect_describes_yarn_lora_and_step(tiny_yarn: TinyPaths, tiny_lora: TinyPaths) -> None:
    lines = _inspect_lines(str(tiny_yarn.finetune))
    assert "context 800 (extended from 200 by the YaRN scale)" in lines
    assert any(line.startswith("rope scaling YaRN scale 4 (original_max_seq_len 25,") for line in lines)
    assert "step 100" in lines
    lines = _inspect_lines(str(tiny_lora.finetune), "--base", str(tiny_lora.base))
    lora_keys = {
        k: v
        for k, v in load_file(str(tiny_lora.finetune / FINETUNE_STEP_DIR / "lora.safetensors")).items()
        if ".lora_" in k
    }
    count = sum(v.numel() for v in lora_keys.values())
    assert f"LoRA {len(lora_keys) // 2} linears, rank 4, scaling 2.0, {count:,} params" in lines
    assert "context 200" in lines


# -- layout variants --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_steps(tiny_inplace: TinyPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with the fixture's checkpoint_000100 and a checkpoint_000050 with another learning rate."""
    run = shutil.copytree(tiny_inplace.finetune, tmp_path_factory.mktemp("steps") / "run")
    older = run / "checkpoints" / "checkpoint_000050" / "consolidated"
    shutil.copytree(run / FINETUNE_STEP_DIR, older)
    edit_json(older / "config.json", lambda d: d["ttt_config"].update(learning_rate=0.0005))
    return run


@pytest.mark.parametrize("step, lr", [(None, 0.002), (100, 0.002), (50, 0.0005)])
def test_step_picks_the_checkpoint(tiny_inplace: TinyPaths, two_steps: Path, step: int | None, lr: float) -> None:
    finetune = load_finetune(two_steps, 4, step)
    assert finetune.step == (step or 100) and finetune.ttt.learning_rate == lr
    assert finetune.folder == two_steps / "checkpoints" / f"checkpoint_{step or 100:06d}" / "consolidated"


def test_unknown_step_lists_the_steps(
    tiny_inplace: TinyPaths, two_steps: Path, recording: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moshi_ttt_cli.app import app

    monkeypatch.setenv("MOSHI_TTT_DEVICE", "cpu")
    result = CliRunner().invoke(
        app,
        [
            "infer",
            str(recording),
            str(tmp_path / "o.wav"),
            "--base",
            str(tiny_inplace.base),
            "--checkpoint",
            str(two_steps),
            "--step",
            "7",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {two_steps}: no checkpoint for step 7 (steps found: 50, 100)"


def test_cli_step_and_effective_context_in_the_report(
    tiny_yarn: TinyPaths, recording: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moshi_ttt_cli.app import app

    monkeypatch.setenv("MOSHI_TTT_DEVICE", "cpu")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "infer",
            str(recording),
            str(tmp_path / "o.wav"),
            "--base",
            str(tiny_yarn.base),
            "--checkpoint",
            str(tiny_yarn.finetune),
            "--step",
            "100",
            "--report",
            str(report),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    lm = json.loads(report.read_text())["settings"]["lm"]
    assert lm["context"] == 800 and lm["step"] == 100 and lm["rope_scaling"]["scale"] == 4.0


def test_ttt_mlp_args_yaml_instead_of_training_config(tiny_ttt_mlp: TinyPaths, tmp_path: Path, recording: Path) -> None:
    run = shutil.copytree(tiny_ttt_mlp.finetune, tmp_path / "run")
    folder = run / FINETUNE_STEP_DIR
    training = folder / "training_config.json"
    (folder / "args.yaml").write_text(yaml.safe_dump(json.loads(training.read_text())))
    training.unlink()
    model = load_model(str(tiny_ttt_mlp.base), str(run))
    assert model.finetune.config_source == folder / "args.yaml"
    reference = stream(load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune)), recording)
    result = stream(model, recording)
    check_counts(result, [1, 2])
    assert same_stream(result, reference)


def test_bf16_base_weights_give_float32_fast_weights(tiny_inplace: TinyPaths, tmp_path: Path, recording: Path) -> None:
    base = shutil.copytree(tiny_inplace.base, tmp_path / "base")
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(state, str(base / "model.safetensors"))
    model = load_model(str(base), str(tiny_inplace.finetune))
    for layer in (1, 3):
        w_down = model.lm.transformer.layers[layer].gating.w_down
        assert w_down.dtype == torch.float32
        assert torch.equal(w_down, state[f"transformer.layers.{layer}.gating.linear_out.weight"].float())
    check_counts(stream(model, recording), [1, 3])
