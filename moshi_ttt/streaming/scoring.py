"""Teacher-forced scoring: the loss of every target of a recording, streamed frame by frame.

What is scored (the definition; `forward_nll` computes it with moshi's own `LMModel.forward`):

Codes are laid out `[K, T]` with K = n_q + 1: row 0 the text stream, rows 1..dep_q Moshi's audio
codebooks (the scored stream), rows dep_q+1..n_q the user's audio (context only). `LMModel.forward`
delays row k by `d_k = delays[k]` (the first d_k columns of row k become the initial token),
prepends one column of initial tokens, runs the temporal transformer on columns 0..T-1 of that,
and for every position s runs the depformer teacher-forced on the delayed column s: its slot 0
reads the delayed text token, slot c >= 1 reads Moshi's codebook c-1, all of that same column.
The logits of position s predict the delayed column s itself, i.e. `codes[k, s - d_k]`; moshi
maps them back (`_undelay_sequence`), so the target of (row k, frame t) is scored at position
s = t + d_k, and only where that position exists: t < T - d_k. A target counts iff it is not the
zero token (-1: nothing there) and t < T - d_k. Its score is the cross-entropy in nats.

Streaming reproduces that position by position. Step s (one per frame, s = 0..T-1) pushes frame
s into a per-stream history of the last max(delays) + 1 frames, reads the delayed column s from
it (`delayed_column`), feeds the *previous* step's delayed column (the initial column at s = 0)
to `forward_text` with the LM in `streaming(B)` mode (KV caches; TTT fast weights adapting, driven
by the controller as `infer` drives them), runs the depformer in a fresh streaming state on this
step's delayed column, and scores the column: row k's NLL belongs to frame s - d_k (counted from
s >= d_k on). moshi's non-streaming attention keeps keys with `delta < context`, and so does its
ring KV cache, so the two agree past the context too (to float rounding; tested). Running
`forward` chunk by chunk in streaming mode would not: it drifts once the ring cache is full.

Text is scored only for streams started with `score_text=True` (a text row built from an
alignment); without one the caller fills row 0 with PAD (`--text-stream pad`) or -1 (`none`)
and text is context only.

The training loss, perplexity and per-position buckets are pure functions of the per-target NLL
arrays (`report/scores.py`).
"""

from __future__ import annotations

import math
import typing as tp
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.model import LoadedModel
from ..errors import MoshiTTTError, StreamingError
from ..report.schema import LayerReport
from .batched import streaming

Key = tp.TypeVar("Key")


# -- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeLayout:
    """Where things are in a `[K, T]` code array, as the model says (never hard-coded)."""

    delays: tuple[int, ...]  # [K] per-row delay in frames, text first
    dep_q: int  # Moshi's audio codebooks (rows 1..dep_q): the scored audio
    initial: tuple[int, ...]  # [K] the initial column's tokens (text_card, then card)
    text_card: int
    card: int
    text_padding_ids: tuple[int, int]  # (PAD, EPAD): the text tokens the training loss down-weights
    zero_token: int = -1  # "nothing here": embedded as zeros, never a target

    @classmethod
    def of(cls, lm: tp.Any) -> CodeLayout:
        initial = lm._get_initial_token()[0, :, 0].tolist()  # [K]
        return cls(
            delays=tuple(int(d) for d in lm.delays),
            dep_q=int(lm.dep_q),
            initial=tuple(int(i) for i in initial),
            text_card=int(lm.text_card),
            card=int(lm.card),
            text_padding_ids=(int(lm.text_padding_token_id), int(lm.end_of_text_padding_id)),
            zero_token=int(lm.zero_token_id),
        )

    @property
    def num_codebooks(self) -> int:
        """K = n_q + 1 rows."""
        return len(self.delays)

    @property
    def scored_rows(self) -> int:
        """Rows that can be targets: text and Moshi's audio, 1 + dep_q."""
        return 1 + self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)


def check_codes(codes: np.ndarray | torch.Tensor, layout: CodeLayout) -> None:
    """Refuse a `[K, T]` code array the model cannot read: wrong row count, or a token outside its
    vocabulary (text < text_card, audio < card; -1 allowed anywhere). `step` does not check (that
    would wait on the device every step), so callers feeding untrusted rows check them here."""
    codes = torch.as_tensor(codes)
    if codes.dim() != 2 or codes.shape[0] != layout.num_codebooks:
        raise MoshiTTTError(f"codes must be [{layout.num_codebooks}, T], got {list(codes.shape)}")
    for name, rows, card in (("text", codes[:1], layout.text_card), ("audio", codes[1:], layout.card)):
        bad = (rows < layout.zero_token) | (rows >= card)
        if bool(bad.any()):
            row, frame = (int(i) for i in bad.nonzero()[0])
            raise MoshiTTTError(
                f"{name} token {int(rows[row, frame])} at row {row + (name == 'audio')}, "
                f"frame {frame} is outside 0..{card - 1} (or -1)"
            )


# -- pure math ----------------------------------------------------------------------------------


def target_frames(steps: tp.Sequence[int] | np.ndarray, delays: tp.Sequence[int]) -> np.ndarray:
    """The frame each scored row's target belongs to at a step: `t = s - d_k`, -1 before the row's
    first target (s < d_k). steps [B] (0-based step index of each stream), delays [R] -> [B, R].

    Derivation: the logits of streaming step s predict the delayed column s, whose row k is
    `codes[k, s - d_k]`, the initial token while s < d_k (not a target).
    """
    frames = np.asarray(steps, dtype=np.int64)[:, None] - np.asarray(delays, dtype=np.int64)[None, :]  # [B, R]
    return np.where(frames >= 0, frames, -1)


def delayed_column(history: torch.Tensor, delays: torch.Tensor) -> torch.Tensor:
    """Column s of the delayed sequence, from a stream's recent frames.

    history [B, K, H] holds frames s-H+1..s (newest last, H = max(delays) + 1; the initial token
    where the stream has no such frame yet); delays [K]. Row k of delayed column s is
    `codes[k, s - d_k]` = `history[:, k, H - 1 - d_k]`, or the initial token while s < d_k, which
    is what `_delay_sequence` puts there. Returns [B, K].
    """
    B, K, H = history.shape
    index = (H - 1 - delays).view(1, K, 1).expand(B, K, 1)  # [B, K, 1]
    return history.gather(2, index)[..., 0]  # [B, K]


def gather_nll(logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of each target under its logits, NaN where not counted.

    logits [..., V], targets [...] (any value where not counted), counted [...] bool -> [...]
    float32. `-log softmax(l)[y] = logsumexp(l) - l[y]`, in float32 as training's `.float()`.
    No host sync: uncounted targets are clamped into range for the gather, then masked.
    """
    logits = logits.float()
    safe = targets.clamp(0, logits.shape[-1] - 1)  # [...]
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [...]
    nll = torch.logsumexp(logits, dim=-1) - picked  # [...]
    return torch.where(counted, nll, torch.full_like(nll, math.nan))


@torch.no_grad()
def forward_nll(lm: tp.Any, codes: torch.Tensor, score_text: bool = True) -> torch.Tensor:
    """The reference: per-target NLL from moshi's `LMModel.forward` on whole recordings.

    codes [B, K, T] -> [B, 1 + dep_q, T] float32, NaN where a target does not count (moshi's
    masks: t >= T - d_k or the target is -1; text everywhere when `score_text` is False). The LM
    must not be streaming; TTT layers then run their chunk-parallel forward. Memory grows with T
    (all logits at once): the streaming scorer is for real recordings.
    """
    out = lm(codes)
    text_counted = out.text_mask[:, 0] & (codes[:, 0] >= 0) & score_text  # [B, T]
    text = gather_nll(out.text_logits[:, 0], codes[:, 0], text_counted)  # [B, T]
    audio_targets = codes[:, 1 : 1 + lm.dep_q]  # [B, dep_q, T]
    audio = gather_nll(out.logits, audio_targets, out.mask & (audio_targets >= 0))  # [B, dep_q, T]
    return torch.cat([text[:, None], audio], dim=1)


# -- per-file accumulation --------------------------------------------------------------------------


class ScoreAccumulator:
    """Collects one stream's per-step scores into its `[1 + dep_q, T]` array (NaN: not scored).

    Holds 1 + dep_q float32 per frame in one growing array (capacity doubling), never logits nor
    per-step objects, so memory grows by a few bytes per frame: a file of any length fits.
    """

    def __init__(self, rows: int, capacity: int = 1024):
        self.rows = rows
        self._out = np.full((rows, max(1, capacity)), np.nan, dtype=np.float32)  # [R, capacity]

    def add(self, nll: np.ndarray, frames: np.ndarray) -> None:
        """One step: nll [R] (NaN where nothing counted), frames [R] (-1 where no target)."""
        frames = np.asarray(frames)
        rows = np.flatnonzero(frames >= 0)  # the rows this step scored a target of
        if not rows.size:
            return
        columns = frames[rows]
        needed = int(columns.max()) + 1
        if needed > self._out.shape[1]:
            grown = np.full((self.rows, max(needed, 2 * self._out.shape[1])), np.nan, dtype=np.float32)
            grown[:, : self._out.shape[1]] = self._out
            self._out = grown
        self._out[rows, columns] = np.asarray(nll, dtype=np.float32)[rows]

    def array(self, length: int) -> np.ndarray:
        """[R, length] float32: NaN where no target was scored."""
        out = np.full((self.rows, length), np.nan, dtype=np.float32)
        kept = min(length, self._out.shape[1])
        out[:, :kept] = self._out[:, :kept]
        return out


# -- the scorer ---------------------------------------------------------------------------------


@dataclass
class StepScores:
    """What one step scored, per stream.

    Rows: 0 text, 1..dep_q Moshi's audio. `frames[b, k]` is the frame t = s - d_k whose row-k
    target stream b's step s predicted, -1 where there is none (idle stream, or s < d_k);
    `nll[b, k]` is that target's NLL in nats, NaN where it does not count (no target, the target
    is -1, or text is not scored for this stream).
    """

    nll: torch.Tensor  # [B, 1 + dep_q] float32, on the model's device
    frames: np.ndarray  # [B, 1 + dep_q] int64 (host)


@dataclass
class FileScore:
    """One recording's scores: NLL per target and the TTT layers' report."""

    nll: np.ndarray  # [1 + dep_q, T] float32, NaN where not scored
    frames: int  # T, frames streamed (= LM steps = tokens each TTT layer saw)
    score_text: bool
    ttt_layers: list[LayerReport] = field(default_factory=list)


@dataclass
class _Slot:
    busy: bool = False
    steps: int = 0
    score_text: bool = False


class TeacherForcedScorer:
    """Scores up to `batch_size` recordings at once, one frame per step, teacher-forced.

    Per stream (slot), as `batched.BatchedRunner` drives `infer`: `start(slot, score_text)` resets
    the slot's KV caches and TTT fast weights to the checkpoint's (moshi's `reset_streaming`
    mask, applied at the next step, all starting slots at once) and its delay history; every
    `step(frames)` consumes one frame `[K]` per busy slot (idle slots are masked with moshi's
    exec mask: their state does not move) and returns what that step scored; `finish(slot)`
    flushes the slot's partial TTT chunk and returns its per-layer TTT report. Each file's scores
    are what it gets alone, whatever runs beside it (to float rounding, tested at 1e-5).

    Use as a context manager (`with scorer: ...`) around the steps, or call `run`. A step does
    device work only (no host sync); reading `StepScores.nll` is the caller's one sync per step.
    """

    def __init__(self, model: LoadedModel, batch_size: int, ttt_enabled: bool = True, timeline: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lm = model.lm
        if lm.depformer is None or lm.dep_q < 1:
            raise MoshiTTTError("this LM has no depformer: there is no audio to score")
        if lm.condition_provider is not None and lm.condition_provider.conditioners:
            raise MoshiTTTError("this LM is conditioned; scoring needs the conditions it was trained with")
        if lm.training:
            raise MoshiTTTError("the LM is in training mode (dropout): call .eval() before scoring")
        self.model = model
        self.lm = lm
        self.batch_size = batch_size
        self.layout = CodeLayout.of(lm)
        self.controller = model.controller()
        self.ttt_enabled = ttt_enabled
        self.timeline = timeline
        self.device = torch.device(model.device)
        self._delays = torch.tensor(self.layout.delays, dtype=torch.long, device=self.device)  # [K]
        self._initial = torch.tensor(self.layout.initial, dtype=torch.long, device=self.device)  # [K]
        self._slots = [_Slot() for _ in range(batch_size)]
        self._pending_reset = [False] * batch_size
        self._stack: ExitStack | None = None

    # -- streaming context ------------------------------------------------------------------
    def __enter__(self) -> TeacherForcedScorer:
        if self._stack is not None:
            raise StreamingError("the scorer is already streaming")
        B, K, H = self.batch_size, self.layout.num_codebooks, self.layout.max_delay + 1
        self.controller.set_frozen(not self.ttt_enabled)  # per run: a loaded model may be shared
        self.controller.set_timeline(self.timeline)
        stack = ExitStack()
        stack.enter_context(streaming(self.lm, B))  # left cleanly if entering fails part way
        self._stack = stack
        # Per stream, device-side: recent frames (delay history), the next transformer input
        # (the previous step's delayed column), steps taken, whether text is scored.
        self._history = self._initial.view(1, K, 1).expand(B, K, H).clone()  # [B, K, H]
        self._next_input = self._initial.view(1, K).expand(B, K).clone()  # [B, K]
        self._steps = torch.zeros(B, dtype=torch.long, device=self.device)  # [B]
        self._score_text = torch.zeros(B, dtype=torch.bool, device=self.device)  # [B]
        self._slots = [_Slot() for _ in range(B)]
        self._pending_reset = [False] * B
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _check_streaming(self) -> None:
        if self._stack is None:
            raise StreamingError("the scorer is not streaming: use `with scorer:` around start/step/finish")

    def _mask(self, rows: tp.Sequence[bool]) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.bool, device=self.device)

    # -- per stream ---------------------------------------------------------------------------
    def start(self, slot: int, score_text: bool) -> None:
        """Slot `slot` begins a new file (reset at the next step). `score_text`: the file's row 0
        is a real text stream (from an alignment) whose targets count."""
        self._check_streaming()
        if self._slots[slot].busy:
            raise StreamingError(f"slot {slot} is still on a file: finish it first")
        self._slots[slot] = _Slot(busy=True, steps=0, score_text=score_text)
        self._pending_reset[slot] = True

    def busy(self, slot: int) -> bool:
        return self._slots[slot].busy

    def steps(self, slot: int) -> int:
        """Frames slot `slot` has consumed in its current file."""
        return self._slots[slot].steps

    def finish(self, slot: int) -> list[LayerReport]:
        """End of slot `slot`'s file: apply its partial TTT chunk, return its TTT report, free it.
        The slot is freed even when its report raises (its fast weights became NaN/Inf): that
        file fails, the slot takes the next."""
        self._check_streaming()
        if not self._slots[slot].busy:
            raise StreamingError(f"slot {slot} has no file to finish")
        try:
            if self._pending_reset[slot]:  # started, never stepped: nothing of it reached the model
                self._pending_reset[slot] = False
                return []
            if not self.controller:
                return []
            self.controller.flush([slot])
            return self.controller.reports(slot)
        finally:
            self._slots[slot] = _Slot()

    def _apply_resets(self) -> None:
        if not any(self._pending_reset):
            return
        mask = self._mask(self._pending_reset)
        self.lm.reset_streaming(mask)  # KV caches and TTT fast weights of exactly these streams
        K = self.layout.num_codebooks
        self._history.copy_(torch.where(mask[:, None, None], self._initial.view(1, K, 1), self._history))
        self._next_input.copy_(torch.where(mask[:, None], self._initial.view(1, K), self._next_input))
        self._steps.masked_fill_(mask, 0)
        self._score_text.copy_(torch.where(mask, self._mask([s.score_text for s in self._slots]), self._score_text))
        self._pending_reset = [False] * self.batch_size

    @torch.no_grad()
    def step(self, frames: torch.Tensor, active: tp.Sequence[bool] | None = None) -> StepScores:
        """Consume one frame per active slot and score what this step predicts.

        frames [B, K] long: each active slot's next frame of codes (text, Moshi's audio, user's
        audio; rows of inactive slots are ignored). `active` (default: the busy slots) must be a
        subset of the busy slots.
        """
        self._check_streaming()
        B = self.batch_size
        if active is None:
            active = [slot.busy for slot in self._slots]
        active = [bool(a) for a in active]
        if len(active) != B:
            raise StreamingError(f"{len(active)} slot flags for {B} slots")
        if any(a and not slot.busy for a, slot in zip(active, self._slots)):
            raise StreamingError("a slot without a file cannot step: start it first")
        if not any(active):
            raise StreamingError("no slot is active")
        if tuple(frames.shape) != (B, self.layout.num_codebooks):
            raise StreamingError(f"frames must be [{B}, {self.layout.num_codebooks}], got {list(frames.shape)}")
        steps = [slot.steps for slot in self._slots]
        self._apply_resets()
        mask = self._mask(active)  # [B]
        self.lm.set_exec_mask(mask)
        nll = self._score_step(frames.to(self.device, torch.long), mask)  # [B, R]
        self.controller.after_step(active)  # the TTT layers' chunk schedule, per stream
        for slot, on in zip(self._slots, active):
            slot.steps += on
        rows = self.layout.scored_rows
        frames_scored = np.where(
            np.asarray(active)[:, None], target_frames(steps, self.layout.delays[:rows]), -1
        )  # [B, R]
        return StepScores(nll=nll, frames=frames_scored)

    def _score_step(self, frames: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Device work of one step (fixed shapes, no host sync). frames [B, K], active [B] -> [B, R]."""
        lm, R = self.lm, self.layout.scored_rows
        pushed = torch.cat([self._history[:, :, 1:], frames[:, :, None]], dim=2)  # [B, K, H]
        self._history.copy_(torch.where(active[:, None, None], pushed, self._history))
        column = delayed_column(self._history, self._delays)  # [B, K]: codes[k, s - d_k] or initial
        # The transformer reads the previous delayed column (forward's input is shifted by one).
        transformer_out, text_logits = lm.forward_text(self._next_input[:, :, None])  # [B, 1, D], [B, 1, 1, Vt]
        self._next_input.copy_(torch.where(active[:, None], column, self._next_input))
        audio_logits = depformer_logits(lm, column, transformer_out)  # [B, dep_q, card]
        targets = column[:, :R]  # [B, R]: this step's targets are its own delayed column
        counted = active[:, None] & (self._steps[:, None] >= self._delays[None, :R]) & (targets >= 0)  # [B, R]
        counted[:, 0] &= self._score_text
        text = gather_nll(text_logits[:, 0, 0], targets[:, 0], counted[:, 0])  # [B]
        audio = gather_nll(audio_logits, targets[:, 1:], counted[:, 1:])  # [B, dep_q]
        self._steps.add_(active)  # bool promotes to 0 / 1
        return torch.cat([text[:, None], audio], dim=1)  # [B, R]

    # -- whole files ------------------------------------------------------------------------------
    def run(
        self, files: tp.Iterable[tuple[Key, np.ndarray | torch.Tensor, bool]]
    ) -> tp.Iterator[tuple[Key, FileScore]]:
        """Score `(key, codes [K, T], score_text)` files, yielding `(key, FileScore)` as each ends.

        Files are pulled only when a slot frees; a slot takes the next file as soon as its file
        ends. Codes are checked (`check_codes`) when their file is pulled.
        """
        R = self.layout.scored_rows
        pending = iter(files)
        own = self._stack is None
        if own:
            self.__enter__()
        try:
            keys: list[tp.Any] = [None] * self.batch_size
            codes: list[torch.Tensor | None] = [None] * self.batch_size
            sums: list[ScoreAccumulator | None] = [None] * self.batch_size
            exhausted = False
            while True:
                for index in range(self.batch_size):
                    while not self._slots[index].busy and not exhausted:
                        item = next(pending, None)
                        if item is None:
                            exhausted = True
                            break
                        key, file_codes, score_text = item
                        check_codes(file_codes, self.layout)
                        file_codes = torch.as_tensor(file_codes, dtype=torch.long)
                        if file_codes.shape[1] == 0:  # nothing to stream: done at once
                            yield (
                                key,
                                FileScore(
                                    nll=np.full((R, 0), np.nan, dtype=np.float32), frames=0, score_text=score_text
                                ),
                            )
                            continue
                        self.start(index, score_text)
                        keys[index], codes[index], sums[index] = key, file_codes.to(self.device), ScoreAccumulator(R)
                if not any(slot.busy for slot in self._slots):
                    return
                batch = torch.zeros(self.batch_size, self.layout.num_codebooks, dtype=torch.long, device=self.device)
                for index, slot in enumerate(self._slots):
                    if slot.busy:
                        batch[index] = codes[index][:, slot.steps]
                scores = self.step(batch)
                nll = scores.nll.cpu().numpy()  # the step's one sync
                for index, slot in enumerate(self._slots):
                    if not slot.busy:
                        continue
                    sums[index].add(nll[index], scores.frames[index])
                    length = codes[index].shape[1]
                    if slot.steps == length:
                        score_text = slot.score_text
                        reports = self.finish(index)
                        yield (
                            keys[index],
                            FileScore(
                                nll=sums[index].array(length), frames=length, score_text=score_text, ttt_layers=reports
                            ),
                        )
                        keys[index] = codes[index] = sums[index] = None
        finally:
            if own:
                self.__exit__(None, None, None)


def depformer_logits(lm: tp.Any, column: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
    """The depformer's logits for one step, teacher-forced on that step's delayed column.

    column [B, K], transformer_out [B, 1, D] -> [B, dep_q, card]. Slot c reads row c of the
    column: c = 0 this step's (delayed) text token, c >= 1 Moshi's codebook c-1 of this step, as
    `forward_depformer_training` reads `sequence[:, c]`; a fresh streaming state per step, as
    `LMGen.depformer_step` uses.
    """
    B = column.shape[0]
    logits = []
    with lm.depformer.streaming(B):
        for c in range(lm.dep_q):
            out = lm.forward_depformer(c, column[:, c].view(B, 1, 1), transformer_out)  # [B, 1, 1, card]
            logits.append(out[:, 0, 0])
    return torch.stack(logits, dim=1)  # [B, dep_q, card]
