"""Moshi's frame-by-frame streaming loop over one recording, with TTT layers driven between steps.

The loop is `moshi/run_inference.py`'s (batch size 1): full Mimi frames only (a trailing
partial frame is dropped), the first frame stepped twice (at offset 0 LMGen replaces its input by
the initial tokens), `LMGen.step` returning None for the first `max(delays)` steps. On top of it,
per file: RNG reseeded, fresh streaming state (new KV caches; TTT fast weights back to the
checkpoint's), one `TTTController.after_step()` per step, and `flush()` at end of file.

`StreamingRunner` is that loop for one recording, kept as the reference: it is tested equal to
moshi's own `InferenceState`, and `batched.BatchedRunner` (what runs are made of, at any batch
size) is tested equal to it bit for bit at one slot. The text helpers below serve both.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.model import LoadedModel
from ..options import Sampling, check_seed
from ..report.schema import LayerReport
from .transcripts import TimedWord, timed_words

ProgressFn = tp.Callable[[int, int], None]  # (frames done, frames total)


@dataclass
class StreamResult:
    pcm: np.ndarray  # 24 kHz mono float32
    text_tokens: list[int]
    # For each text token, the LMGen step (1-based count of steps so far) that returned it.
    text_steps: list[int]
    max_delay: int  # LMGen's max(delays): steps that returned None before the first token
    frames: int  # input frames streamed
    steps: int  # LMGen steps = tokens seen by every TTT layer
    ttt_layers: list[LayerReport] = field(default_factory=list)
    # Decoded samples; equals len(pcm) unless the audio went to a writer as it was decoded.
    samples: int = -1

    def __post_init__(self) -> None:
        if self.samples < 0:
            self.samples = len(self.pcm)


def split_frames(pcm: np.ndarray, frame_size: int) -> list[np.ndarray]:
    """The full frames of `pcm`, [frame_size] each (views: nothing is copied, and a recording goes
    to the device one frame per step, so device memory does not grow with its length); a trailing
    partial frame is dropped, as moshi's `run_inference` does."""
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    return [pcm[i : i + frame_size] for i in range(0, len(pcm) - frame_size + 1, frame_size)]


class Frames:
    """A recording's frames as they are read ([frame_size] float32 each, or [C, frame_size]), and
    how many its header promises (for progress; the frames themselves decide where it ends)."""

    def __init__(self, frames: tp.Iterable[np.ndarray], expected: int):
        self._frames = iter(frames)
        self.expected = expected

    @classmethod
    def of(cls, pcm: np.ndarray, frame_size: int) -> Frames:
        """A whole recording in memory, split as `split_frames` splits it."""
        frames = split_frames(pcm, frame_size)
        return cls(frames, len(frames))

    def __iter__(self) -> Frames:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._frames)


def make_lm_gen(
    model: LoadedModel, batch_size: int, sampling: Sampling | None, **kwargs: tp.Any
) -> tuple[tp.Any, dict]:
    """moshi's `LMGen` for `batch_size` streams, and the sampling settings it uses: the run's
    controls over the checkpoint's `lm_gen_config`, key by key."""
    from moshi.models import LMGen
    from moshi.run_inference import get_condition_tensors

    info = model.checkpoint_info
    config = (sampling or Sampling()).apply(info.lm_gen_config)
    condition_tensors = get_condition_tensors(info.model_type, model.lm, batch_size, 1.0)
    return LMGen(model.lm, cfg_coef=1.0, condition_tensors=condition_tensors, **config, **kwargs), config


class StreamingRunner:
    """Runs recordings through a loaded model, one at a time, each independent of the others."""

    def __init__(
        self,
        model: LoadedModel,
        seed: int = 4242,
        ttt_enabled: bool = True,
        timeline: bool = False,
        sampling: Sampling | None = None,
    ):
        self.model = model
        self.seed = check_seed(seed)
        self.lm_gen, self.lm_gen_config = make_lm_gen(model, 1, sampling)
        self.controller = model.controller()
        self.ttt_enabled = ttt_enabled
        self.timeline = timeline  # record every TTT update in the layer reports (--timeline)

    @torch.no_grad()
    def run(self, pcm: np.ndarray, progress: ProgressFn | None = None) -> StreamResult:
        from moshi.run_inference import seed_all

        mimi, lm_gen = self.model.mimi, self.lm_gen
        # Samples per LM step: 1920 at 24 kHz / 12.5 Hz.
        frames = split_frames(pcm, mimi.frame_size)
        out_pcm: list[np.ndarray] = []
        text_tokens: list[int] = []
        text_steps: list[int] = []
        steps = 0
        # Seed after loading and right before streaming, so a file's output does not depend on
        # anything that ran before it.
        seed_all(self.seed)
        # Per run, not per runner: several runners may share one loaded model.
        self.controller.set_frozen(not self.ttt_enabled)
        self.controller.set_timeline(self.timeline)
        with mimi.streaming(1), lm_gen.streaming(1):
            for index, frame in enumerate(frames):
                codes = mimi.encode(torch.from_numpy(frame).to(self.model.device)[None, None])
                for _ in range(2 if index == 0 else 1):
                    tokens = lm_gen.step(codes)
                    steps += 1
                    self.controller.after_step()
                if tokens is not None:
                    out_pcm.append(mimi.decode(tokens[:, 1:]).float().cpu().numpy()[0, 0])
                    text_tokens.append(int(tokens[0, 0].item()))
                    text_steps.append(steps)
                if progress is not None:
                    progress(index + 1, len(frames))
            self.controller.flush()
            reports = self.controller.reports()
        audio = np.concatenate(out_pcm) if out_pcm else np.zeros(0, dtype=np.float32)
        return StreamResult(
            pcm=audio,
            text_tokens=text_tokens,
            text_steps=text_steps,
            max_delay=int(lm_gen.max_delay),
            frames=len(frames),
            steps=steps,
            ttt_layers=reports,
        )

    def transcript(self, text_tokens: tp.Iterable[int]) -> str:
        return transcript_of(self.model, text_tokens)

    def timed_words(self, streamed: StreamResult) -> list[TimedWord]:
        return timed_words_of(self.model, streamed)


def text_pieces(model: LoadedModel, text_tokens: tp.Iterable[int]) -> list[str | None]:
    """Each text token's sentencepiece piece; None for padding and control tokens."""
    lm = model.lm
    skip = {lm.text_padding_token_id, lm.end_of_text_padding_id}
    tokenizer = model.text_tokenizer
    return [
        tokenizer.id_to_piece(t)
        if t not in skip and t < tokenizer.vocab_size() and not tokenizer.is_control(t)
        else None
        for t in text_tokens
    ]


def transcript_of(model: LoadedModel, text_tokens: tp.Iterable[int]) -> str:
    """Moshi's text stream as words, padding tokens dropped (as run_inference prints it)."""
    return "".join(p for p in text_pieces(model, text_tokens) if p).replace("\u2581", " ").strip()


def timed_words_of(model: LoadedModel, streamed: StreamResult) -> list[TimedWord]:
    """The words of `streamed`'s text stream with their times (see `transcripts`)."""
    return timed_words(text_pieces(model, streamed.text_tokens), streamed.text_steps, streamed.max_delay)
