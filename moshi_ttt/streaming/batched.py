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

A failure of one file stays in its slot: when its `on_audio` raises (disk full) the slot is freed
at once, in the step it happened, and when its TTT fast weights became NaN/Inf (a per-stream
flag kept on the device at commit time, read when the file ends) its file ends with that; `run`
yields `(key, StreamFailure)` for it and the other slots never notice. A slot's attention caches
are zeroed whenever it takes a file (a reset only moves their positions back, and a masked NaN a
diverged file left there would still poison attention: 0 * NaN), so no file inherits anything
from the one before it. A failure of a batched step (out of memory) is every busy slot's: it
leaves `run`, whose streaming state is then left cleanly, so the caller can start a fresh batch.

Chunked decoding (`decode_chunk` > 1, opt-in) keeps Mimi's decoder streaming, so the audio is the
frame-by-frame audio up to float rounding (~2e-7, within one 16-bit step; tokens never change;
measured in `bench/throughput.py --decode-chunk`). Slots are decoded together: when any slot has
`decode_chunk` frames buffered, every slot with frames buffered is decoded, grouped by how many
it holds (one call per group), so after its first chunk a slot decodes in step with the others.
A slot's chunk boundaries therefore follow its neighbours, and so may its audio, within that one
step. The default, one frame per step, is moshi's decode exactly and independent of neighbours.
"""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.model import LoadedModel
from ..errors import stops_the_run
from ..options import Sampling, check_seed
from .reference import Frames, StreamResult, make_lm_gen
from .sampler import StreamSampler

Key = tp.TypeVar("Key")
AudioFn = tp.Callable[[tp.Any, np.ndarray], None]  # (key, decoded 24 kHz float32 block)
FrameProgressFn = tp.Callable[[tp.Any, int, int], None]  # (key, frames done, frames total)


@dataclass
class StreamFailure:
    """What `BatchedRunner.run` yields for a recording it could not finish, in place of its
    `StreamResult`: the exception that ended it (its `on_audio` raised, or its TTT fast weights
    became NaN/Inf). Only its slot was affected."""

    error: BaseException


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
    failure: BaseException | None = None  # its on_audio raised: the slot is freed after this step

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
    ) -> tp.Iterator[tuple[Key, StreamResult | StreamFailure]]:
        """Yield `(key, result)` for every recording as soon as it is done (completion order), a
        `StreamFailure` for one whose `on_audio` raised or whose TTT weights became NaN/Inf.

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
        with streaming(mimi, self.batch_size), streaming(lm_gen, self.batch_size), self.sampler.installed():
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
                    scrub_attention_caches((self.model.lm, self.model.mimi), np.flatnonzero(starting))
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
                    if slot.failure is not None:  # its audio could not be taken: free the slot now
                        yield slot.key, StreamFailure(slot.failure)
                        slots[index] = _Slot()
                        continue
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
                if on_audio is None:
                    slot.pcm.append(pcm[index, 0])
                elif slot.failure is None:
                    try:
                        on_audio(slot.key, pcm[index, 0])
                    except BaseException as exc:  # this file's sink failed (disk full): this file only
                        if stops_the_run(exc):
                            raise
                        slot.failure = exc

    def _step(self, codes: torch.Tensor, active: list[bool]) -> torch.Tensor:
        """One LM step for the `active` streams; the TTT layers hear which ones consumed a token."""
        self.lm_gen.set_exec_mask(self._mask(active))
        self.sampler.active = active
        tokens = self.lm_gen.step(codes)
        self.controller.after_step(active)
        return tokens

    def _finish(self, index: int, slot: _Slot) -> StreamResult | StreamFailure:
        """The slot's file is done: flush its TTT chunk and collect its numbers; a `StreamFailure`
        where its fast weights became NaN/Inf (the layer's report says which, and when)."""
        try:
            self.controller.flush([index])
            reports = self.controller.reports(index) if self.controller else []
        except BaseException as exc:
            if stops_the_run(exc):
                raise
            return StreamFailure(exc)
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


def scrub_attention_caches(modules: tp.Iterable[tp.Any], rows: tp.Iterable[int]) -> None:
    """Zero `rows` of every attention cache below `modules` as those streams take new files.
    moshi's reset only moves the cache positions back, and attention reads the stale entries
    with weight 0: harmless when they are finite (so outputs do not change), NaN when a file
    whose TTT weights diverged left NaN/Inf there. In place, so a captured CUDA graph keeps
    its tensors.

    moshi adapter, checked against moshi 0.2.13: `_MHAState.kv_cache` is a `RingKVCache` whose
    `cache` is `[2, B, heads, capacity, dim]` (B rows: LMGen runs without CFG here)."""
    ids = [int(row) for row in rows]
    for root in modules:
        for module in root.modules():
            cache = getattr(getattr(module, "_streaming_state", None), "kv_cache", None)
            if cache is not None:
                for index in ids:
                    cache.cache[:, index].zero_()


@contextlib.contextmanager
def streaming(module: tp.Any, batch_size: int) -> tp.Iterator[None]:
    """`module.streaming(batch_size)`, left cleanly even when entering it fails part way.

    moshi adapter, checked against moshi 0.2.13: `StreamingModule.streaming` gives its streaming
    submodules their states one after another (LMGen's enters its detached LM's inside its own) and
    registers the undo only once all have one, so an allocation failing half way (out of memory at
    a large batch) would leave the first ones streaming, and the next batch would die with
    "... is already streaming!". On such a failure every streaming module below `module` is stopped."""
    from moshi.modules.streaming import StreamingModule

    try:
        stack = module.streaming(batch_size)
    except BaseException:
        for child in module.modules():
            if isinstance(child, StreamingModule):
                child._streaming_state = None
        raise
    with stack:
        yield
