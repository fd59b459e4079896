"""What every TTT layer shares: fast weights, per-file reset, chunk bookkeeping, diagnostics.

Streaming contract (the reason for this split): moshi replays `LMGen.step` from a CUDA graph
on GPU, so Python inside a layer's forward runs only while the graph is captured. A layer's
streaming forward therefore only does fixed-shape tensor work (write the token into a buffer
at a device-side position, read the fast weights). Everything that depends on how many tokens
have arrived -- committing a full chunk, flushing a partial one -- is driven from the host by
`TTTController.after_step()` / `flush()`, which the runner calls between steps. Fast weights
are updated in place, so a captured graph sees the new values.
"""

from __future__ import annotations

import abc
import math
import typing as tp
from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule

from ..errors import StreamingError
from ..results import LayerReport


@dataclass
class FastWeightState(State):
    """Streaming state of one TTT layer for one stream.

    `fast` are the adapting weights (float32), `initial` the checkpoint's values they reset to,
    `scratch` chunk buffers and running sums that must start from zero. `write_pos` is the
    device-side index of the next token in the chunk buffer (graph-safe); `tokens`, `pending`
    and `updates` are host-side counters kept by the controller. `clipped_updates` and
    `first_nonfinite` are device-side (read once per file, so commits never wait on the device).
    """

    fast: dict[str, torch.Tensor] = field(default_factory=dict)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)
    write_pos: torch.Tensor | None = None
    clipped_updates: torch.Tensor | None = None
    first_nonfinite: torch.Tensor | None = None  # update index, -1 while all weights are finite
    tokens: int = 0
    pending: int = 0
    updates: int = 0
    # Streaming forwards whose Python ran but that after_token() has not acknowledged yet. Under
    # moshi's CUDAGraphed a step's Python runs at most once (warm-up, then capture; replays run
    # none), so anything above 0 at the next forward means the host stopped driving the layer.
    unacked: int = 0

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        # In place, so tensors captured by a CUDA graph stay the ones we reset.
        for name, value in self.fast.items():
            value.copy_(self.initial[name])
        for value in self.scratch.values():
            value.zero_()
        for counter in (self.write_pos, self.clipped_updates):
            if counter is not None:
                counter.zero_()
        if self.first_nonfinite is not None:
            self.first_nonfinite.fill_(-1)
        self.tokens = self.pending = self.updates = self.unacked = 0


class FastWeightModule(StreamingModule[FastWeightState]):
    """Base of TTT layers whose fast weights adapt in chunks of `chunk_size` tokens.

    Subclasses provide the initial fast weights, their chunk scratch buffers, the streaming and
    parallel forwards, and `_apply_chunk(state, n)`, which folds the first `n` buffered tokens
    into `state.fast`. This class owns reset, counting, commit/flush and the report.
    """

    def __init__(self, layer_index: int, chunk_size: int):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.layer_index = layer_index
        self.chunk_size = chunk_size
        # The --no-ttt ablation: chunks are consumed on schedule but never applied.
        self.frozen = False

    # -- to implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def initial_fast_weights(self) -> dict[str, torch.Tensor]:
        """The checkpoint's fast weights, float32, on the module's device (not copied)."""

    @abc.abstractmethod
    def _make_scratch(self) -> dict[str, torch.Tensor]:
        """Fresh zeroed chunk buffers / running sums for one stream."""

    @abc.abstractmethod
    def _apply_chunk(self, state: FastWeightState, n: int) -> torch.Tensor | None:
        """Update `state.fast` in place from the first `n` tokens buffered in this chunk.

        Returns a device-side bool telling whether the update was clipped, or None if this
        family never clips.
        """

    # -- streaming state --------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> FastWeightState:
        if batch_size != 1:
            raise StreamingError(
                f"TTT layers keep one set of fast weights per stream; streaming batch size must be 1, "
                f"got {batch_size}"
            )
        initial = self.initial_fast_weights()
        device = next(iter(initial.values())).device
        return FastWeightState(
            batch_size,
            device,
            fast={name: value.clone() for name, value in initial.items()},
            initial=initial,
            scratch=self._make_scratch(),
            write_pos=torch.zeros(1, dtype=torch.long, device=device),
            clipped_updates=torch.zeros((), dtype=torch.long, device=device),
            first_nonfinite=torch.full((), -1, dtype=torch.long, device=device),
        )

    def _streaming_state_or_raise(self) -> FastWeightState:
        state = self._streaming_state
        if state is None:
            raise StreamingError(f"TTT layer {self.layer_index} is not streaming")
        return state

    def _begin_step(self, state: FastWeightState, steps: int) -> None:
        """Host-side guard at the start of a streaming forward (no device sync).

        Without it a runner that forgot `after_step()` would silently never update (or overrun
        the chunk buffer): say so instead.
        """
        if steps != 1:
            raise StreamingError(f"TTT layers stream one token per step, got {steps}")
        if state.unacked:
            raise StreamingError(
                f"TTT layer {self.layer_index}: a streaming step ran without after_token(); call "
                "TTTController.after_step() after every LMGen.step"
            )
        state.unacked += 1

    # -- host-driven chunk schedule ----------------------------------------------------------
    def after_token(self) -> None:
        state = self._streaming_state_or_raise()
        state.unacked = 0
        state.tokens += 1
        state.pending += 1
        if state.pending == self.chunk_size:
            self._commit(state)

    def flush(self) -> None:
        state = self._streaming_state_or_raise()
        if state.pending:
            self._commit(state)

    def _commit(self, state: FastWeightState) -> None:
        if not self.frozen:
            clipped = self._apply_chunk(state, state.pending)
            state.updates += 1
            assert state.clipped_updates is not None and state.first_nonfinite is not None
            if clipped is not None:
                state.clipped_updates.add_(clipped.to(torch.long))
            # Remember the first update that broke the weights, without a host sync: the file
            # must fail naming it, and later updates only spread the NaNs.
            finite = torch.stack([torch.isfinite(v).all() for v in state.fast.values()]).all()
            first_bad = (state.first_nonfinite < 0) & ~finite
            state.first_nonfinite.copy_(torch.where(first_bad, state.updates, state.first_nonfinite))
        state.pending = 0
        for value in state.scratch.values():
            value.zero_()
        assert state.write_pos is not None
        state.write_pos.zero_()

    # -- diagnostics ----------------------------------------------------------------------------
    def report(self) -> LayerReport:
        state = self._streaming_state_or_raise()
        """This stream's numbers; raises if an update left a fast weight NaN/Inf (the outputs
        after it are garbage, so the file must fail, naming where it broke)."""
        assert state.clipped_updates is not None and state.first_nonfinite is not None
        broken_at = int(state.first_nonfinite)
        if broken_at >= 0:
            raise StreamingError(f"TTT layer {self.layer_index}: fast weights became NaN/Inf at update "
                                 f"{broken_at} of {state.updates}")
        return fast_weight_report(self.layer_index, state.initial, state.fast, state.tokens,
                                  state.updates, state.pending, clipped_updates=int(state.clipped_updates))


def fast_weight_report(layer: int, initial: tp.Mapping[str, torch.Tensor],
                       final: tp.Mapping[str, torch.Tensor], tokens: int, updates: int,
                       pending: int, clipped_updates: int = 0) -> LayerReport:
    """Norms over all fast weights of a layer taken together (concatenated)."""
    norm_initial = math.sqrt(sum(float(v.detach().double().square().sum()) for v in initial.values()))
    norm_final = math.sqrt(sum(float(v.detach().double().square().sum()) for v in final.values()))
    drift = math.sqrt(sum(float((final[k].detach().double() - v.detach().double()).square().sum())
                          for k, v in initial.items()))
    return LayerReport(
        layer=layer, tokens=tokens, updates=updates, pending_tokens=pending,
        norm_initial=norm_initial, norm_final=norm_final, drift=drift,
        relative_drift=drift / norm_initial if norm_initial > 0 else 0.0,
        clipped_updates=clipped_updates,
    )


class TTTController:
    """Drives every TTT layer of a model between streaming steps (see module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.layers: list[FastWeightModule] = sorted(
            (m for m in model.modules() if isinstance(m, FastWeightModule)),
            key=lambda m: m.layer_index,
        )

    def __bool__(self) -> bool:
        return bool(self.layers)

    def set_frozen(self, frozen: bool) -> None:
        for layer in self.layers:
            layer.frozen = frozen

    def after_step(self) -> None:
        """Call once after every `LMGen.step`: each step feeds one token to every TTT layer."""
        for layer in self.layers:
            layer.after_token()

    def flush(self) -> None:
        """End of stream: apply every partially filled chunk so no token is left pending."""
        for layer in self.layers:
            layer.flush()

    def reports(self) -> list[LayerReport]:
        return [layer.report() for layer in self.layers]
