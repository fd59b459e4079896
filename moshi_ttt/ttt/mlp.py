"""TTT-MLP layer (ttt-lm / Video-DiT style) and its attachment to a moshi transformer layer.

The math is the moshi-finetune training code's (`moshi_ttt/models/ssm/ttt_layer.py`,
`ops/ttt_mlp.py`, `ops/utils.py`, `ssm_gating.py`), which is what the checkpoints were trained
with. The inner model of each head is a two-layer MLP `f(x) = gelu_tanh(x W1 + b1) W2 + b2`,
trained online on the self-supervised loss `0.5 * ||LN(f(K)) - D_hat||^2`, where `D_hat` is the
standardised residual `V - K` (see `reconstruction_target`) and LN is the per-head LayerNorm with
epsilon 1e-8. One gradient step per mini-batch of `C` tokens, with per-token learning rates
`eta_t = base_lr * sigmoid(theta . x_t + b) / (HD * C)`. Inside a mini-batch every gradient is
taken at the mini-batch's start weights, and token `t` reads the weights corrected by the
eta-weighted gradients of tokens `j <= t` (the causal "dual form"). Training uses all `C` tokens
of the mini-batch for every row (it sees the whole sequence); streaming cannot see the future, so
rows are causal. The two agree for the last token of every mini-batch, on the weights after
every mini-batch, and everywhere when `C = 1`. A final partial mini-batch is simply shorter: no
padding token ever contributes to an update (training padded with zeros; streaming has none).
The TTT branch joins the residual stream through `tanh(clamp(alpha, -3, 3))`.

Two paths give the same result:
- parallel (not streaming): scan over mini-batches, dual form with lower-triangular masks;
- streaming (one token per step): running gradient sums in scratch, one set per stream, committed
  by the host through `after_token()` / `flush()` (see `base.py` for why commits are host-driven).
"""

from __future__ import annotations

import json
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..errors import CheckpointError, StreamingError
from .base import AppliedUpdate, FastWeightModule, FastWeightState, StreamRows, chunk_buffer
from .config import number
from .families import SectionLayout, TTTFamily

# The training ops' LayerNorm (`ln_fwd`, `ln_fused_l2_bwd`) uses 1e-8, not torch's 1e-5 / 1e-6.
INNER_LN_EPS = 1e-8
# `ln_reconstruction_target` divides by (unbiased std + 1e-5).
TARGET_STD_EPS = 1e-5
# `post_norm` is an nn.LayerNorm(eps=1e-6) in the training code.
POST_NORM_EPS = 1e-6
# `SSMGating` clamps alpha to [-3, 3] before the tanh (a stabilisation in the training code).
GATE_ALPHA_BOUND = 3.0
FAST_WEIGHT_NAMES = ("W1", "b1", "W2", "b2")
# Scratch buffers [B, C, H * HD] kept only with --timeline: each mini-batch's K and target.
TIMELINE_INPUTS = ("k", "target")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


@dataclass
class TTTMLPConfig:
    """TTT-MLP settings of a checkpoint.

    `persistent_states` is the training-time choice of carrying fast weights across training
    sequences; at inference fast weights always carry through a file and reset between files, so
    it does not change this module's behaviour.
    """

    layers: list[int]
    mini_batch_size: int
    base_lr: float
    initial_gating_alpha: float = 0.1
    apply_output_proj: bool = True
    ttt_layer_context: int | None = None
    non_ttt_layer_context: int | None = None
    persistent_states: bool = False
    # Rotary embedding on the inner model's Q and K, positions counted inside each mini-batch.
    use_rope: bool = False
    rope_theta: float = 10000.0
    mlp_expansion: int = 4

    variant: tp.ClassVar[str] = "ttt-mlp"


# -- rotary embedding of the inner model's inputs ----------------------------------------------


def audio_rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angular frequency of each (even, odd) channel pair, [HD / 2], float32.

    moshi-finetune's `precompute_audio_rope_1d(audio_scaling=True)`: the usual RoPE frequencies
    `theta^(-2i / HD)`, each multiplied by `0.5 + 1.5 * exp(-2i / (2 HD))`, which speeds up the
    fastest pairs (x2 at i = 0) and leaves the slow ones near x0.5-x1.
    """
    two_i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    return theta ** (-two_i / head_dim) * (0.5 + 1.5 * torch.exp(-two_i / (2 * head_dim)))


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) by `angles[..., i]`, i.e. multiply x[2i] + i x[2i+1]
    by e^{i angle} (the training code's complex-number form). x [..., HD], angles [..., HD/2]."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = torch.cos(angles), torch.sin(angles)
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack([real, imag], dim=-1).flatten(-2)


# -- analytic pieces of the inner gradient -------------------------------------------------------


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh-approximated GELU, closed form (no autograd on the inference path)."""
    tanh_u = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x.pow(3)))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x.square())
    return 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u.square()) * du_dx


def reconstruction_target(
    v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = TARGET_STD_EPS
) -> torch.Tensor:
    """What the inner model regresses onto: the residual `D = V - K`, standardised per head.

    `D_hat = gamma * (D - mean(D)) / (std(D) + eps) + beta` over the head dim, with the
    *unbiased* standard deviation and the eps added to the std (not the variance). Training
    (`ln_reconstruction_target`) stores `D_hat + K` in place of V and its ops then subtract K
    again, so the loss target is `D_hat`; it shares `gamma, beta` (`ttt_norm_weight/bias`) with
    the inner LayerNorm. v, k [..., H, n, HD]; gamma, beta [H, HD].
    """
    d = v - k
    mu = d.mean(-1, keepdim=True)
    std = d.std(-1, keepdim=True)  # unbiased (Bessel), as torch.Tensor.std defaults to
    return gamma.unsqueeze(-2) * (d - mu) / (std + eps) + beta.unsqueeze(-2)


def head_layer_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = INNER_LN_EPS
) -> torch.Tensor:
    """LayerNorm over the last dim with per-head affine; gamma/beta are [H, HD], x is [..., H, n, HD]."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * gamma.unsqueeze(-2) + beta.unsqueeze(-2)


def ln_l2_backward(
    z: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = INNER_LN_EPS
) -> torch.Tensor:
    """Gradient wrt `z` of `0.5 * ||head_layer_norm(z) - target||^2`, per row.

    Derivation: with xhat = (z - mu) / std and g = dl/dxhat = (gamma xhat + beta - target) gamma,
    dl/dz = (d g - sum(g) - xhat sum(g xhat)) / (d std), the mean and variance terms projecting
    out the two directions LayerNorm is invariant to.
    """
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).square().mean(-1, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    xhat = (z - mu) * inv_std
    gamma_ = gamma.unsqueeze(-2)
    g = (gamma_ * xhat + beta.unsqueeze(-2) - target) * gamma_
    return (d * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True)) * (inv_std / d)


def inner_gradients(
    weights: tp.Mapping[str, torch.Tensor],
    k: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (G1 = dl/dZ1, G2 = dl/dZ2, X2) of the inner loss at `weights`, all [B, H, n, *].

    `target` is `reconstruction_target(V, K, ...)`: the inner model maps K to the standardised
    residual.
    """
    z1 = k @ weights["W1"] + weights["b1"]
    x2 = gelu_tanh(z1)
    z2 = x2 @ weights["W2"] + weights["b2"]
    g2 = ln_l2_backward(z2, target, gamma, beta)
    g1 = (g2 @ weights["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)
    return g1, g2, x2


def inner_loss(
    weights: tp.Mapping[str, torch.Tensor],
    k: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """The inner model's self-supervised loss on a mini-batch, averaged: [B].

        loss = 0.5 * mean_{h, t} ||LN_h(f_h(K_{h,t})) - D_hat_{h,t}||^2

    with f_h(x) = gelu_tanh(x W1_h + b1_h) W2_h + b2_h, LN_h the per-head LayerNorm
    (`head_layer_norm`) and D_hat = `reconstruction_target(V, K)`: the per-token loss whose
    gradients `inner_gradients` takes, averaged over the n tokens and H heads. Evaluated at a
    mini-batch's start weights and at its updated weights, it shows whether the step learned
    (the standard TTT diagnostic). weights [B, H, ...], k / target [B, H, n, HD].
    """
    z2 = gelu_tanh(k @ weights["W1"] + weights["b1"]) @ weights["W2"] + weights["b2"]
    return 0.5 * (head_layer_norm(z2, gamma, beta) - target).square().sum(-1).mean((-2, -1))


def mlp_output(
    weights: tp.Mapping[str, torch.Tensor], q: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Output with uncorrected weights: Q + LN(f(Q)). Used when the fast weights are frozen."""
    z2 = gelu_tanh(q @ weights["W1"] + weights["b1"]) @ weights["W2"] + weights["b2"]
    return q + head_layer_norm(z2, gamma, beta)


def dual_form_minibatch(
    weights: tp.Mapping[str, torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    target: torch.Tensor,
    eta: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One mini-batch of n tokens in the causal dual form.

    weights: W1 [B,H,HD,F], b1 [B,H,1,F], W2 [B,H,F,HD], b2 [B,H,1,HD]; q/k/target [B,H,n,HD];
    eta [B,H,n]. Returns the outputs [B,H,n,HD] and the weights after the mini-batch's step.
    Token t's corrected weights are never materialised: q_t W1_t = q_t W1 - sum_{j<=t} eta_j
    (q_t . k_j) G1_j, so a masked [n, n] matrix stands in for n weight copies.
    """
    n = q.shape[-2]
    g1, g2, x2 = inner_gradients(weights, k, target, gamma, beta)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    eta_j = eta.unsqueeze(-2)  # scales column j

    attn1 = ((q @ k.transpose(-1, -2) + 1.0) * eta_j).masked_fill(~causal, 0.0)
    x2_bar = gelu_tanh(q @ weights["W1"] + weights["b1"] - attn1 @ g1)
    attn2 = ((x2_bar @ x2.transpose(-1, -2) + 1.0) * eta_j).masked_fill(~causal, 0.0)
    z2_bar = x2_bar @ weights["W2"] + weights["b2"] - attn2 @ g2
    out = q + head_layer_norm(z2_bar, gamma, beta)

    eg1 = eta.unsqueeze(-1) * g1
    eg2 = eta.unsqueeze(-1) * g2
    new = {
        "W1": weights["W1"] - k.transpose(-1, -2) @ eg1,
        "b1": weights["b1"] - eg1.sum(-2, keepdim=True),
        "W2": weights["W2"] - x2.transpose(-1, -2) @ eg2,
        "b2": weights["b2"] - eg2.sum(-2, keepdim=True),
    }
    return out, new


# -- modules ------------------------------------------------------------------------------------


class TTTMLP(FastWeightModule):
    """The TTT-MLP sequence mixer of one layer: x1 [B, T, D] -> [B, T, D].

    Parameters keep the checkpoint's names and dtype; all fast-weight math runs in float32.
    After a parallel (non-streaming) forward, `last_parallel_state` holds the final inner weights
    per batch element (keys W1, b1, W2, b2, leading batch dim).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        layer_index: int,
        mini_batch_size: int,
        base_lr: float,
        *,
        apply_output_proj: bool = True,
        mlp_expansion: int = 4,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(layer_index, mini_batch_size)
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible into {num_heads} TTT heads")
        factory: dict[str, tp.Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.base_lr = base_lr
        self.apply_output_proj = apply_output_proj
        hidden = mlp_expansion * self.head_dim
        h, hd = num_heads, self.head_dim

        self.wq = nn.Linear(d_model, d_model, bias=True, **factory)
        self.wk = nn.Linear(d_model, d_model, bias=True, **factory)
        self.wv = nn.Linear(d_model, d_model, bias=True, **factory)
        self.wo = nn.Linear(d_model, d_model, bias=True, **factory)
        self.post_norm = nn.LayerNorm(d_model, eps=POST_NORM_EPS, **factory)
        self.ttt_norm_weight = nn.Parameter(torch.ones(h, hd, **factory))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(h, hd, **factory))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(h, 1, d_model, **factory).normal_(0, 0.02))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(h, 1, **factory))
        self.W1 = nn.Parameter(torch.empty(h, hd, hidden, **factory).normal_(0, 0.02))
        self.b1 = nn.Parameter(torch.zeros(h, 1, hidden, **factory))
        self.W2 = nn.Parameter(torch.empty(h, hidden, hd, **factory).normal_(0, 0.02))
        self.b2 = nn.Parameter(torch.zeros(h, 1, hd, **factory))
        # A non-persistent buffer: it follows the module's device but is never in a checkpoint.
        self.register_buffer(
            "rope_frequencies",
            audio_rope_frequencies(hd, rope_theta).to(device=device) if use_rope else None,
            persistent=False,
        )
        self.last_parallel_state: dict[str, torch.Tensor] | None = None

    # -- FastWeightModule contract --------------------------------------------------------------
    def initial_fast_weights(self) -> dict[str, torch.Tensor]:
        # Read from the parameters every time streaming starts, so weights loaded after
        # construction are what the stream resets to. float32 params are shared, not copied.
        return {name: getattr(self, name).detach().to(torch.float32) for name in FAST_WEIGHT_NAMES}

    def _make_scratch(self, batch_size: int) -> dict[str, torch.Tensor]:
        # Running eta-weighted gradient sums of each stream's current mini-batch; fast - sum is
        # the weight set its latest token reads, and committing is `fast -= sum`.
        scratch = {
            name: torch.zeros(
                batch_size, *getattr(self, name).shape, dtype=torch.float32, device=getattr(self, name).device
            )
            for name in FAST_WEIGHT_NAMES
        }
        if self.record_timeline:
            # --timeline: the mini-batch's K and target (heads flattened), for its inner losses.
            for name in TIMELINE_INPUTS:
                scratch[name] = chunk_buffer(batch_size, self.chunk_size, self.d_model, self.W1.device)
        return scratch

    def _apply_chunk(self, state: FastWeightState, rows: StreamRows, n: int) -> AppliedUpdate:
        # The sums hold exactly the tokens fed since the last commit (`n` of them), so they are
        # the whole mini-batch's step. TTT-MLP never clips.
        steps = {name: rows.read(state.scratch[name]) for name in FAST_WEIGHT_NAMES}
        recording = state.timeline is not None
        if recording:
            k, target = (
                rows.read(state.scratch[name])[:, :n].unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                for name in TIMELINE_INPUTS
            )  # [S, H, n, HD]
            before = self._inner_loss(state, rows, k, target)
        for name in FAST_WEIGHT_NAMES:
            rows.add_(state.fast[name], steps[name], alpha=-1.0)
        if not recording:
            return AppliedUpdate()
        after = self._inner_loss(state, rows, k, target)
        gamma, beta = self._norm_params()
        initial = {
            name: state.initial[name].float().expand(k.shape[0], *state.initial[name].shape)
            for name in FAST_WEIGHT_NAMES
        }
        at_initial = inner_loss(initial, k, target, gamma, beta)  # [S]: l(W0; x), what TTT improves on
        norm = torch.stack([step.square().flatten(1).sum(1) for step in steps.values()]).sum(0).sqrt()
        return AppliedUpdate(update_norm=norm, loss_before=before, loss_after=after, loss_initial=at_initial)

    def _inner_loss(
        self, state: FastWeightState, rows: StreamRows, k: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """`inner_loss` of streams `rows` at their current fast weights, [S]."""
        gamma, beta = self._norm_params()
        return inner_loss({name: rows.read(state.fast[name]) for name in FAST_WEIGHT_NAMES}, k, target, gamma, beta)

    # -- forward --------------------------------------------------------------------------------
    def _project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K (L2-normalised, then rotated), the inner target, all [B, H, T, HD] float32, and
        eta [B, H, T]. `positions` [B or 1, T] are the tokens' indices inside their mini-batch
        (RoPE): per stream when streaming, where streams sit at different places in theirs."""
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.float().view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        # Projections stay in the model dtype: casting D x D weights to float32 every step would
        # cost more than the whole TTT update.
        q = F.normalize(heads(self.wq(x)), dim=-1)
        k = F.normalize(heads(self.wk(x)), dim=-1)
        if self.rope_frequencies is not None:
            # Training rotates right after the L2 norm, so the target below uses the rotated K.
            angles = (positions.float()[..., None] * self.rope_frequencies).unsqueeze(1)  # [B|1, 1, T, HD/2]
            q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        gamma, beta = self._norm_params()
        target = reconstruction_target(heads(self.wv(x)), k, gamma, beta)
        lr_logits = torch.einsum("btd,hd->bht", x.float(), self.learnable_ttt_lr_weight.float().squeeze(1))
        lr_logits = lr_logits + self.learnable_ttt_lr_bias.float()
        eta = self.base_lr * torch.sigmoid(lr_logits) / (self.head_dim * self.chunk_size)
        return q, k, target, eta

    def _merge(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.d_model)
        # Some fine-tuning code saved post_norm/wo without applying them; the config decides.
        if self.apply_output_proj:
            out = F.layer_norm(
                out, (self.d_model,), self.post_norm.weight.float(), self.post_norm.bias.float(), POST_NORM_EPS
            )
            out = self.wo(out.to(self.wo.weight.dtype))
        return out.to(dtype)

    def _norm_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ttt_norm_weight.float(), self.ttt_norm_bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        if state is None:
            return self._forward_parallel(x)
        return self._forward_step(x, state)

    def _forward_parallel(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, target, eta = self._project(x, (torch.arange(t, device=x.device) % self.chunk_size)[None])
        gamma, beta = self._norm_params()
        weights = {name: w.unsqueeze(0).expand(b, *w.shape) for name, w in self.initial_fast_weights().items()}
        if self.frozen:
            out = mlp_output(weights, q, gamma, beta)
        else:
            outs = []
            for start in range(0, t, self.chunk_size):
                stop = min(start + self.chunk_size, t)  # the last mini-batch may be shorter
                part, weights = dual_form_minibatch(
                    weights,
                    q[:, :, start:stop],
                    k[:, :, start:stop],
                    target[:, :, start:stop],
                    eta[:, :, start:stop],
                    gamma,
                    beta,
                )
                outs.append(part)
            out = torch.cat(outs, dim=2) if outs else q
        self.last_parallel_state = {name: w.detach().clone() for name, w in weights.items()}
        return self._merge(out, x.dtype)

    def _forward_step(self, x: torch.Tensor, state: FastWeightState) -> torch.Tensor:
        """One token per stream: fixed-shape, in-place tensor work only (graph-capturable).

        Every stream reads its own weights [B, H, ...]; a stream masked out by moshi's exec_mask
        adds nothing to its running sums and keeps its position.
        """
        self._begin_step(state, x.shape[1])
        q, k, target, eta = self._project(x, state.write_pos[:, None])
        if TIMELINE_INPUTS[0] in state.scratch:  # --timeline: buffer the inputs of the inner losses
            state.buffer_tokens({"k": k.transpose(1, 2), "target": target.transpose(1, 2)})
        state.advance()  # device-side positions inside the mini-batches (graph-safe)
        gamma, beta = self._norm_params()
        fast = state.fast
        if self.frozen:
            return self._merge(mlp_output(fast, q, gamma, beta), x.dtype)

        g1, g2, x2 = inner_gradients(fast, k, target, gamma, beta)
        # A select rather than a product with the mask: nothing, not even a NaN, leaks in.
        executing = state.exec_mask.view(-1, 1, 1, 1)
        eg1 = torch.where(executing, eta.unsqueeze(-1) * g1, 0.0)  # [B, H, 1, F]
        eg2 = torch.where(executing, eta.unsqueeze(-1) * g2, 0.0)  # [B, H, 1, HD]
        sums = state.scratch
        # One batched matmul over (stream, head) pairs: [B*H, HD, 1] @ [B*H, 1, F].
        sums["W1"].flatten(0, 1).baddbmm_(k.flatten(0, 1).transpose(-1, -2), eg1.flatten(0, 1))
        sums["b1"].add_(eg1)
        sums["W2"].flatten(0, 1).baddbmm_(x2.flatten(0, 1).transpose(-1, -2), eg2.flatten(0, 1))
        sums["b2"].add_(eg2)

        # q (W - S) as q W - q S: no per-step copy of the weights.
        x2_bar = gelu_tanh(q @ fast["W1"] - q @ sums["W1"] + fast["b1"] - sums["b1"])
        z2_bar = x2_bar @ fast["W2"] - x2_bar @ sums["W2"] + fast["b2"] - sums["b2"]
        out = q + head_layer_norm(z2_bar, gamma, beta)
        return self._merge(out, x.dtype)


class TTTLayer(nn.Module):
    """Holds the TTT module under the name `ttt`, matching the checkpoint's key layout."""

    def __init__(self, ttt: TTTMLP):
        super().__init__()
        self.ttt = ttt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ttt(x)


def gate_scale(alpha: torch.Tensor) -> torch.Tensor:
    """`tanh(clamp(alpha, -3, 3))`: the per-channel weight of the TTT branch (training's SSMGating)."""
    return torch.tanh(alpha.float().clamp(-GATE_ALPHA_BOUND, GATE_ALPHA_BOUND))


class SSMGating(nn.Module):
    """Per-channel tanh gate on the TTT branch; alpha = 0 makes the branch vanish exactly."""

    def __init__(
        self,
        d_model: int,
        initial_alpha: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.gating_alpha = nn.Parameter(torch.full((d_model,), float(initial_alpha), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gate_scale(self.gating_alpha) * x.float()


class TTTMLPBlock(nn.Module):
    """`seq_modeling_block` of a TTT layer: x2 = x1 + tanh(clamp(alpha, -3, 3)) * TTT(x1)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        layer_index: int,
        config: TTTMLPConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        ttt = TTTMLP(
            d_model,
            num_heads,
            layer_index,
            config.mini_batch_size,
            config.base_lr,
            apply_output_proj=config.apply_output_proj,
            mlp_expansion=config.mlp_expansion,
            use_rope=config.use_rope,
            rope_theta=config.rope_theta,
            device=device,
            dtype=dtype,
        )
        self.ttt_layer = TTTLayer(ttt)
        self.forward_ssm_gating = SSMGating(d_model, config.initial_gating_alpha, device=device, dtype=dtype)

    @property
    def ttt(self) -> TTTMLP:
        return self.ttt_layer.ttt

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        update = self.forward_ssm_gating(self.ttt_layer(x1))
        return x1 + update.to(x1.dtype)


class TTTMLPTransformerLayer(StreamingTransformerLayer):
    """A moshi layer with the TTT block right after self-attention.

    Attached by swapping `__class__` on a built layer (see `attach_ttt_mlp`) rather than
    rebuilding it: the loaded attention/FFN weights, the module tree and moshi's own `forward`
    (streaming offsets, cross-attention, FFN) stay exactly as they are; only `_sa_block`, which
    that forward calls, gains the TTT step.
    """

    seq_modeling_block: TTTMLPBlock

    def _sa_block(self, x: torch.Tensor):
        return self.seq_modeling_block(super()._sa_block(x))


# -- adapter: the only places that reach into moshi internals --------------------------------------
# Checked against moshi 0.2.13: `StreamingTransformerLayer.forward` calls `self._sa_block(x)`, and
# `StreamingModule` caches its streaming children in `_cached_children` on first use.


def _become_ttt_layer(layer: StreamingTransformerLayer, block: TTTMLPBlock) -> None:
    """Give a built moshi layer the TTT block, in place (see `TTTMLPTransformerLayer`)."""
    layer.seq_modeling_block = block
    layer.__class__ = TTTMLPTransformerLayer
    layer._cached_children = None  # the new streaming child must be found when streaming starts


def attach_ttt_mlp(
    layer: StreamingTransformerLayer, layer_index: int, config: TTTMLPConfig, *, num_heads: int | None = None
) -> TTTMLPBlock:
    """Add a TTT-MLP block to `layer` in place and return it.

    `num_heads` defaults to the layer's attention heads. Must be called before the model first
    enters streaming: moshi caches each module's streaming children on first use.
    """
    if type(layer) is not StreamingTransformerLayer:
        raise TypeError(f"layer {layer_index}: expected a plain StreamingTransformerLayer, got {type(layer).__name__}")
    if layer.skip_self_attn:
        raise ValueError(f"layer {layer_index}: TTT-MLP needs a layer with self-attention")
    if layer.is_streaming:
        raise StreamingError(f"layer {layer_index}: cannot attach a TTT block while the layer is streaming")
    attn = layer.self_attn
    # norm params may be float32 in a bf16 model (rms_norm_f32); the projections carry the model dtype.
    ref = attn.in_projs[0].weight
    block = TTTMLPBlock(
        attn.embed_dim, num_heads or attn.num_heads, layer_index, config, device=ref.device, dtype=ref.dtype
    )
    _become_ttt_layer(layer, block)
    if config.ttt_layer_context is not None:
        attn.context = config.ttt_layer_context
    return block


# -- the family: config, attachment, checkpoint keys, tiny checkpoints ----------------------------


class TTTMLPFamily(TTTFamily):
    """moshi-finetune TTT fine-tunes: `ttt` in training_config.json (or args.yaml), bf16 tensors
    under `seq_modeling_block` in lora.safetensors / consolidated.safetensors."""

    name = "ttt-mlp"
    marker_keys = ("mini_batch_size", "base_lr")
    # "middle" on 4 layers is layers 1 and 2.
    tiny_section = {
        "enable": True,
        "layers": "middle",
        "base_lr": 0.3,
        "mini_batch_size": 8,
        "persistent_states": True,
        "initial_gating_alpha": 0.1,
        "ttt_layer_context": None,
        "non_ttt_layer_context": None,
        "ttt_mlp_layers": 2,
        "ttt_mlp_expansion_factor": 4,
        "use_rope": False,
    }
    tiny_std = 0.05

    def parse(self, section: dict, layers: list[int], source: Path, layout: SectionLayout) -> TTTMLPConfig:
        inner_layers = section.get("ttt_mlp_layers")
        if inner_layers not in (None, 2):
            raise CheckpointError(
                f"only 2-layer TTT-MLP inner models are supported, got ttt_mlp_layers={inner_layers}", source
            )
        config = TTTMLPConfig(
            layers=layers,
            mini_batch_size=number(section, "mini_batch_size", source, int),
            base_lr=number(section, "base_lr", source),
            initial_gating_alpha=number(section, "initial_gating_alpha", source, float, 0.1),
            apply_output_proj=bool(section.get("apply_output_proj", layout.defaults.get("apply_output_proj", True))),
            ttt_layer_context=number(section, "ttt_layer_context", source, int, None),
            non_ttt_layer_context=number(section, "non_ttt_layer_context", source, int, None),
            persistent_states=bool(section.get("persistent_states") or False),
            use_rope=bool(section.get("use_rope") or False),
            rope_theta=number(section, "rope_theta", source, float, 10000.0),
            mlp_expansion=number(section, "ttt_mlp_expansion_factor", source, int, None) or 4,
        )
        # `rope_continuous` is not read: the training code counts RoPE positions inside each
        # mini-batch whatever it says.
        return config

    def chunk_size(self, config: TTTMLPConfig) -> int:
        return config.mini_batch_size

    def attach(self, lm: nn.Module, config: TTTMLPConfig) -> list[FastWeightModule]:
        layers = lm.transformer.layers
        modules: list[FastWeightModule] = []
        for index in config.layers:
            block = attach_ttt_mlp(layers[index], index, config)
            modules.extend(m for m in block.modules() if isinstance(m, FastWeightModule))
        if config.non_ttt_layer_context is not None:
            for index, layer in enumerate(layers):
                if index not in config.layers:
                    layer.self_attn.context = config.non_ttt_layer_context
        return modules

    def optional_keys(self, config: TTTMLPConfig) -> tuple[str, ...]:
        return () if config.apply_output_proj else (".ttt.wo.", ".ttt.post_norm.")

    def ignored_keys(self, config: TTTMLPConfig) -> tuple[str, ...]:
        # moshi-finetune saves a `backward_ssm_gating` beside every `forward_ssm_gating`; only the
        # forward one is used.
        return tuple(f"transformer.layers.{i}.seq_modeling_block.backward_ssm_gating." for i in config.layers)

    def owns_key(self, key_in_layer: str) -> bool:
        return key_in_layer.startswith("seq_modeling_block.")

    def write_tiny_config(self, folder: Path, lm_config: dict, section: dict, run_dir: Path, seed: int) -> None:
        (folder / "config.json").write_text(json.dumps(lm_config, indent=2) + "\n")
        training = {
            "run_dir": str(run_dir),
            "seed": seed,
            "max_steps": 100,
            "batch_size": 1,
            "lora": {"enable": False},
            "ttt": section,
        }
        (folder / "training_config.json").write_text(json.dumps(training, indent=2) + "\n")

    def tiny_tensor(self, name: str, shape: tuple[int, ...], section: dict, generator: torch.Generator) -> torch.Tensor:
        value = super().tiny_tensor(name, shape, section, generator)
        if name.endswith(("ttt_norm_weight", "post_norm.weight")):
            value = 1.0 + value  # norm gains around one, as trained ones are
        elif name.endswith("gating_alpha"):
            value = torch.full(shape, float(section["initial_gating_alpha"]))
        return value


FAMILY = TTTMLPFamily()
