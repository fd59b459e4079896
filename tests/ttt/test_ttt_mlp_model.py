"""TTT-MLP at whole-model level, on the tiny TTT-MLP checkpoint (moshi-finetune layout).

The layer is x1 = self-attention block (with residual), x2 = x1 + tanh(alpha) * TTT(x1), then
Moshi's feed-forward block on x2. Checked here through `load_model` + the LM and the runner:
parallel == streaming, alpha = 0 == plain Moshi, per-file reset, runner-driven update counts,
the `training_config.json` layout defaults and layer strings, and the attention contexts.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import edit_json, stream_lm
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.checkpoints.tiny import FINETUNE_STEP_DIR, TinyPaths
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt.ttt.base import FastWeightModule, TTTController
from moshi_ttt.ttt.mlp import TTTMLP, TTTMLPTransformerLayer

torch.set_num_threads(1)

C = 8  # mini_batch_size of the tiny TTT-MLP checkpoint
NAMES = ("W1", "b1", "W2", "b2")
PREFIX = "transformer.layers.{}.seq_modeling_block."


# -- helpers ------------------------------------------------------------------------------------


def ttt_modules(lm: torch.nn.Module) -> list[TTTMLP]:
    return sorted((m for m in lm.modules() if isinstance(m, TTTMLP)), key=lambda m: m.layer_index)


def token_sequence(lm, length: int, seed: int) -> torch.Tensor:
    """[1, K, T] valid input ids: text < text_card, audio < card."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.text_card, (1, 1, length), generator=gen)
    audio = torch.randint(0, lm.card, (1, lm.num_audio_codebooks, length), generator=gen)
    return torch.cat([text, audio], dim=1)


@torch.no_grad()
def parallel(lm, seq: torch.Tensor) -> torch.Tensor:
    return lm.forward_text(seq)[0]


def copy_run(paths: TinyPaths, dest: Path) -> Path:
    """Copy the TTT-MLP run folder; return its consolidated folder (to edit)."""
    shutil.copytree(paths.finetune, dest)
    return dest / FINETUNE_STEP_DIR


def retarget_layers(weights: Path, sources: dict[int, int]) -> None:
    """Rewrite the TTT tensors so that layer `new` carries the tensors of layer `sources[new]`."""
    tensors = load_file(str(weights))
    out = {k: v for k, v in tensors.items() if ".seq_modeling_block." not in k}
    for new, src in sources.items():
        for key, value in tensors.items():
            if key.startswith(PREFIX.format(src)):
                out[PREFIX.format(new) + key[len(PREFIX.format(src)) :]] = value.clone()
    save_file(out, str(weights))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_model(tiny_ttt_mlp: TinyPaths):
    return load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune))


@pytest.fixture(scope="module")
def base_model(tiny_ttt_mlp: TinyPaths):
    return load_model(str(tiny_ttt_mlp.base))


@pytest.fixture(scope="module")
def file_weights(tiny_ttt_mlp: TinyPaths) -> dict[str, torch.Tensor]:
    """The checkpoint's TTT tensors as float32 (saved in bf16)."""
    path = tiny_ttt_mlp.finetune / FINETUNE_STEP_DIR / "lora.safetensors"
    return {k: v.float() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def runs(mlp_model, recordings, file_weights):
    """Runner over A, B, C, then A again. During each stream, per frame and per layer: the largest
    difference of state.initial from the file's tensors, and of state.fast from state.initial."""
    runner = StreamingRunner(mlp_model)
    modules = ttt_modules(mlp_model.lm)
    results, traces = [], []
    for path in [*recordings, recordings[0]]:
        trace: list[dict[int, tuple[float, float]]] = []

        def progress(done: int, total: int, trace: list = trace) -> None:
            row = {}
            for m in modules:
                state = m._streaming_state
                prefix = PREFIX.format(m.layer_index) + "ttt_layer.ttt."
                init_err = max(float((state.initial[n] - file_weights[prefix + n]).abs().max()) for n in NAMES)
                moved = max(float((state.fast[n] - state.initial[n]).abs().max()) for n in NAMES)
                row[m.layer_index] = (init_err, moved)
            trace.append(row)

        results.append(runner.run(read_audio(path), progress=progress))
        traces.append(trace)
    return results, traces


# -- 1. parallel == streaming over the whole model -----------------------------------------------


@pytest.mark.parametrize("length", [21, 27])
def test_whole_model_parallel_matches_streaming(mlp_model, base_model, length: int) -> None:
    assert length % C != 0
    lm = mlp_model.lm
    modules = ttt_modules(lm)
    assert [m.layer_index for m in modules] == [1, 2]
    seq = token_sequence(lm, length, seed=length)

    out_parallel = parallel(lm, seq)
    final_parallel = {m.layer_index: {k: v[0].clone() for k, v in m.last_parallel_state.items()} for m in modules}
    final_stream: dict[int, dict[str, torch.Tensor]] = {}
    reports = {}

    def grab(lm_) -> None:
        for m in modules:
            final_stream[m.layer_index] = {k: v[0].clone() for k, v in m._streaming_state.fast.items()}
            reports[m.layer_index] = m.report()

    out_stream, _ = stream_lm(lm, seq, inspect=grab)

    assert out_stream.shape == out_parallel.shape == (1, length, lm.dim)
    torch.testing.assert_close(out_stream, out_parallel, atol=1e-5, rtol=0)
    for m in modules:
        for name in NAMES:
            torch.testing.assert_close(
                final_stream[m.layer_index][name], final_parallel[m.layer_index][name], atol=1e-5, rtol=0
            )
        report = reports[m.layer_index]
        assert (report.tokens, report.updates, report.pending_tokens) == (length, math.ceil(length / C), 0)
        # Not vacuous: the fast weights really moved, and the TTT branch changes the model's output.
        assert report.drift > 1e-3
    assert (out_parallel - parallel(base_model.lm, seq)).abs().max() > 1e-3


# -- 2. alpha = 0 is exactly plain Moshi ---------------------------------------------------------


@pytest.fixture(scope="module")
def zero_alpha_model(tiny_ttt_mlp: TinyPaths):
    model = load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune))
    gates = [p for n, p in model.lm.named_parameters() if n.endswith("gating_alpha")]
    assert [n.split(".")[2] for n, _ in model.lm.named_parameters() if n.endswith("gating_alpha")] == ["1", "2"]
    assert all(".forward_ssm_gating." in n for n, _ in model.lm.named_parameters() if n.endswith("gating_alpha"))
    assert all(bool((g != 0).all()) for g in gates)
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    return model


def test_zero_alpha_forward_is_plain_moshi(zero_alpha_model, base_model) -> None:
    seq = token_sequence(base_model.lm, 21, seed=5)
    assert torch.equal(parallel(zero_alpha_model.lm, seq), parallel(base_model.lm, seq))

    drifts = []
    out_zero, _ = stream_lm(
        zero_alpha_model.lm, seq, inspect=lambda lm: drifts.extend(r.drift for r in TTTController(lm).reports())
    )
    assert torch.equal(out_zero, stream_lm(base_model.lm, seq)[0])
    # The TTT layers did run and adapt; only their contribution was gated off.
    assert len(drifts) == 2 and min(drifts) > 0


def test_zero_alpha_runner_audio_is_plain_moshi(zero_alpha_model, base_model, recordings) -> None:
    pcm = read_audio(recordings[0])
    ttt = StreamingRunner(zero_alpha_model, seed=7).run(pcm)
    plain = StreamingRunner(base_model, seed=7).run(pcm)
    assert plain.pcm.size > 0
    assert np.array_equal(ttt.pcm, plain.pcm)
    assert ttt.text_tokens == plain.text_tokens
    assert [r.layer for r in ttt.ttt_layers] == [1, 2] and plain.ttt_layers == []


# -- 3. per-file reset ---------------------------------------------------------------------------


def test_reset_between_files_reproduces_first_file(runs) -> None:
    results, _ = runs
    first, again = results[0], results[-1]
    assert np.array_equal(first.pcm, again.pcm)
    assert first.text_tokens == again.text_tokens
    assert first.ttt_layers == again.ttt_layers  # dataclass equality: every count and norm
    # Not vacuous: files differ, so an unreset state would have carried B's (and C's) adaptation.
    assert first.ttt_layers != results[1].ttt_layers
    assert not np.array_equal(first.pcm[: results[1].pcm.size], results[1].pcm[: first.pcm.size])


def test_stream_initial_is_the_checkpoint_weights(runs, mlp_model, file_weights) -> None:
    _, traces = runs
    for trace in traces:
        assert trace
        for row in trace:
            assert set(row) == {1, 2}
            for init_err, _ in row.values():
                assert init_err == 0.0  # bf16 -> float32 is exact
        # The fast weights moved away from `initial` (so `initial` staying put is meaningful).
        assert all(moved > 0 for moved in (v[1] for v in trace[-1].values()))
    # ... and the module's parameters still hold the loaded values after all the streaming.
    for m in ttt_modules(mlp_model.lm):
        prefix = PREFIX.format(m.layer_index) + "ttt_layer.ttt."
        for name in NAMES:
            assert torch.equal(getattr(m, name).detach(), file_weights[prefix + name])


# -- 4. runner-driven updates --------------------------------------------------------------------


def test_runner_counts_updates(runs, recordings) -> None:
    results, _ = runs
    for result, path in zip(results, [*recordings, recordings[0]]):
        assert result.steps == result.frames + 1  # first frame stepped twice
        assert result.frames == read_audio(path).shape[0] // 1920
        assert [r.layer for r in result.ttt_layers] == [1, 2]
        for report in result.ttt_layers:
            assert report.tokens == result.steps
            assert report.updates == math.ceil(result.steps / C)
            assert report.pending_tokens == 0
            assert report.drift > 0 and report.norm_final != report.norm_initial


def test_runner_without_ttt_never_updates(tiny_ttt_mlp: TinyPaths, recordings) -> None:
    model = load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune))
    runner = StreamingRunner(model, ttt_enabled=False)
    for path in recordings:
        result = runner.run(read_audio(path))
        assert len(result.ttt_layers) == 2
        for report in result.ttt_layers:
            assert report.tokens == result.steps
            assert report.updates == 0 and report.pending_tokens == 0
            assert report.drift == 0.0 and report.norm_final == report.norm_initial


# -- 5. training_config.json layout: output projection default and layer strings -------------------


def _perturb_output_proj(lm) -> None:
    with torch.no_grad():
        for m in ttt_modules(lm):
            m.wo.weight.add_(0.5)
            m.wo.bias.add_(0.5)
            m.post_norm.weight.mul_(3.0)
            m.post_norm.bias.add_(1.0)


def test_training_config_layout_does_not_apply_output_proj(tiny_ttt_mlp: TinyPaths) -> None:
    model = load_model(str(tiny_ttt_mlp.base), str(tiny_ttt_mlp.finetune))
    assert model.ttt.apply_output_proj is False
    assert model.finetune.config_source.name == "training_config.json"
    seq = token_sequence(model.lm, 13, seed=1)
    before = parallel(model.lm, seq)
    _perturb_output_proj(model.lm)
    assert torch.equal(parallel(model.lm, seq), before)


@pytest.mark.parametrize("where", ["training_config.json", "config.json"])
def test_output_proj_applied_when_asked(tiny_ttt_mlp: TinyPaths, tmp_path: Path, where: str) -> None:
    """Explicit `apply_output_proj: true` in training_config.json, or our own `ttt` section in
    config.json (whose default is True): wo/post_norm change the output."""
    folder = copy_run(tiny_ttt_mlp, tmp_path / "run")
    training = json.loads((folder / "training_config.json").read_text())
    section = dict(training["ttt"])
    if where == "config.json":
        (folder / "training_config.json").unlink()
        edit_json(folder / "config.json", lambda d: d.__setitem__("ttt", {**section, "variant": "ttt-mlp"}))
    else:
        edit_json(folder / "training_config.json", lambda d: d["ttt"].__setitem__("apply_output_proj", True))
    model = load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert model.ttt.apply_output_proj is True
    assert model.finetune.config_source.name == where
    seq = token_sequence(model.lm, 13, seed=1)
    before = parallel(model.lm, seq)
    _perturb_output_proj(model.lm)
    assert (parallel(model.lm, seq) - before).abs().max() > 1e-4


@pytest.mark.parametrize(
    "spec, layers, sources",
    [
        ("1,3", [1, 3], {1: 1, 3: 2}),
        (" 3 , 0 ", [0, 3], {0: 1, 3: 2}),
        ("all", [0, 1, 2, 3], {0: 1, 1: 1, 2: 2, 3: 2}),
        ("ALL", [0, 1, 2, 3], {0: 1, 1: 1, 2: 2, 3: 2}),
        ("middle", [1, 2], {1: 1, 2: 2}),
    ],
)
def test_layer_strings(
    tiny_ttt_mlp: TinyPaths, base_model, tmp_path: Path, spec: str, layers: list[int], sources: dict[int, int]
) -> None:
    folder = copy_run(tiny_ttt_mlp, tmp_path / "run")
    edit_json(folder / "training_config.json", lambda d: d["ttt"].__setitem__("layers", spec))
    retarget_layers(folder / "lora.safetensors", sources)
    model = load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert model.ttt.layers == layers
    assert [m.layer_index for m in TTTController(model.lm).layers] == layers
    kinds = [isinstance(layer, TTTMLPTransformerLayer) for layer in model.lm.transformer.layers]
    assert kinds == [i in layers for i in range(4)]
    # The tensors went to the layers they were saved for.
    saved = load_file(str(folder / "lora.safetensors"))
    for i in layers:
        module = model.lm.transformer.layers[i].seq_modeling_block.ttt
        assert torch.equal(module.W1.detach(), saved[PREFIX.format(i) + "ttt_layer.ttt.W1"].float())
    seq = token_sequence(model.lm, 11, seed=2)
    assert (parallel(model.lm, seq) - parallel(base_model.lm, seq)).abs().max() > 1e-4


def test_disabled_ttt_is_plain_moshi_and_no_layer_while_enabled_is_an_error(
    tiny_ttt_mlp: TinyPaths, base_model, tmp_path: Path
) -> None:
    from moshi_ttt.errors import CheckpointError

    folder = copy_run(tiny_ttt_mlp, tmp_path / "run")
    edit_json(folder / "training_config.json", lambda d: d["ttt"].__setitem__("enable", False))
    model = load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert model.ttt is None
    assert not any(isinstance(m, FastWeightModule) for m in model.lm.modules())
    seq = token_sequence(model.lm, 11, seed=3)
    assert torch.equal(parallel(model.lm, seq), parallel(base_model.lm, seq))
    # Enabled but naming no layer would silently ignore the fine-tune's weights.
    edit_json(folder / "training_config.json", lambda d: d["ttt"].update(enable=True, layers="none"))
    with pytest.raises(CheckpointError, match="picks no layer") as info:
        load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert "training_config.json" in str(info.value)


def test_layer_string_out_of_range_names_config(tiny_ttt_mlp: TinyPaths, tmp_path: Path) -> None:
    from moshi_ttt.errors import CheckpointError

    folder = copy_run(tiny_ttt_mlp, tmp_path / "run")
    edit_json(folder / "training_config.json", lambda d: d["ttt"].__setitem__("layers", "29,30,31"))
    with pytest.raises(CheckpointError) as info:
        load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert str(folder / "training_config.json") in str(info.value)
    assert "[29, 30, 31]" in str(info.value)


# -- 6. attention contexts -----------------------------------------------------------------------


def test_layer_contexts(tiny_ttt_mlp: TinyPaths, mlp_model, tmp_path: Path) -> None:
    folder = copy_run(tiny_ttt_mlp, tmp_path / "run")

    def set_contexts(d: dict) -> None:
        d["ttt"]["ttt_layer_context"] = 3
        d["ttt"]["non_ttt_layer_context"] = 5

    edit_json(folder / "training_config.json", set_contexts)
    model = load_model(str(tiny_ttt_mlp.base), str(tmp_path / "run"))
    assert (model.ttt.ttt_layer_context, model.ttt.non_ttt_layer_context) == (3, 5)
    assert [layer.self_attn.context for layer in model.lm.transformer.layers] == [5, 3, 3, 5]
    # The default model keeps the base config's context everywhere; the depformer is untouched.
    base_context = json.loads((tiny_ttt_mlp.base / "config.json").read_text())["context"]
    assert [layer.self_attn.context for layer in mlp_model.lm.transformer.layers] == [base_context] * 4
    assert [layer.self_attn.context for layer in model.lm.depformer.layers] == [
        layer.self_attn.context for layer in mlp_model.lm.depformer.layers
    ]

    # The shorter contexts take effect (T > contexts) and streaming still matches parallel.
    seq = token_sequence(model.lm, 21, seed=4)
    out = parallel(model.lm, seq)
    assert (out - parallel(mlp_model.lm, seq)).abs().max() > 1e-4
    torch.testing.assert_close(stream_lm(model.lm, seq)[0], out, atol=1e-5, rtol=0)
