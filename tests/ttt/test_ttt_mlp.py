"""TTT-MLP layer: analytic gradients, dual form vs a naive reference, streaming vs parallel,
identity at alpha = 0, reset, frozen mode, and misuse of the streaming contract."""

from __future__ import annotations

import math
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest
import torch
import torch.nn.functional as F
from moshi.modules.rope import RotaryEmbedding
from moshi.modules.transformer import StreamingTransformerLayer

from helpers.streams import StreamRun, assert_same_run, assert_same_snapshot, run_streams, span, stream_snapshot
from moshi_ttt.errors import StreamingError
from moshi_ttt.ttt.mlp import (
    TTTMLP,
    TTTMLPBlock,
    TTTMLPConfig,
    attach_ttt_mlp,
    audio_rope_frequencies,
    gelu_tanh,
    gelu_tanh_grad,
    ln_l2_backward,
    reconstruction_target,
)

torch.set_num_threads(1)

D, H, C = 16, 2, 4
HD = D // H
BASE_LR = 1.0
NAMES = ("W1", "b1", "W2", "b2")


def make_module(seed: int = 0, apply_output_proj: bool = True) -> TTTMLP:
    torch.manual_seed(seed)
    module = TTTMLP(D, H, layer_index=3, mini_batch_size=C, base_lr=BASE_LR, apply_output_proj=apply_output_proj)
    # Larger-than-init weights and a non-trivial LN/lr so every term of the update matters.
    with torch.no_grad():
        module.W1.normal_(0, 0.5)
        module.W2.normal_(0, 0.5)
        module.b1.normal_(0, 0.1)
        module.b2.normal_(0, 0.1)
        module.ttt_norm_weight.uniform_(0.5, 1.5)
        module.ttt_norm_bias.normal_(0, 0.1)
        module.learnable_ttt_lr_weight.normal_(0, 0.3)
        module.learnable_ttt_lr_bias.normal_(0, 0.3)
    return module


def loaded_weights(module: TTTMLP) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name).detach().clone() for name in NAMES}


def stream(module: TTTMLP, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """Feed x [1, T, D] token by token; returns outputs, final fast weights, updates, pending."""
    outs = []
    for t in range(x.shape[1]):
        outs.append(module(x[:, t : t + 1]))
        module.after_token()
    module.flush()
    state = module._streaming_state
    report = module.report()
    return (
        torch.cat(outs, dim=1),
        {k: v[0].clone() for k, v in state.fast.items()},
        report.updates,
        report.pending_tokens,
    )


# -- naive reference: autograd per token, explicit corrected weights -----------------------------


def _ln(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The training ops' `ln_fwd`: biased variance, eps 1e-8 inside the square root."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).square().mean(-1, keepdim=True)
    return gamma * (z - mu) / torch.sqrt(var + 1e-8) + beta


def _target(v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The training code's `ln_reconstruction_target` followed by its ops' `XV - XK`."""
    d = v - k
    n = d.shape[-1]
    mu = d.mean(-1, keepdim=True)
    std = torch.sqrt((d - mu).square().sum(-1, keepdim=True) / (n - 1))  # unbiased
    return (gamma * (d - mu) / (std + 1e-5) + beta + k) - k


def _f(w: dict[str, torch.Tensor], h: int, x: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(x @ w["W1"][h] + w["b1"][h, 0]) @ w["W2"][h] + w["b2"][h, 0]


def _qkv(p: dict[str, torch.Tensor], xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's Q, K (L2-normalised) and V, [T, H, HD]."""
    t_len = xb.shape[0]
    q = F.normalize(F.linear(xb, p["wq.weight"], p["wq.bias"]).view(t_len, H, HD), dim=-1)
    k = F.normalize(F.linear(xb, p["wk.weight"], p["wk.bias"]).view(t_len, H, HD), dim=-1)
    return q, k, F.linear(xb, p["wv.weight"], p["wv.bias"]).view(t_len, H, HD)


def reference(
    module: TTTMLP, x: torch.Tensor, frozen: bool = False
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The slow obvious way, one batch element and head at a time."""
    p = {n: t.detach() for n, t in module.named_parameters()}
    b_size, t_len, _ = x.shape
    outputs = torch.zeros(b_size, t_len, D)
    finals = []
    for b in range(b_size):
        xb = x[b]
        q, k, v = _qkv(p, xb)
        w = {n: p[n].clone() for n in NAMES}
        head_out = torch.zeros(t_len, H, HD)
        for h in range(H):
            gamma, beta = p["ttt_norm_weight"][h], p["ttt_norm_bias"][h]
            for start in range(0, t_len, C):
                grads_so_far = {n: torch.zeros_like(w[n][h]) for n in NAMES}
                for t in range(start, min(start + C, t_len)):
                    logit = p["learnable_ttt_lr_weight"][h, 0] @ xb[t] + p["learnable_ttt_lr_bias"][h, 0]
                    eta = BASE_LR * torch.sigmoid(logit) / (HD * C)
                    start_w = {n: w[n].clone().requires_grad_(True) for n in NAMES}
                    target = _target(v[t, h], k[t, h], gamma, beta)
                    loss = 0.5 * (_ln(_f(start_w, h, k[t, h]), gamma, beta) - target).square().sum()
                    grads = torch.autograd.grad(loss, [start_w[n] for n in NAMES])
                    for n, g in zip(NAMES, grads):
                        grads_so_far[n] += eta * g[h]
                    corrected = {n: w[n].clone() for n in NAMES}
                    if not frozen:
                        for n in NAMES:
                            corrected[n][h] -= grads_so_far[n]
                    head_out[t, h] = q[t, h] + _ln(_f(corrected, h, q[t, h]), gamma, beta)
                if not frozen:
                    for n in NAMES:
                        w[n][h] -= grads_so_far[n]
        out = head_out.reshape(t_len, D)
        if module.apply_output_proj:
            out = F.linear(
                F.layer_norm(out, (D,), p["post_norm.weight"], p["post_norm.bias"], 1e-6), p["wo.weight"], p["wo.bias"]
            )
        outputs[b] = out
        finals.append(w)
    return outputs, finals


# -- 1. analytic derivatives -------------------------------------------------------------------


def test_gelu_tanh_grad_matches_autograd() -> None:
    x = torch.linspace(-6, 6, 401, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_grad(x.detach()), grad, rtol=1e-10, atol=1e-12)


def test_ln_l2_backward_matches_autograd() -> None:
    torch.manual_seed(1)
    z = (torch.randn(3, H, 5, HD, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    target = torch.randn(3, H, 5, HD, dtype=torch.float64)
    gamma = torch.rand(H, HD, dtype=torch.float64) + 0.5
    beta = torch.randn(H, HD, dtype=torch.float64)
    y = F.layer_norm(z, (HD,), eps=1e-8) * gamma[:, None] + beta[:, None]  # the training ops' eps
    (grad,) = torch.autograd.grad(0.5 * (y - target).square().sum(), z)
    torch.testing.assert_close(ln_l2_backward(z.detach(), target, gamma, beta), grad, rtol=1e-9, atol=1e-10)


# -- 2. parallel dual form vs naive ------------------------------------------------------------


@pytest.mark.parametrize("t_len", [11, 13, 8])
@pytest.mark.parametrize("apply_output_proj", [True, False])
def test_parallel_matches_naive_reference(t_len: int, apply_output_proj: bool) -> None:
    module = make_module(seed=t_len, apply_output_proj=apply_output_proj)
    x = torch.randn(2, t_len, D)
    with torch.no_grad():
        out = module(x)
    ref_out, ref_finals = reference(module, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    for b, final in enumerate(ref_finals):
        for n in NAMES:
            torch.testing.assert_close(module.last_parallel_state[n][b], final[n], rtol=0, atol=1e-5)
    # The weights must actually have moved, or the comparison above proves little.
    assert (module.last_parallel_state["W1"][0] - module.W1).abs().max() > 1e-4


def test_partial_last_minibatch_is_not_padded() -> None:
    """The state after 9 tokens with C=4 is the state after 8 tokens plus a 1-token step."""
    module = make_module(seed=5)
    x = torch.randn(1, 9, D)
    with torch.no_grad():
        module(x[:, :8])
        after_8 = {n: w.clone() for n, w in module.last_parallel_state.items()}
        module(x)
        after_9 = module.last_parallel_state
    assert not torch.equal(after_8["W1"], after_9["W1"])
    _, finals = reference(module, x)
    torch.testing.assert_close(after_9["b2"][0], finals[0]["b2"], rtol=0, atol=1e-5)


# -- 3. streaming vs parallel --------------------------------------------------------------------


@pytest.mark.parametrize("t_len", [11, 6])
def test_streaming_matches_parallel(t_len: int) -> None:
    module = make_module(seed=7)
    x = torch.randn(1, t_len, D)
    with torch.no_grad():
        parallel = module(x)
        with module.streaming(1):
            streamed, fast, updates, pending = stream(module, x)
    torch.testing.assert_close(streamed, parallel, rtol=0, atol=1e-5)
    for n in NAMES:
        torch.testing.assert_close(fast[n], module.last_parallel_state[n][0], rtol=0, atol=1e-5)
    assert updates == math.ceil(t_len / C)
    assert pending == 0


def reference_inner_loss(module: TTTMLP, x: torch.Tensor, w: dict[str, torch.Tensor], start: int, stop: int) -> float:
    """0.5 * mean over heads h and tokens t in [start, stop) of ||LN(f_h(k_th)) - target_th||^2
    at weights `w`, one head and token at a time (no autograd, none of the module's helpers)."""
    p = {n: t.detach() for n, t in module.named_parameters()}
    _, k, v = _qkv(p, x[0])
    losses = []
    for h in range(H):
        gamma, beta = p["ttt_norm_weight"][h], p["ttt_norm_bias"][h]
        for t in range(start, stop):
            residual = _ln(_f(w, h, k[t, h]), gamma, beta) - _target(v[t, h], k[t, h], gamma, beta)
            losses.append(0.5 * float(residual.square().sum()))
    return sum(losses) / len(losses)


def joint_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b||_F over all fast weights together."""
    return math.sqrt(sum(float((a[n] - b[n]).double().square().sum()) for n in NAMES))


def test_timeline_replays_the_inner_steps() -> None:
    """Each mini-batch's record matches the naive per-token reference: where it was applied, the
    step's norm, the running drift, and the inner loss at W0, the start and updated weights; the
    inner model learns (loss after < before); totals agree; outputs are bit-identical."""
    module = make_module(seed=5)
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        with module.streaming(1):
            plain, plain_fast, _, _ = stream(module, x)
            assert module.report().timeline is None
        module.record_timeline = True
        with module.streaming(1):
            out, fast, _, _ = stream(module, x)
            report = module.report()
    assert torch.equal(out, plain)
    assert all(torch.equal(fast[n], plain_fast[n]) for n in NAMES)
    ends = [4, 8, 10]
    weights = [loaded_weights(module)] + [reference(module, x[:, :end])[1][0] for end in ends]
    timeline = report.timeline
    assert len(timeline) == report.updates == 3
    assert [(r.token, r.tokens) for r in timeline] == [(4, 4), (8, 4), (10, 2)]
    for i, (record, start, stop) in enumerate(zip(timeline, [0, 4, 8], ends)):
        assert record.update_norm == pytest.approx(joint_norm(weights[i + 1], weights[i]), rel=1e-4)
        assert record.drift == pytest.approx(joint_norm(weights[i + 1], weights[0]), rel=1e-4)
        assert record.loss_before == pytest.approx(reference_inner_loss(module, x, weights[i], start, stop), rel=1e-5)
        assert record.loss_after == pytest.approx(
            reference_inner_loss(module, x, weights[i + 1], start, stop), rel=1e-5
        )
        assert record.loss_after < record.loss_before
        # The TTT paper's third curve: the same mini-batch under the checkpoint's weights W0.
        assert record.loss_initial == pytest.approx(reference_inner_loss(module, x, weights[0], start, stop), rel=1e-5)
        assert not record.clipped and record.update_norm_unclipped is None
    assert report.clipped_updates == 0
    assert timeline[-1].drift == pytest.approx(report.drift, rel=1e-9)


# -- 4. streaming misuse -------------------------------------------------------------------------


def test_forward_without_after_token_raises_streaming_error() -> None:
    module = make_module()
    x = torch.randn(1, 1, D)
    with torch.no_grad(), module.streaming(1):
        with pytest.raises(StreamingError, match="after_step"):
            for _ in range(2 * C):
                module(x)


def test_multi_token_streaming_step_raises() -> None:
    module = make_module()
    with torch.no_grad(), module.streaming(1), pytest.raises(StreamingError):
        module(torch.randn(1, 2, D))


# -- 5. alpha = 0 is the identity ---------------------------------------------------------------


def _moshi_layer() -> StreamingTransformerLayer:
    torch.manual_seed(11)
    return StreamingTransformerLayer(
        d_model=D,
        num_heads=H,
        dim_feedforward=32,
        causal=True,
        context=16,
        rope=RotaryEmbedding(interleave=True),
        norm="rms_norm_f32",
        gating="silu",
    )


def test_zero_alpha_block_is_identity() -> None:
    config = TTTMLPConfig(layers=[0], mini_batch_size=C, base_lr=BASE_LR, initial_gating_alpha=0.0)
    block = TTTMLPBlock(D, H, 0, config)
    x = torch.randn(1, 7, D)
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_zero_alpha_layer_equals_plain_moshi_layer() -> None:
    layer = _moshi_layer()
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        plain = layer(x)
        with layer.streaming(1):
            plain_steps = torch.cat([layer(x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)

        config = TTTMLPConfig(layers=[0], mini_batch_size=C, base_lr=BASE_LR, initial_gating_alpha=0.0)
        block = attach_ttt_mlp(layer, 0, config)
        assert isinstance(layer, StreamingTransformerLayer)
        assert "seq_modeling_block.ttt_layer.ttt.W1" in layer.state_dict()
        assert "seq_modeling_block.forward_ssm_gating.gating_alpha" in layer.state_dict()
        assert torch.equal(layer(x), plain)
        with layer.streaming(1):
            steps = []
            for t in range(x.shape[1]):
                steps.append(layer(x[:, t : t + 1]))
                block.ttt.after_token()
            block.ttt.flush()
            assert block.ttt.report().updates == math.ceil(x.shape[1] / C)
        assert torch.equal(torch.cat(steps, dim=1), plain_steps)

        # With a non-zero gate the TTT branch really runs inside the layer.
        block.forward_ssm_gating.gating_alpha.fill_(0.5)
        assert not torch.allclose(layer(x), plain)


def test_attach_loads_checkpoint_keys_and_sets_context() -> None:
    layer = _moshi_layer()
    config = TTTMLPConfig(layers=[2], mini_batch_size=C, base_lr=BASE_LR, ttt_layer_context=8)
    attach_ttt_mlp(layer, 2, config)
    assert layer.self_attn.context == 8
    source = make_module(seed=3)
    prefix = "seq_modeling_block.ttt_layer.ttt."
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state["seq_modeling_block.forward_ssm_gating.gating_alpha"] = torch.full((D,), 0.3)
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(not key.startswith("seq_modeling_block") for key in missing)
    assert torch.equal(layer.seq_modeling_block.ttt.W1, source.W1)


def test_audio_rope_frequencies_follow_the_training_formula() -> None:
    for head_dim, theta in ((8, 10000.0), (64, 10000.0), (16, 500.0)):
        expected = [
            (1.0 / theta ** (2 * i / head_dim)) * (0.5 + 1.5 * math.exp(-2 * i / (2 * head_dim)))
            for i in range(head_dim // 2)
        ]
        torch.testing.assert_close(
            audio_rope_frequencies(head_dim, theta), torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0
        )


def test_rope_streaming_equals_parallel_and_changes_the_output() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 11, D)
    plain = make_module(seed=7)
    roped = TTTMLP(D, H, layer_index=3, mini_batch_size=C, base_lr=BASE_LR, use_rope=True)
    roped.load_state_dict(plain.state_dict())  # RoPE adds no checkpoint tensor
    with torch.no_grad():
        parallel = roped(x)
        with roped.streaming(1):
            streamed, fast, _, _ = stream(roped, x)
        assert not torch.allclose(parallel, plain(x), atol=1e-3)
    torch.testing.assert_close(streamed, parallel, rtol=0, atol=1e-5)
    for n in NAMES:
        torch.testing.assert_close(fast[n], roped.last_parallel_state[n][0], rtol=0, atol=1e-5)


# -- 6. reset -----------------------------------------------------------------------------------


def test_reset_restores_loaded_weights_and_outputs() -> None:
    module = make_module(seed=9)
    loaded = loaded_weights(module)
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        with module.streaming(1):
            first, fast, _, _ = stream(module, x)
            assert not torch.equal(fast["W1"], loaded["W1"])
            module.reset_streaming()
            state = module._streaming_state
            for n in NAMES:
                assert torch.equal(state.fast[n][0], loaded[n])
            counters = state.streams[0]
            assert counters.tokens == counters.pending == counters.updates == 0
            second, _, _, _ = stream(module, x)
        with module.streaming(1):
            for n in NAMES:
                assert torch.equal(module._streaming_state.fast[n][0], loaded[n])
            third, _, _, _ = stream(module, x)
    assert torch.equal(first, second)
    assert torch.equal(first, third)
    for n in NAMES:
        assert torch.equal(getattr(module, n), loaded[n])  # parameters are never written


def test_reset_mid_minibatch_discards_running_sums() -> None:
    module = make_module(seed=10)
    x = torch.randn(1, 6, D)
    with torch.no_grad(), module.streaming(1):
        for t in range(3):  # stop inside a mini-batch, before any commit
            module(x[:, t : t + 1])
            module.after_token()
        module.reset_streaming()
        again, _, _, _ = stream(module, x)
        module.reset_streaming()
        clean, _, _, _ = stream(module, x)
    assert torch.equal(again, clean)


# -- 7. frozen ----------------------------------------------------------------------------------


def test_frozen_uses_loaded_weights_without_correction() -> None:
    module = make_module(seed=12)
    module.frozen = True
    loaded = loaded_weights(module)
    x = torch.randn(1, 9, D)
    ref_out, ref_finals = reference(module, x, frozen=True)
    with torch.no_grad():
        parallel = module(x)
        with module.streaming(1):
            streamed, fast, updates, _ = stream(module, x)
    torch.testing.assert_close(parallel, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(streamed, ref_out, rtol=0, atol=1e-5)
    assert updates == 0
    for n in NAMES:
        assert torch.equal(fast[n], loaded[n])
        assert torch.equal(module.last_parallel_state[n][0], loaded[n])
        assert torch.equal(ref_finals[0][n], loaded[n])
    # Not just the unfrozen result in disguise.
    module.frozen = False
    with torch.no_grad():
        assert not torch.allclose(module(x), parallel, atol=1e-4)


# -- 8. several streams at once (multi-slot runner) ------------------------------------------------


def alone(module: TTTMLP, x: torch.Tensor) -> StreamRun:
    with module.streaming(1):
        out, fast, _, _ = stream(module, x)
        return StreamRun(out, fast, module.report())


def parallel_run(module: TTTMLP, x: torch.Tensor) -> StreamRun:
    out = module(x)
    return StreamRun(out, {k: v[0] for k, v in module.last_parallel_state.items()})


def roped_module(seed: int) -> TTTMLP:
    module = TTTMLP(D, H, layer_index=3, mini_batch_size=C, base_lr=BASE_LR, use_rope=True)
    module.load_state_dict(make_module(seed=seed).state_dict())
    return module


@pytest.mark.parametrize("rope", [False, True])
def test_streams_of_different_lengths_each_run_as_if_alone(rope: bool) -> None:
    """3 streams of 5, 11 and 16 tokens, starting at different steps, masked before they start
    and after they end, each flushed when it ends: each equals its own run at B=1 and the
    mini-batch-parallel computation (with RoPE: positions are each stream's own)."""
    module = roped_module(seed=13) if rope else make_module(seed=13)
    sequences = [(torch.randn(1, n, D),) for n in (5, 11, 16)]
    with torch.no_grad():
        with module.streaming(3):
            # Streams 0 and 2 fill a mini-batch at the same step (7): one update for both.
            runs = run_streams(module, module, sequences, [span(4, 5), span(1, 11), span(0, 16)])
        for run, (x,) in zip(runs, sequences):
            assert_same_run(run, alone(module, x))
            assert_same_run(run, parallel_run(module, x))
            assert (run.report.tokens, run.report.updates) == (x.shape[1], math.ceil(x.shape[1] / C))


@pytest.mark.parametrize("reset", [(1,), (0, 2)])
def test_resetting_streams_restarts_them_and_leaves_the_others_alone(reset: tuple[int, ...]) -> None:
    """The `reset` streams stream 6 tokens of one file (a mini-batch applied, 2 tokens in the
    running sums), are reset alone, then stream their next file: that file runs as on a fresh
    state, the other streams as undisturbed."""
    module = make_module(seed=14)
    module.record_timeline = True  # each stream's timeline restarts with its next file
    sequences = [(torch.randn(1, n, D),) for n in (13, 14, 12)]
    slots = [
        (torch.cat([torch.randn(1, 6, D), seq[0]], dim=1),) if b in reset else seq for b, seq in enumerate(sequences)
    ]
    with torch.no_grad():
        with module.streaming(3):
            runs = run_streams(module, module, slots, [span(0, slot[0].shape[1]) for slot in slots], resets={6: reset})
        for b in reset:
            runs[b].outputs = runs[b].outputs[:, 6:]
        for run, (x,) in zip(runs, sequences):
            assert_same_run(run, alone(module, x))
    assert all(run.report.timeline for run in runs)


def test_masked_steps_leave_a_stream_untouched() -> None:
    """Stream 0 pauses mid-mini-batch for 4 steps while stream 1 goes on (and commits): its
    weights, running sums, position and counts stay bit for bit, and its later outputs are its
    own run's."""
    module = roped_module(seed=15)
    sequences = [(torch.randn(1, 10, D),), (torch.randn(1, 14, D),)]
    snapshots = {}

    def snapshot(step: int) -> None:
        if step in (2, 6):
            snapshots[step] = stream_snapshot(module, 0)

    with torch.no_grad():
        with module.streaming(2):
            runs = run_streams(module, module, sequences, [[0, 1, *range(6, 14)], span(0, 14)], before_step=snapshot)
        assert_same_snapshot(snapshots[2], snapshots[6])
        assert snapshots[2]["counters"]["pending"] == 2  # mid-mini-batch: the sums hold tokens
        for run, (x,) in zip(runs, sequences):
            assert_same_run(run, alone(module, x))


# -- 9. fidelity to the moshi-finetune training code ----------------------------------------------


def _rope_training(x: torch.Tensor, c: int) -> torch.Tensor:
    """`precompute_audio_rope_1d` + `apply_audio_rotary_emb` on [B, H, T, HD], positions t mod C,
    written with complex numbers as the training code does."""
    hd = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = freqs * (0.5 + 1.5 * torch.exp(-torch.arange(0, hd, 2, dtype=torch.float64) / (hd * 2)))
    positions = torch.arange(x.shape[2], dtype=torch.float64) % c
    cis = torch.polar(torch.ones(len(positions), hd // 2, dtype=torch.float64), positions[:, None] * freqs)
    pairs = torch.complex(x[..., 0::2], x[..., 1::2]) * cis
    return torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)


def training_forward(
    module: TTTMLP, x: torch.Tensor, alpha: torch.Tensor, rope: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TTT-MLP block as moshi-finetune trains it, written out independently in float64.

    `TTTWrapper.forward` -> `process_input` (L2-normalised Q/K, `ln_reconstruction_target`, eta
    = base_lr * sigmoid / HD, then / C) -> `ttt_mlp` (a scan over mini-batches of
    `compute_mini_batch`: gradients at the mini-batch's start weights, every row of the
    mini-batch reading *all* its tokens, LayerNorm eps 1e-8) -> no post_norm / wo -> gated
    residual `x + tanh(clamp(alpha, -3, 3)) * out`. Gradients come from autograd here, not from
    the closed forms the module uses. T must be a multiple of C (training pads otherwise).
    """
    p = {n: t.detach().double() for n, t in module.named_parameters()}
    x = x.double()
    b_size, t_len, _ = x.shape
    c = module.chunk_size
    assert t_len % c == 0

    def heads(name: str) -> torch.Tensor:  # [B, H, T, HD]
        y = F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])
        return y.view(b_size, t_len, H, HD).transpose(1, 2)

    gamma, beta = p["ttt_norm_weight"][:, None], p["ttt_norm_bias"][:, None]  # [H, 1, HD]
    xq, xk = F.normalize(heads("wq"), dim=-1), F.normalize(heads("wk"), dim=-1)
    if rope:
        xq, xk = _rope_training(xq, c), _rope_training(xk, c)
    target_all = _target(heads("wv"), xk, gamma, beta)
    logits = torch.einsum("btd,hd->bht", x, p["learnable_ttt_lr_weight"][:, 0]) + p["learnable_ttt_lr_bias"]
    eta_tokens = BASE_LR * torch.sigmoid(logits) / HD / c  # [B, H, T]
    w = {n: p[n].expand(b_size, *p[n].shape).clone() for n in NAMES}
    outs = []
    for start in range(0, t_len, c):
        sl = slice(start, start + c)
        q, k, target = xq[:, :, sl], xk[:, :, sl], target_all[:, :, sl]
        eta = eta_tokens[:, :, None, sl].expand(-1, -1, c, -1)  # eta[i, j] = eta_j: not causal
        z1 = (k @ w["W1"] + w["b1"]).requires_grad_(True)
        x2 = gelu_tanh(z1)
        z2 = x2 @ w["W2"] + w["b2"]
        loss = 0.5 * (_ln(z2, gamma, beta) - target).square().sum()
        g1, g2 = torch.autograd.grad(loss, [z1, z2])
        x2 = x2.detach()
        z1_bar = q @ w["W1"] - (eta * (q @ k.transpose(-1, -2))) @ g1 + w["b1"] - eta @ g1
        x2_bar = gelu_tanh(z1_bar)
        z2_bar = x2_bar @ w["W2"] - (eta * (x2_bar @ x2.transpose(-1, -2))) @ g2 + w["b2"] - eta @ g2
        outs.append(q + _ln(z2_bar, gamma, beta))
        last = eta[:, :, -1, :, None]
        w = {
            "W1": w["W1"] - (last * k).transpose(-1, -2) @ g1,
            "b1": w["b1"] - (last * g1).sum(-2, keepdim=True),
            "W2": w["W2"] - (last * x2).transpose(-1, -2) @ g2,
            "b2": w["b2"] - (last * g2).sum(-2, keepdim=True),
        }
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(b_size, t_len, D)
    gate = torch.tanh(alpha.double().clamp(-3.0, 3.0))
    return x + gate * out, w


def make_block(chunk: int, alpha: torch.Tensor, seed: int, rope: bool = False) -> TTTMLPBlock:
    config = TTTMLPConfig(layers=[0], mini_batch_size=chunk, base_lr=BASE_LR, apply_output_proj=False, use_rope=rope)
    block = TTTMLPBlock(D, H, 0, config)
    source = make_module(seed=seed, apply_output_proj=False)
    block.ttt.load_state_dict(source.state_dict())
    block.ttt.chunk_size = chunk
    with torch.no_grad():
        block.forward_ssm_gating.gating_alpha.copy_(alpha)
    return block


def stream_block(block: TTTMLPBlock, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outs = []
    with torch.no_grad(), block.ttt.streaming(1):
        for t in range(x.shape[1]):
            outs.append(block(x[:, t : t + 1]))
            block.ttt.after_token()
        block.ttt.flush()
        fast = {k: v[0].clone() for k, v in block.ttt._streaming_state.fast.items()}
    return torch.cat(outs, dim=1), fast


# Gates inside and well outside [-3, 3]: tanh(5) and tanh(3) differ by 5e-3, far above tolerance.
ALPHAS = torch.tensor([-5.0, -3.5, -1.0, 0.2, 2.9, 3.2, 6.0, 40.0] * (D // 8))


def test_streaming_equals_training_code_at_minibatch_one() -> None:
    """With C = 1 training's non-causal mini-batch is causal: every output must agree."""
    block = make_block(chunk=1, alpha=ALPHAS, seed=21)
    x = torch.randn(1, 9, D)
    streamed, fast = stream_block(block, x)
    expected, w = training_forward(block.ttt, x, ALPHAS)
    torch.testing.assert_close(streamed.double(), expected, rtol=0, atol=2e-5)
    for n in NAMES:
        torch.testing.assert_close(fast[n].double(), w[n][0], rtol=0, atol=2e-5)
    assert (fast["W1"] - block.ttt.W1).abs().max() > 1e-3  # the inner model did learn


@pytest.mark.parametrize("rope", [False, True])
def test_streaming_matches_training_code_at_minibatch_boundaries(rope: bool) -> None:
    """C = 4: after every mini-batch the weights equal training's, and so does the output of each
    mini-batch's last token (the only row where causal and non-causal see the same tokens).
    With use_rope, Q and K are rotated by their position inside the mini-batch."""
    c, t_len = 4, 12
    block = make_block(chunk=c, alpha=ALPHAS, seed=22, rope=rope)
    x = torch.randn(1, t_len, D)
    streamed, fast = stream_block(block, x)
    expected, w = training_forward(block.ttt, x, ALPHAS, rope=rope)
    other, _ = training_forward(block.ttt, x, ALPHAS, rope=not rope)
    assert (other - expected).abs().max() > 1e-3  # RoPE matters here, so this test can see it
    for n in NAMES:
        torch.testing.assert_close(fast[n].double(), w[n][0], rtol=0, atol=2e-5)
    last_rows = list(range(c - 1, t_len, c))
    torch.testing.assert_close(streamed[:, last_rows].double(), expected[:, last_rows], rtol=0, atol=2e-5)
    # Earlier rows are causal in streaming and see the future in training: they must differ, or
    # this test could not tell the two forms apart.
    assert (streamed[:, : c - 1].double() - expected[:, : c - 1]).abs().max() > 1e-4


def test_gate_is_clamped_before_tanh() -> None:
    block = make_block(chunk=2, alpha=ALPHAS, seed=23)
    x = torch.randn(1, 4, D)
    with torch.no_grad():
        branch = block.ttt_layer(x)
        out = block(x)
    expected = x + torch.tanh(ALPHAS.clamp(-3, 3)) * branch
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - (x + torch.tanh(ALPHAS) * branch)).abs().max() > 1e-4


def test_reconstruction_target_is_standardised_residual() -> None:
    """Per head: D_hat / gamma has zero mean and unit *unbiased* std (up to the 1e-5 eps)."""
    torch.manual_seed(24)
    v, k = torch.randn(2, H, 5, HD, dtype=torch.float64) * 3, torch.randn(2, H, 5, HD, dtype=torch.float64)
    gamma = torch.rand(H, HD, dtype=torch.float64) + 0.5
    beta = torch.randn(H, HD, dtype=torch.float64)
    target = reconstruction_target(v, k, gamma, beta)
    torch.testing.assert_close(target, _target(v, k, gamma[:, None], beta[:, None]), rtol=0, atol=1e-12)
    unit = (target - beta[:, None]) / gamma[:, None]
    torch.testing.assert_close(unit.mean(-1), torch.zeros(2, H, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(unit.std(-1), torch.ones(2, H, 5, dtype=torch.float64), rtol=0, atol=1e-4)
