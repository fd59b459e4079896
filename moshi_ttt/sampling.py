"""Per-stream sampling: a stream's random draws never depend on the streams beside it.

moshi samples a batch with one global generator (`moshi.utils.sampling.multinomial` draws
exponential noise for the whole `[B, V]` batch at once, row after row), so with several
recordings streamed together a file's tokens would depend on its neighbours and on its slot.
Here each stream has its own `torch.Generator`, reseeded when its file starts, and each row draws
from its own generator only.

Why the result is the same as moshi's at one stream: moshi's top-k sampling is
`argmax(p / q)` with `q ~ Exp(1)` drawn by `exponential_` over the top-k probabilities, and
`torch.manual_seed(s)` (what `seed_all` does) leaves the default generator in the state of
`torch.Generator().manual_seed(s)`. Drawing the same number of values for the one row from a
generator seeded with `s` therefore gives the very same tokens: the plain runner stays
bit-identical to moshi's `InferenceState`.
"""

from __future__ import annotations

import contextlib
import typing as tp

import torch


def _draw_rows(probs: torch.Tensor, generators: tp.Sequence[torch.Generator],
               active: tp.Sequence[bool] | None = None) -> torch.Tensor:
    """One index per row of `probs` [B, ..., V] (rows along dim 0), row b drawn with generator b:
    `argmax(p / q)`, `q ~ Exp(1)`, the exponential race moshi's `multinomial` uses. Rows not
    `active` (streams masked this step, whose tokens are discarded) draw nothing, so a stream's
    random sequence only advances on its own steps."""
    if probs.shape[0] != len(generators):
        raise ValueError(f"{probs.shape[0]} rows but {len(generators)} stream generators")
    noise = torch.ones_like(probs)
    for row, generator in enumerate(generators):
        if active is None or active[row]:
            noise[row].exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def sample_token(logits: torch.Tensor, use_sampling: bool, temp: float, top_k: int, top_p: float,
                 generators: tp.Sequence[torch.Generator], active: tp.Sequence[bool] | None = None
                 ) -> torch.Tensor:
    """moshi's `sample_token` (same arguments, same output [B, ...]) with per-row generators."""
    if not (use_sampling and temp > 0.0):
        return torch.argmax(logits, dim=-1, keepdim=True)[..., 0]
    probs = torch.softmax(logits / temp, dim=-1)
    if top_p > 0.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        beyond = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs * (~beyond).float()
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        token = torch.gather(order, -1, _draw_rows(sorted_probs, generators, active))
    elif top_k > 0:
        top, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
        token = indices.gather(-1, _draw_rows(top, generators, active))
    else:
        token = _draw_rows(probs, generators, active)
    return token[..., 0]


class StreamSampler:
    """One generator per stream of a batch; `reseed(stream, seed)` when that stream's file starts."""

    def __init__(self, batch_size: int, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device) for _ in range(batch_size)]
        # The streams the current step runs for (None: all); set by the runner before each step.
        self.active: list[bool] | None = None

    def reseed(self, stream: int, seed: int) -> None:
        self.generators[stream].manual_seed(seed)

    def sample_token(self, logits: torch.Tensor, use_sampling: bool = False, temp: float = 1.0,
                     top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
        # Under CFG moshi samples after folding the two halves back to B rows.
        return sample_token(logits, use_sampling, temp, top_k, top_p, self.generators, self.active)

    @contextlib.contextmanager
    def installed(self) -> tp.Iterator[None]:
        """Make moshi's `LMGen` (text token and depformer) sample through this sampler.

        moshi adapter, checked against moshi 0.2.13: `models/lm.py` imports `sample_token` into its
        module namespace and calls it as a global from `LMGen._step` and `LMGen.depformer_step`.
        """
        from moshi.models import lm as moshi_lm

        original = moshi_lm.sample_token
        moshi_lm.sample_token = self.sample_token
        try:
            yield
        finally:
            moshi_lm.sample_token = original
