"""Many recordings at once: B slots streamed through one model, each slot taking the next file
as soon as its file ends (issue 12).

Every slot is an independent stream of the batch, with moshi's own machinery for desynchronised
streams: `set_exec_mask` (a masked stream's state does not move), `reset_streaming(reset_mask)`
(KV caches, Mimi state and, through LMGen's reset callback, the TTT fast weights of exactly the
masked streams), and `LMGen(support_out_of_sync=True)` (every step returns tokens; rows still in
their delay or masked are `ungenerated_token_id`). Per stream on top of that: sampling from the
stream's own generator reseeded at file start (`stream_sampling.StreamSampler`), and TTT commits and
flushes driven per stream (`TTTController.after_step(active)`, `flush([slot])`).

The schedule per 80 ms step, as the single-file runner does it for one file:
1. encode the next frame of every slot that has one (idle slots are masked);
2. one LM step for those slots; slots on their file's first frame step it a second time, with
   only them active (moshi's `run_inference` steps the first frame twice);
3. decode the tokens of the slots past their delay, with only them active in Mimi;
4. a slot whose last frame this was flushes its TTT chunk, reports and frees itself.
So each file's tokens, audio and TTT numbers are what the single-file runner gives it, whatever
runs beside it (tested to be equal on CPU float32).
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from .model import LoadedModel
from .runner import StreamResult, check_seed, make_lm_gen, split_frames
from .sampling import Sampling
from .stream_sampling import StreamSampler

Key = tp.TypeVar("Key")


@dataclass
class _Slot(tp.Generic[Key]):
    """One stream of the batch and the file it is on (None while idle)."""

    key: Key | None = None
    frames: list[torch.Tensor] = field(default_factory=list)
    next_frame: int = 0
    steps: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    text_steps: list[int] = field(default_factory=list)  # the slot's step count when each came back

    @property
    def busy(self) -> bool:
        return self.key is not None


class BatchedRunner:
    """Streams up to `batch_size` recordings at once through a loaded model."""

    def __init__(self, model: LoadedModel, batch_size: int, seed: int = 4242, ttt_enabled: bool = True,
                 timeline: bool = False, sampling: Sampling | None = None, counter_noise: bool | None = None):
        """As `StreamingRunner`'s arguments; `counter_noise`: sample from the graph-safe counter hash
        (default: on CUDA only)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.seed = check_seed(seed)
        self.lm_gen, self.lm_gen_config = make_lm_gen(model, batch_size, sampling, support_out_of_sync=True)
        self.controller = model.controller()
        self.ttt_enabled = ttt_enabled
        self.timeline = timeline
        self.sampler = StreamSampler(batch_size, model.device, counter_noise)

    def _mask(self, rows: tp.Iterable[bool]) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.bool, device=self.model.device)

    @torch.no_grad()
    def run(self, recordings: tp.Iterable[tuple[Key, np.ndarray]]) -> tp.Iterator[tuple[Key, StreamResult]]:
        """Yield `(key, result)` for every recording as soon as it is done (completion order)."""
        mimi, lm_gen, lm = self.model.mimi, self.lm_gen, self.model.lm
        pending = iter(recordings)
        slots: list[_Slot] = [_Slot() for _ in range(self.batch_size)]
        size = mimi.frame_size
        ungenerated = lm.ungenerated_token_id
        self.controller.set_frozen(not self.ttt_enabled)
        self.controller.set_timeline(self.timeline)
        with mimi.streaming(self.batch_size), lm_gen.streaming(self.batch_size), self.sampler.installed():
            exhausted = False
            while True:
                # Free slots take the next files.
                starting = [False] * self.batch_size
                for index, slot in enumerate(slots):
                    if not slot.busy and not exhausted:
                        item = next(pending, None)
                        if item is None:
                            exhausted = True
                            continue
                        slots[index] = _Slot(key=item[0], frames=split_frames(item[1], mimi.frame_size, self.model.device))
                        starting[index] = True
                if any(starting):
                    mask = self._mask(starting)
                    mimi.reset_streaming(mask)
                    lm_gen.reset_streaming(mask)  # its callback resets the LM, TTT fast weights included
                    for index in np.flatnonzero(starting):
                        self.sampler.reseed(int(index), self.seed)
                # A file shorter than one frame has nothing to stream: done at once, as alone.
                empty = [index for index, slot in enumerate(slots) if slot.busy and not slot.frames]
                if empty:
                    for index in empty:
                        yield slots[index].key, self._finish(index, slots[index])
                        slots[index] = _Slot()
                    continue
                active = [slot.busy for slot in slots]
                if not any(active):
                    return
                batch = torch.zeros(self.batch_size, 1, size, device=self.model.device)
                for index, slot in enumerate(slots):
                    if slot.busy:
                        batch[index, 0] = slot.frames[slot.next_frame]
                mimi.set_exec_mask(self._mask(active))
                codes = mimi.encode(batch)
                tokens = self._step(codes, active)
                first = [slot.busy and slot.next_frame == 0 for slot in slots]
                if any(first):  # the first frame is stepped twice, for those slots only
                    again = self._step(codes, first)
                    tokens = torch.where(self._mask(first)[:, None, None], again, tokens)
                for slot, on in zip(slots, active):
                    slot.steps += on + (slot.busy and slot.next_frame == 0)
                ready = [slot.busy and slot.steps > lm_gen.max_delay for slot in slots]
                if any(ready):
                    mimi.set_exec_mask(self._mask(ready))
                    audio_codes = torch.where(tokens[:, 1:] == ungenerated, 0, tokens[:, 1:])
                    pcm = mimi.decode(audio_codes).float().cpu().numpy()
                    text = tokens[:, 0, 0].tolist()
                    for index in np.flatnonzero(ready):
                        slots[index].pcm.append(pcm[index, 0])
                        slots[index].text_tokens.append(int(text[index]))
                        slots[index].text_steps.append(slots[index].steps)
                for index, slot in enumerate(slots):
                    if not slot.busy:
                        continue
                    slot.next_frame += 1
                    if slot.next_frame == len(slot.frames):
                        yield slot.key, self._finish(index, slot)
                        slots[index] = _Slot()

    def _step(self, codes: torch.Tensor, active: list[bool]) -> torch.Tensor:
        """One LM step for the `active` streams; the TTT layers hear which ones consumed a token."""
        self.lm_gen.set_exec_mask(self._mask(active))
        self.sampler.active = active
        tokens = self.lm_gen.step(codes)
        self.controller.after_step(active)
        return tokens

    def _finish(self, index: int, slot: _Slot) -> StreamResult:
        self.controller.flush([index])
        reports = self.controller.reports(index) if self.controller else []
        audio = np.concatenate(slot.pcm) if slot.pcm else np.zeros(0, dtype=np.float32)
        return StreamResult(pcm=audio, text_tokens=slot.text_tokens, text_steps=slot.text_steps,
                            max_delay=int(self.lm_gen.max_delay), frames=len(slot.frames), steps=slot.steps,
                            ttt_layers=reports)
