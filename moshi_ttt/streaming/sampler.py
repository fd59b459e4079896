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

On a GPU, moshi replays the depformer (which samples) from a CUDA graph, and a graph cannot
advance the offsets of non-default CUDA generators. There the sampler draws its exponential
noise from a counter-based hash instead (`counter_exponential`): stream b's i-th draw is a pure
function of (its seed, its draw count, i), computed by tensor ops on device-side counters, so
it is graph-safe and still independent of the neighbours (but not moshi's global stream).
"""

from __future__ import annotations

import contextlib
import typing as tp

import torch

_MASK32 = 0xFFFFFFFF


def _pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG's output permutation on 32-bit words held in int64 (no overflow: products < 2^62)."""
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def counter_exponential(seeds: torch.Tensor, draws: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Exp(1) noise of `shape` [B, ...]: row b from a hash of (seeds[b], draws[b], element index).

    `-log(u)` with `u = (hash + 0.5) / 2^32` in (0, 1); each (seed, draw) pair gives a fresh
    sequence, so a stream's noise depends on nothing but its own seed and how often it drew.
    """
    per_row = 1
    for size in shape[1:]:
        per_row *= size
    index = torch.arange(per_row, device=seeds.device, dtype=torch.int64)
    key = _pcg_hash((seeds & _MASK32) ^ _pcg_hash(draws & _MASK32))
    words = _pcg_hash(key[:, None] ^ _pcg_hash(index)[None, :])
    uniform = (words.double() + 0.5) / 4294967296.0
    return (-torch.log(uniform)).float().view(shape)


def _draw_rows(
    probs: torch.Tensor,
    generators: tp.Sequence[torch.Generator] | CounterNoise,
    active: tp.Sequence[bool] | None = None,
) -> torch.Tensor:
    """One index per row of `probs` [B, ..., V] (rows along dim 0), row b drawn with generator b:
    `argmax(p / q)`, `q ~ Exp(1)`, the exponential race moshi's `multinomial` uses. Rows not
    `active` (streams masked this step, whose tokens are discarded) draw nothing, so a stream's
    random sequence only advances on its own steps."""
    if probs.shape[0] != len(generators):
        raise ValueError(f"{probs.shape[0]} rows but {len(generators)} stream generators")
    if isinstance(generators, CounterNoise):  # graph-safe: masked rows draw but do not advance
        return (probs / generators.exponential(probs.shape)).argmax(dim=-1, keepdim=True)
    noise = torch.ones_like(probs)
    for row, generator in enumerate(generators):
        if active is None or active[row]:
            noise[row].exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def sample_token(
    logits: torch.Tensor,
    use_sampling: bool,
    temp: float,
    top_k: int,
    top_p: float,
    generators: tp.Sequence[torch.Generator] | CounterNoise,
    active: tp.Sequence[bool] | None = None,
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


class CounterNoise:
    """Graph-safe per-stream noise: device-side seeds and draw counters (see `counter_exponential`).
    Quacks like the generator list `_draw_rows` takes."""

    def __init__(self, batch_size: int, device: torch.device | str):
        self.seeds = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.draws = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.active = torch.ones(batch_size, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def exponential(self, shape: torch.Size) -> torch.Tensor:
        noise = counter_exponential(self.seeds, self.draws, shape)
        self.draws.add_(self.active)  # in place: a replayed graph advances the same counters
        return noise


class StreamSampler:
    """One random stream per stream of a batch; `reseed(stream, seed)` when its file starts.

    `torch.Generator`s by default (moshi's exact draws at one stream); `CounterNoise` on CUDA,
    where the depformer samples inside a CUDA graph.
    """

    def __init__(self, batch_size: int, device: torch.device | str = "cpu", counter: bool | None = None):
        device = torch.device(device)
        self.counter = (
            CounterNoise(batch_size, device) if (device.type == "cuda" if counter is None else counter) else None
        )
        self.generators = [] if self.counter else [torch.Generator(device=device) for _ in range(batch_size)]
        self._active: list[bool] | None = None

    @property
    def active(self) -> list[bool] | None:
        """The streams the current step runs for (None: all); the runner sets it before each step."""
        return self._active

    @active.setter
    def active(self, rows: list[bool] | None) -> None:
        self._active = rows
        if self.counter is not None:  # host -> device between steps, read by the captured graph
            self.counter.active.copy_(torch.tensor([1] * len(self.counter) if rows is None else rows))

    def reseed(self, stream: int, seed: int) -> None:
        if self.counter is not None:
            self.counter.seeds[stream] = seed
            self.counter.draws[stream] = 0
        else:
            self.generators[stream].manual_seed(seed)

    def sample_token(
        self, logits: torch.Tensor, use_sampling: bool = False, temp: float = 1.0, top_k: int = 0, top_p: float = 0.0
    ) -> torch.Tensor:
        # Under CFG moshi samples after folding the two halves back to B rows.
        source = self.counter if self.counter is not None else self.generators
        return sample_token(logits, use_sampling, temp, top_k, top_p, source, self._active)

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
