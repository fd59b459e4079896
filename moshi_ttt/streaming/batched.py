"""Many recordings at once: B slots streamed through one model, each slot taking the next file
as soon as its file ends.

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
3. decode the tokens of the slots past their delay, with only them active in Mimi (or, with
   `decode_chunk` N > 1, buffer them and decode N frames per call: the LM never reads decoded
   audio, so decoding later changes nothing upstream);
4. a slot whose last frame this was decodes what it buffered, flushes its TTT chunk, reports and
   frees itself.
So each file's tokens, audio and TTT numbers are what the single-file runner gives it, whatever
runs beside it (tested to be equal on CPU float32).

Decoded audio goes to `on_audio(key, block)` as it is produced when the caller gives one (a file
writer: memory stays flat however long the recording); otherwise it is joined into the result.

Chunked decoding (`decode_chunk` > 1, opt-in) keeps Mimi's decoder streaming, so the audio is the
frame-by-frame audio up to float rounding (~2e-7, within one 16-bit step; tokens never change;
measured in `bench/throughput.py --decode-chunk`). Slots are decoded together: when any slot has
`decode_chunk` frames buffered, every slot with frames buffered is decoded, grouped by how many
it holds (one call per group), so after its first chunk a slot decodes in step with the others.
A slot's chunk boundaries therefore follow its neighbours, and so may its audio, within that one
step. The default, one frame per step, is moshi's decode exactly and independent of neighbours.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.model import LoadedModel
from ..options import Sampling, check_seed
from .reference import Frames, StreamResult, make_lm_gen
from .sampler import StreamSampler

Key = tp.TypeVar("Key")
AudioFn = tp.Callable[[tp.Any, np.ndarray], None]  # (key, decoded 24 kHz float32 block)
FrameProgressFn = tp.Callable[[tp.Any, int, int], None]  # (key, frames done, frames total)


@dataclass
class _Slot(tp.Generic[Key]):
    """One stream of the batch and the file it is on (None while idle)."""

    key: Key | None = None
    source: Frames | None = None  # the recording's frames, read as they are streamed
    frame: np.ndarray | None = None  # the next frame, read a step ahead: None ends the file
    next_frame: int = 0  # frames streamed so far
    steps: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)
    samples: int = 0  # decoded so far
    pending_codes: list[torch.Tensor] = field(default_factory=list)  # [K, 1] each, not yet decoded
    text_tokens: list[int] = field(default_factory=list)
    text_steps: list[int] = field(default_factory=list)  # the slot's step count when each came back

    @property
    def busy(self) -> bool:
        return self.key is not None


class BatchedRunner:
    """Streams up to `batch_size` recordings at once through a loaded model."""

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int,
        seed: int = 4242,
        ttt_enabled: bool = True,
        timeline: bool = False,
        sampling: Sampling | None = None,
        counter_noise: bool | None = None,
        decode_chunk: int | None = None,
    ):
        """As `StreamingRunner`'s arguments; `counter_noise`: sample from the graph-safe counter hash
        (default: on CUDA only); `decode_chunk`: frames of tokens per Mimi decode call (default 1:
        moshi's frame-by-frame decode)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.decode_chunk = decode_chunk or 1
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
    def run(
        self,
        recordings: tp.Iterable[tuple[Key, np.ndarray | Frames]],
        on_audio: AudioFn | None = None,
        progress: FrameProgressFn | None = None,
    ) -> tp.Iterator[tuple[Key, StreamResult]]:
        """Yield `(key, result)` for every recording as soon as it is done (completion order).

        Recordings are pulled from `recordings` only when a slot frees, so at most `batch_size`
        are held at once. With `on_audio`, decoded audio goes there block by block and results
        carry none (`pcm` empty, `samples` counted); `progress` hears each slot's frames.
        """
        mimi, lm_gen = self.model.mimi, self.lm_gen
        pending = iter(recordings)
        slots: list[_Slot] = [_Slot() for _ in range(self.batch_size)]
        size = mimi.frame_size
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
                        source = item[1] if isinstance(item[1], Frames) else Frames.of(item[1], mimi.frame_size)
                        slots[index] = _Slot(key=item[0], source=source, frame=next(source, None))
                        starting[index] = True
                if any(starting):
                    mask = self._mask(starting)
                    mimi.reset_streaming(mask)
                    lm_gen.reset_streaming(mask)  # its callback resets the LM, TTT fast weights included
                    for index in np.flatnonzero(starting):
                        self.sampler.reseed(int(index), self.seed)
                # A file shorter than one frame has nothing to stream: done at once, as alone.
                empty = [index for index, slot in enumerate(slots) if slot.busy and slot.frame is None]
                if empty:
                    for index in empty:
                        yield slots[index].key, self._finish(index, slots[index])
                        slots[index] = _Slot()
                    continue
                active = [slot.busy for slot in slots]
                if not any(active):
                    return
                batch = np.zeros((self.batch_size, 1, size), dtype=np.float32)
                for index, slot in enumerate(slots):
                    if slot.busy:
                        batch[index, 0] = slot.frame
                mimi.set_exec_mask(self._mask(active))
                codes = mimi.encode(torch.from_numpy(batch).to(self.model.device))  # one copy per step
                tokens = self._step(codes, active)
                first = [slot.busy and slot.next_frame == 0 for slot in slots]
                if any(first):  # the first frame is stepped twice, for those slots only
                    again = self._step(codes, first)
                    tokens = torch.where(self._mask(first)[:, None, None], again, tokens)
                for slot, on in zip(slots, active):
                    slot.steps += on + (slot.busy and slot.next_frame == 0)
                ready = [slot.busy and slot.steps > lm_gen.max_delay for slot in slots]
                if any(ready):
                    text = tokens[:, 0, 0].tolist()
                    for index in np.flatnonzero(ready):
                        slot = slots[index]
                        slot.pending_codes.append(tokens[index, 1:].clone())  # a graph may reuse `tokens`
                        slot.text_tokens.append(int(text[index]))
                        slot.text_steps.append(slot.steps)
                for slot in slots:
                    if slot.busy:
                        slot.next_frame += 1
                        slot.frame = next(tp.cast(Frames, slot.source), None)
                ending = [slot.busy and slot.frame is None for slot in slots]
                if any(ending) or any(len(slot.pending_codes) >= self.decode_chunk for slot in slots):
                    self._decode(slots, on_audio)
                for index, slot in enumerate(slots):
                    if slot.busy and progress is not None:
                        progress(slot.key, slot.next_frame, max(slot.next_frame, tp.cast(Frames, slot.source).expected))
                    if ending[index]:
                        yield slot.key, self._finish(index, slot)
                        slots[index] = _Slot()

    def _decode(self, slots: list[_Slot], on_audio: AudioFn | None) -> None:
        """Decode every slot's buffered tokens, one Mimi call per group of slots holding as many
        frames (the others masked; their rows are zeros and their state does not move)."""
        mimi, lm = self.model.mimi, self.model.lm
        lengths = sorted({len(slot.pending_codes) for slot in slots if slot.pending_codes})
        for length in lengths:
            group = [len(slot.pending_codes) == length for slot in slots]
            codes = torch.zeros(self.batch_size, lm.dep_q, length, dtype=torch.long, device=self.model.device)
            for index in np.flatnonzero(group):
                codes[index] = torch.cat(slots[index].pending_codes, dim=-1)
                slots[index].pending_codes = []
            # Rows still in their delay are `ungenerated`: never decoded, but keep Mimi's lookup in range.
            codes = torch.where(codes == lm.ungenerated_token_id, 0, codes)
            mimi.set_exec_mask(self._mask(group))
            pcm = mimi.decode(codes).float().cpu().numpy()
            for index in np.flatnonzero(group):
                slot = slots[index]
                slot.samples += pcm.shape[-1]
                if on_audio is not None:
                    on_audio(slot.key, pcm[index, 0])
                else:
                    slot.pcm.append(pcm[index, 0])

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
        return StreamResult(
            pcm=audio,
            samples=slot.samples,
            text_tokens=slot.text_tokens,
            text_steps=slot.text_steps,
            max_delay=int(self.lm_gen.max_delay),
            frames=slot.next_frame,
            steps=slot.steps,
            ttt_layers=reports,
        )
