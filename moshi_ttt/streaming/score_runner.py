"""Scoring recordings: audio in, per-target NLL out, B files at once.

`ScoreRunner` is to `score` what `batched.BatchedRunner` is to `infer`: the worker hands it
recordings as frame sources and it yields each file's scores when the file ends, a slot taking
the next file at once. Per 80 ms step:

1. Mimi encodes the next frame of every busy slot, streaming, with `2B` streams: rows `b` hold
   slot b's Moshi channel, rows `B + b` its user channel (so the two never share state), each
   masked when it has nothing to encode;
2. the frame of codes is laid out as the LM reads it (`[K]`: the text token, Moshi's `dep_q`
   codebooks, the user's `n_q - dep_q`) and `scoring.TeacherForcedScorer.step` scores it;
3. a slot whose recording has no next frame finishes: its partial TTT chunk is flushed and its
   `[1 + dep_q, T]` NLL array comes out.

The user stream: channel 1 of a stereo recording (moshi-finetune's dialogues: Moshi left, user
right); for mono, `user_stream` says: `silence` (Mimi's codes of zeros, encoded as the stream
goes), `copy` (the Moshi channel's codes), `none` (token -1: a zero embedding). The text row: an
alignment's tokens when the caller has them (then text is scored), else PAD (`text_stream="pad"`)
or -1 (`"none"`), not scored.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.model import LoadedModel
from ..errors import stops_the_run
from .batched import StreamFailure, scrub_attention_caches, streaming
from .scoring import FileScore, ScoreAccumulator, TeacherForcedScorer

Key = tp.TypeVar("Key")
FrameProgressFn = tp.Callable[[tp.Any, int, int], None]  # (key, frames done, frames expected)


@dataclass
class ScoreInput:
    """One recording to score: its frames as they are read, and what else the caller knows."""

    frames: tp.Iterator[np.ndarray]  # [C, frame_size] float32 at 24 kHz, C = 1 (Moshi) or 2 (+ user)
    expected_frames: int  # from the header: for progress and the text row's length
    text_row: np.ndarray | None = None  # [expected_frames] text tokens from an alignment: scored


@dataclass
class ScoredFile:
    """A recording's scores and the text row they were computed with."""

    score: FileScore
    text_row: np.ndarray  # [T] the text tokens fed (PAD, -1 or the alignment's)


@dataclass
class _Slot:
    key: tp.Any = None
    source: ScoreInput | None = None
    frame: np.ndarray | None = None  # the next frame, read one step ahead: its absence ends the file
    text_row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sums: ScoreAccumulator | None = None
    steps: int = 0

    @property
    def busy(self) -> bool:
        return self.source is not None


class ScoreRunner:
    """Scores up to `batch_size` recordings at once through a loaded model; see the module
    docstring. Each file's scores are what it gets alone (to float rounding), whatever runs
    beside it."""

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int,
        ttt_enabled: bool = True,
        timeline: bool = False,
        user_stream: str = "silence",
        text_stream: str = "pad",
    ):
        self.model = model
        self.batch_size = batch_size
        self.scorer = TeacherForcedScorer(model, batch_size, ttt_enabled=ttt_enabled, timeline=timeline)
        self.layout = self.scorer.layout
        self.user_stream = user_stream
        self.text_stream = text_stream
        lm = model.lm
        self.user_rows = lm.n_q - lm.dep_q
        self.pad = int(lm.text_padding_token_id) if text_stream == "pad" else self.layout.zero_token

    @property
    def controller(self) -> tp.Any:
        return self.scorer.controller

    def _mask(self, rows: tp.Iterable[bool]) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.bool, device=self.model.device)

    def _text_row(self, source: ScoreInput) -> np.ndarray:
        if source.text_row is not None:
            return np.asarray(source.text_row, dtype=np.int64)
        return np.full(source.expected_frames, self.pad, dtype=np.int64)

    @torch.no_grad()
    def run(
        self, recordings: tp.Iterable[tuple[Key, ScoreInput]], progress: FrameProgressFn | None = None
    ) -> tp.Iterator[tuple[Key, ScoredFile | StreamFailure]]:
        """Yield `(key, ScoredFile)` for every recording as soon as it ends (completion order).
        Recordings are pulled only when a slot frees, so at most `batch_size` are open at once."""
        mimi, B = self.model.mimi, self.batch_size
        size = mimi.frame_size
        pending = iter(recordings)
        slots = [_Slot() for _ in range(B)]
        exhausted = False
        with streaming(mimi, 2 * B), self.scorer:
            while True:
                starting = [False] * B
                for index in range(B):
                    while not slots[index].busy and not exhausted:
                        item = next(pending, None)
                        if item is None:
                            exhausted = True
                            break
                        key, source = item
                        slot = _Slot(
                            key=key,
                            source=source,
                            text_row=self._text_row(source),
                            sums=ScoreAccumulator(self.layout.scored_rows),
                        )
                        slot.frame = next(source.frames, None)
                        if slot.frame is None:  # nothing to stream: done at once
                            yield key, self._finish(slot, started=False)
                            continue
                        slots[index] = slot
                        self.scorer.start(index, score_text=source.text_row is not None)
                        starting[index] = True
                if any(starting):
                    mimi.reset_streaming(self._mask(starting + starting))
                    rows = np.flatnonzero(starting)
                    scrub_attention_caches((self.model.lm,), rows)  # a diverged file's NaNs stay behind
                    scrub_attention_caches((mimi,), [*rows, *(rows + B)])
                active = [slot.busy for slot in slots]
                if not any(active):
                    return
                frames = self._encode(slots, active, size)  # [B, K]
                scores = self.scorer.step(frames, active)
                nll = scores.nll.cpu().numpy()  # the step's one host sync
                for index, slot in enumerate(slots):
                    if not slot.busy:
                        continue
                    slot.sums.add(nll[index], scores.frames[index])
                    slot.steps += 1
                    slot.frame = next(slot.source.frames, None)
                    if progress is not None:
                        progress(slot.key, slot.steps, max(slot.steps, slot.source.expected_frames))
                    if slot.frame is None:
                        yield slot.key, self._finish(slot, index=index)
                        slots[index] = _Slot()

    def _encode(self, slots: list[_Slot], active: list[bool], size: int) -> torch.Tensor:
        """Encode this step's audio of every busy slot and lay the codes out as the LM reads them."""
        B, lm = self.batch_size, self.model.lm
        audio = np.zeros((2 * B, 1, size), dtype=np.float32)
        encode = [False] * (2 * B)
        text = np.full(B, self.pad, dtype=np.int64)
        for index, slot in enumerate(slots):
            if not slot.busy:
                continue
            frame = slot.frame  # [C, size]
            audio[index, 0] = frame[0]
            encode[index] = True
            if frame.shape[0] > 1:
                audio[B + index, 0] = frame[1]
                encode[B + index] = True
            elif self.user_stream == "silence":
                encode[B + index] = True  # zeros, through Mimi's streaming state as a real channel
            if slot.steps < len(slot.text_row):
                text[index] = slot.text_row[slot.steps]
        self.model.mimi.set_exec_mask(self._mask(encode))
        codes = self.model.mimi.encode(torch.from_numpy(audio).to(self.model.device))  # [2B, Q, 1]
        moshi = codes[:B, : lm.dep_q, 0]  # [B, dep_q]
        user = codes[B:, : self.user_rows, 0]  # [B, n_q - dep_q]
        mono = torch.tensor([s.busy and s.frame.shape[0] == 1 for s in slots], device=codes.device)  # [B]
        if self.user_stream == "copy":
            copied = moshi[:, : self.user_rows]
            user = torch.where(mono[:, None], copied, user)
        elif self.user_stream == "none":
            user = torch.where(mono[:, None], torch.full_like(user, self.layout.zero_token), user)
        text_column = torch.from_numpy(text).to(codes.device)[:, None]  # [B, 1]
        return torch.cat([text_column, moshi, user], dim=1)  # [B, K]

    def _finish(self, slot: _Slot, index: int | None = None, started: bool = True) -> ScoredFile | StreamFailure:
        """The slot's file is done: flush its TTT chunk and collect its scores; a `StreamFailure`
        where its fast weights became NaN/Inf (the layer's report says which), for it alone."""
        try:
            reports = self.scorer.finish(index) if started and index is not None else []
        except BaseException as exc:
            if stops_the_run(exc):
                raise
            return StreamFailure(exc)
        frames = slot.steps
        nll = slot.sums.array(frames) if slot.sums is not None else np.zeros((self.layout.scored_rows, 0))
        text_row = np.resize(slot.text_row, frames) if len(slot.text_row) < frames else slot.text_row[:frames]
        if len(slot.text_row) < frames:  # the alignment ended early: the rest was fed as padding
            text_row[len(slot.text_row) :] = self.pad
        score = FileScore(nll=nll, frames=frames, score_text=slot.source.text_row is not None, ttt_layers=reports)
        return ScoredFile(score=score, text_row=text_row)
