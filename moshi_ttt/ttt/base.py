"""What every TTT layer shares: per-stream fast weights, reset, chunk bookkeeping, diagnostics.

Streaming contract (the reason for this split): moshi replays `LMGen.step` from a CUDA graph
on GPU, so Python inside a layer's forward runs only while the graph is captured. A layer's
streaming forward therefore only does fixed-shape tensor work (write the token into a buffer
at a device-side position, read the fast weights). Everything that depends on how many tokens
have arrived -- committing a full chunk, flushing a partial one -- is driven from the host by
`TTTController`, which the runner calls between steps. Fast weights are updated in place, so a
captured graph sees the new values.

Several streams at once: a streaming batch of B holds B independent streams (recordings), each
with its own fast weights (`[B, ...]`, float32), chunk buffers, device-side position
`write_pos[b]` and host-side counters. moshi desynchronises streams with `exec_mask`: a stream
whose mask is False for a step (an idle slot, or one waiting while another steps its first
frame twice) does not buffer that token, keep its position and fast weights, and its output
that step means nothing. The forward reads the mask on the device; the host, which sets the
mask, says the same thing to the controller. The controller API, per step and per stream:

    controller.after_step(active=None)   # after every LMGen.step; `active[b]`: stream b's
                                         # exec_mask that step (None: every stream consumed it).
                                         # Streams whose chunk became full commit, together.
    controller.flush(streams=None)       # end of those streams' files (None: all): apply
                                         # their partial chunks.
    controller.reports(stream=None)      # one LayerReport per layer for that stream (None:
                                         # the only stream of a batch of 1).

Resetting a stream (a slot taking its next file) is moshi's own mechanism,
`lm_gen.reset_streaming(reset_mask)`: it reaches every streaming module, so the TTT layers
restart exactly the masked streams from the checkpoint's weights together with their KV caches.
A batch of 1 uses `after_step()`, `flush()`, `reports()` as before.

The timeline (`controller.set_timeline(True)` before streaming starts): every commit also
appends one device-side row per stream (update norms, clip flag, running drift, family extras
such as TTT-MLP's inner losses); `reports()` reads a stream's rows once, at the end of its file.
Commits already run on the host between steps, so the streaming step is unchanged (TTT-MLP only
buffers the mini-batch's inputs beside its running sums) and nothing waits on the device.
"""

from __future__ import annotations

import abc
import math
import typing as tp
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule

from ..errors import StreamingError
from ..report.schema import LayerReport, UpdateRecord


@dataclass
class StreamCounters:
    """Host-side counts of one stream since its reset (known without reading the device)."""

    tokens: int = 0  # tokens the stream consumed
    pending: int = 0  # tokens buffered in its current chunk, not applied yet
    updates: int = 0  # chunks applied to its fast weights


class StreamRows:
    """Some streams of a batched state, and in-place row operations on the state's tensors.

    Contiguous streams (all of them, or one: the usual cases) are a slice, so reads are views and
    writes land in place with plain kernels, exactly as without a batch dimension; any other set
    is an index tensor (index_select / index_add_ / index_copy_ / index_fill_).
    """

    def __init__(self, ids: tp.Sequence[int], device: torch.device):
        if not ids:
            raise ValueError("StreamRows needs at least one stream")
        self.ids = tuple(ids)
        contiguous = self.ids == tuple(range(self.ids[0], self.ids[0] + len(self.ids)))
        self.index: slice | torch.Tensor = (
            slice(self.ids[0], self.ids[-1] + 1)
            if contiguous
            else torch.tensor(self.ids, dtype=torch.long).to(device, non_blocking=True)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        """These streams' rows, [S, ...] (a view for a slice)."""
        if isinstance(self.index, slice):
            return tensor[self.index]
        return tensor.index_select(0, self.index)

    def add_(self, tensor: torch.Tensor, value: torch.Tensor, alpha: float | int = 1) -> None:
        """tensor[rows] += alpha * value, value [S, ...]."""
        if isinstance(self.index, slice):
            tensor[self.index].add_(value, alpha=alpha)
        else:
            tensor.index_add_(0, self.index, value, alpha=alpha)

    def copy_(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """tensor[rows] = value, value [S, ...] or one row's shape (broadcast to every stream)."""
        if isinstance(self.index, slice):
            tensor[self.index].copy_(value)
        else:
            tensor.index_copy_(0, self.index, value.expand(len(self), *tensor.shape[1:]).contiguous())

    def fill_(self, tensor: torch.Tensor, value: float) -> None:
        if isinstance(self.index, slice):
            tensor[self.index].fill_(value)
        else:
            tensor.index_fill_(0, self.index, value)


@dataclass
class AppliedUpdate:
    """What `_apply_chunk` did to its streams: device-side tensors `[S]` (None: not applicable,
    or not computed because no timeline is being recorded)."""

    clipped: torch.Tensor | None = None  # bool: the delta was scaled down by a norm clip
    update_norm: torch.Tensor | None = None  # ||W_after - W_before||_F, after any clipping
    update_norm_unclipped: torch.Tensor | None = None  # the same had the delta not been clipped
    loss_before: torch.Tensor | None = None  # the family's inner loss at the chunk's start weights
    loss_after: torch.Tensor | None = None  # ... and at the updated weights
    loss_initial: torch.Tensor | None = None  # ... and at the checkpoint's weights W0


# Columns of a timeline row, in order (all float64; NaN where a value does not apply).
TIMELINE_COLUMNS = (
    "update_norm",
    "update_norm_unclipped",
    "clipped",
    "drift",
    "loss_before",
    "loss_after",
    "loss_initial",
)


@dataclass
class TimelineEntry:
    """One update of one stream, as recorded at commit time: host-side counts and a device-side
    row of `TIMELINE_COLUMNS` (a view into the commit's [S, columns] tensor; read at report time)."""

    token: int
    tokens: int
    values: torch.Tensor


def timeline_rows(applied: AppliedUpdate, drift: torch.Tensor) -> torch.Tensor:
    """The commit's timeline rows [S, len(TIMELINE_COLUMNS)], float64, without a host sync."""
    missing = torch.full_like(drift, math.nan)
    columns = {"drift": drift, **{name: getattr(applied, name) for name in TIMELINE_COLUMNS if name != "drift"}}
    return torch.stack(
        [missing if columns[name] is None else columns[name].to(torch.float64) for name in TIMELINE_COLUMNS], dim=1
    )


def update_records(entries: tp.Sequence[TimelineEntry]) -> list[UpdateRecord]:
    """A stream's timeline as typed records: one device read for all of its rows."""
    if not entries:
        return []
    rows = torch.stack([entry.values for entry in entries]).tolist()

    def optional(value: float) -> float | None:
        return None if math.isnan(value) else value

    records = []
    for entry, row in zip(entries, rows):
        values = dict(zip(TIMELINE_COLUMNS, row))
        records.append(
            UpdateRecord(
                token=entry.token,
                tokens=entry.tokens,
                update_norm=optional(values["update_norm"]),
                update_norm_unclipped=optional(values["update_norm_unclipped"]),
                clipped=values["clipped"] == 1.0,
                drift=optional(values["drift"]),
                loss_before=optional(values["loss_before"]),
                loss_after=optional(values["loss_after"]),
                loss_initial=optional(values["loss_initial"]),
            )
        )
    return records


def chunk_buffer(batch_size: int, chunk_size: int, width: int, device: torch.device) -> torch.Tensor:
    """Zeroed per-stream token buffers [B, C, width], float32, with one spare row after them in
    memory (see `FastWeightState.buffer_tokens`)."""
    rows = torch.zeros(batch_size * chunk_size + 1, width, device=device)
    return rows[:-1].view(batch_size, chunk_size, width)


@dataclass
class FastWeightState(State):
    """Streaming state of one TTT layer for a batch of independent streams.

    `fast` are the adapting weights, `[B, ...]` float32; `initial` the checkpoint's values (one
    copy, no batch dim) a stream resets to; `scratch` chunk buffers and running sums `[B, ...]`
    that start from zero. `write_pos[b]` is stream b's device-side index of its next token in the
    chunk (graph-safe); `streams[b]` its host-side counters, kept by the module's schedule.
    `clipped_updates` and `first_nonfinite` `[B]` are device-side (read once per file, so commits
    never wait on the device).
    """

    fast: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    scratch: dict[str, torch.Tensor]
    write_pos: torch.Tensor
    clipped_updates: torch.Tensor
    first_nonfinite: torch.Tensor  # update number, -1 while the stream's weights are finite
    streams: list[StreamCounters] = field(default_factory=list)
    # Per stream, its updates since its reset (`--timeline`); None: no timeline is recorded.
    timeline: list[list[TimelineEntry]] | None = None
    # Streaming forwards whose Python ran but that after_token() has not acknowledged yet. Under
    # moshi's CUDAGraphed a step's Python runs at most once (warm-up, then capture; replays run
    # none), so anything above 0 at the next forward means the host stopped driving the layer.
    unacked: int = 0

    @classmethod
    def fresh(
        cls, batch_size: int, initial: dict[str, torch.Tensor], scratch: dict[str, torch.Tensor], timeline: bool = False
    ) -> FastWeightState:
        device = next(iter(initial.values())).device
        return cls(
            batch_size,
            device,
            # A copy per stream, never a view of `initial` (which may be the module's parameter).
            fast={
                name: value.expand(batch_size, *value.shape).clone(memory_format=torch.contiguous_format)
                for name, value in initial.items()
            },
            initial=initial,
            scratch=scratch,
            write_pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            clipped_updates=torch.zeros(batch_size, dtype=torch.long, device=device),
            first_nonfinite=torch.full((batch_size,), -1, dtype=torch.long, device=device),
            streams=[StreamCounters() for _ in range(batch_size)],
            timeline=[[] for _ in range(batch_size)] if timeline else None,
        )

    def reset(self, reset_mask: torch.Tensor) -> None:
        """Restart the masked streams from the checkpoint's weights; the others are untouched.

        Reads the mask on the host: resets happen between files, outside any graph.
        """
        super().reset(reset_mask)
        ids = [b for b, reset in enumerate(reset_mask.tolist()) if reset]
        if not ids:
            return
        rows = StreamRows(ids, self.device)
        # In place, so tensors captured by a CUDA graph stay the ones we reset.
        for name, value in self.fast.items():
            rows.copy_(value, self.initial[name])
        for value in (*self.scratch.values(), self.write_pos, self.clipped_updates):
            rows.fill_(value, 0)
        rows.fill_(self.first_nonfinite, -1)
        for b in ids:
            self.streams[b] = StreamCounters()
            if self.timeline is not None:
                self.timeline[b] = []
        # An unacknowledged step belongs to every stream: it is void only when all restart.
        if len(ids) == self.batch_size:
            self.unacked = 0

    def buffer_tokens(self, tokens: tp.Mapping[str, torch.Tensor]) -> None:
        """Write each executing stream's token `tokens[name][b]` at `scratch[name][b, write_pos[b]]`.

        The buffers must come from `chunk_buffer` (one spare row past the B chunks): a stream
        masked out by `exec_mask` writes to the spare row, so its own rows are unchanged, and a
        step is one index_copy_ per buffer. A position past the chunk (a host that counted fewer
        tokens than the device saw) also goes to the spare row rather than into another stream's.
        Fixed shapes, device-side positions, no host sync: graph-capturable.
        """
        chunk = self.scratch[next(iter(tokens))].shape[1]
        spare = self.batch_size * chunk
        slot = torch.arange(0, spare, chunk, device=self.write_pos.device) + self.write_pos
        slot = torch.where(self.exec_mask & (self.write_pos < chunk), slot, spare)
        for name, value in tokens.items():
            buffer = self.scratch[name]
            width = buffer.shape[2]
            rows = buffer.as_strided((spare + 1, width), (width, 1))  # the B chunks and the spare row
            rows.index_copy_(0, slot, value.reshape(self.batch_size, width).to(buffer.dtype))

    def advance(self) -> None:
        """Move the executing streams' positions past the token just buffered (device-side)."""
        self.write_pos.add_(self.exec_mask)  # bool promotes to 0 / 1

    def stream_index(self, stream: int | None) -> int:
        """`stream`, checked; None names the only stream of a batch of 1."""
        if stream is None:
            if self.batch_size != 1:
                raise StreamingError(f"{self.batch_size} streams are streaming: say which one")
            return 0
        if not 0 <= stream < self.batch_size:
            raise StreamingError(f"no stream {stream} in a streaming batch of {self.batch_size}")
        return stream


class FastWeightModule(StreamingModule[FastWeightState]):
    """Base of TTT layers whose fast weights adapt in chunks of `chunk_size` tokens.

    Subclasses provide the initial fast weights, their chunk scratch buffers, the streaming and
    parallel forwards, and `_apply_chunk(state, rows, n)`, which folds the first `n` buffered
    tokens of the streams `rows` into their fast weights. This class owns reset, counting,
    commit/flush and the report.
    """

    def __init__(self, layer_index: int, chunk_size: int):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.layer_index = layer_index
        self.chunk_size = chunk_size
        # The --no-ttt ablation: chunks are consumed on schedule but never applied.
        self.frozen = False
        # --timeline: record every update (read when streaming starts, like the scratch buffers).
        self.record_timeline = False

    # -- to implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def initial_fast_weights(self) -> dict[str, torch.Tensor]:
        """The checkpoint's fast weights, float32, on the module's device (not copied)."""

    @abc.abstractmethod
    def _make_scratch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Fresh zeroed chunk buffers / running sums, `[batch_size, ...]`."""

    @abc.abstractmethod
    def _apply_chunk(self, state: FastWeightState, rows: StreamRows, n: int) -> AppliedUpdate:
        """Update the fast weights of streams `rows` in place from their first `n` buffered tokens.

        Returns what it did, device-side: whether each update was clipped (None if this family
        never clips) and, when `state.timeline` is recorded, the update's norms and the family's
        inner losses. No host syncs.
        """

    # -- streaming state --------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> FastWeightState:
        return FastWeightState.fresh(
            batch_size, self.initial_fast_weights(), self._make_scratch(batch_size), timeline=self.record_timeline
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
    def after_token(self, active: tp.Sequence[bool] | None = None) -> None:
        """The host's half of a step: `active[b]` says whether stream b consumed the token (its
        exec_mask; None: all did). Streams whose chunk this filled commit together."""
        state = self._streaming_state_or_raise()
        if active is not None and len(active) != state.batch_size:
            raise StreamingError(f"after_step got {len(active)} stream flags for {state.batch_size} streams")
        state.unacked = 0
        full = []
        for b, counters in enumerate(state.streams):
            if active is None or active[b]:
                counters.tokens += 1
                counters.pending += 1
                if counters.pending == self.chunk_size:
                    full.append(b)
        if full:
            self._commit(state, full)

    def flush(self, streams: tp.Iterable[int] | None = None) -> None:
        """Apply the partial chunks of `streams` (None: all). Streams that buffered the same
        number of tokens commit together."""
        state = self._streaming_state_or_raise()
        ids = range(state.batch_size) if streams is None else [state.stream_index(b) for b in streams]
        by_pending: dict[int, list[int]] = defaultdict(list)
        for b in ids:
            if state.streams[b].pending:
                by_pending[state.streams[b].pending].append(b)
        for group in by_pending.values():
            self._commit(state, group)

    def _commit(self, state: FastWeightState, ids: list[int]) -> None:
        """Apply the chunks buffered by streams `ids`, which all hold the same number of tokens."""
        rows = StreamRows(ids, state.device)
        if not self.frozen:
            n = state.streams[ids[0]].pending
            applied = self._apply_chunk(state, rows, n)
            for b in ids:
                state.streams[b].updates += 1
            if applied.clipped is not None:
                rows.add_(state.clipped_updates, applied.clipped.to(torch.long))
            if state.timeline is not None:
                values = timeline_rows(applied, running_drift(state, rows))
                for i, b in enumerate(ids):
                    state.timeline[b].append(TimelineEntry(state.streams[b].tokens, n, values[i]))
            # Remember each stream's first update that broke its weights, without a host sync: its
            # file must fail naming it, and later updates only spread the NaNs.
            finite = torch.stack([rows.read(v).flatten(1).isfinite().all(1) for v in state.fast.values()]).all(0)
            first = rows.read(state.first_nonfinite)
            update_numbers = torch.tensor([state.streams[b].updates for b in ids]).to(state.device, non_blocking=True)
            rows.copy_(state.first_nonfinite, torch.where((first < 0) & ~finite, update_numbers, first))
        for b in ids:
            state.streams[b].pending = 0
        for value in (*state.scratch.values(), state.write_pos):
            rows.fill_(value, 0)

    # -- diagnostics ----------------------------------------------------------------------------
    def report(self, stream: int | None = None) -> LayerReport:
        """Stream `stream`'s numbers (None: the only stream); raises if an update left its fast
        weights NaN/Inf (the outputs after it are garbage, so the file must fail, naming where)."""
        state = self._streaming_state_or_raise()
        b = state.stream_index(stream)
        counters = state.streams[b]
        broken_at = int(state.first_nonfinite[b])
        if broken_at >= 0:
            raise StreamingError(
                f"TTT layer {self.layer_index}: fast weights became NaN/Inf at update {broken_at} of {counters.updates}"
            )
        report = fast_weight_report(
            self.layer_index,
            state.initial,
            {k: v[b] for k, v in state.fast.items()},
            counters.tokens,
            counters.updates,
            counters.pending,
            clipped_updates=int(state.clipped_updates[b]),
        )
        if state.timeline is not None:
            report.timeline = update_records(state.timeline[b])
        return report


def running_drift(state: FastWeightState, rows: StreamRows) -> torch.Tensor:
    """||W - W0||_F of streams `rows` over all fast weights together, [S] float64 (device-side)."""
    squares = [
        (rows.read(value).double() - state.initial[name].double()).square().flatten(1).sum(1)
        for name, value in state.fast.items()
    ]
    return torch.stack(squares).sum(0).sqrt()


def fast_weight_report(
    layer: int,
    initial: tp.Mapping[str, torch.Tensor],
    final: tp.Mapping[str, torch.Tensor],
    tokens: int,
    updates: int,
    pending: int,
    clipped_updates: int = 0,
) -> LayerReport:
    """Norms over all fast weights of a layer taken together (concatenated)."""
    norm_initial = math.sqrt(sum(float(v.detach().double().square().sum()) for v in initial.values()))
    norm_final = math.sqrt(sum(float(v.detach().double().square().sum()) for v in final.values()))
    drift = math.sqrt(
        sum(float((final[k].detach().double() - v.detach().double()).square().sum()) for k, v in initial.items())
    )
    return LayerReport(
        layer=layer,
        tokens=tokens,
        updates=updates,
        pending_tokens=pending,
        norm_initial=norm_initial,
        norm_final=norm_final,
        drift=drift,
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

    def set_timeline(self, record: bool) -> None:
        """Record every update for `reports()` (`--timeline`); takes effect when streaming starts."""
        for layer in self.layers:
            layer.record_timeline = record

    def after_step(self, active: tp.Sequence[bool] | None = None) -> None:
        """Call once after every `LMGen.step`, with the step's exec_mask as `active` (None: every
        stream consumed the token)."""
        for layer in self.layers:
            layer.after_token(active)

    def flush(self, streams: tp.Iterable[int] | None = None) -> None:
        """End of those streams' files (None: all): apply every partially filled chunk so no
        token is left pending."""
        ids = None if streams is None else list(streams)
        for layer in self.layers:
            layer.flush(ids)

    def reports(self, stream: int | None = None) -> list[LayerReport]:
        """Stream `stream`'s report from every layer (None: the only stream of a batch of 1)."""
        return [layer.report(stream) for layer in self.layers]
