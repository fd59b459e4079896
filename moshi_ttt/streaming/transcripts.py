"""Moshi's text stream with times: words with start and end in seconds, as JSONL or SRT.

When a text token is about (the derivation, from moshi 0.2.13's `LMGen._step`): every stream k
is stored in LMGen's cache delayed by `delays[k]`, so cache position p of stream k holds time
p - delays[k]. The step that makes `offsets` equal n (1-based count of steps) returns, for each
generated stream k, cache position n - max_delay + delays[k], i.e. time n - max_delay for text
and audio alike: the returned frame is undelayed and aligned. The user's frame fed at offset o
is written at o + delay, i.e. time o. The runner feeds the first input frame twice (offsets 0
and 1; at offset 0 LMGen replaces it by its initial tokens), so time t >= 1 is input frame t - 1.
Hence the token returned at step n describes input frame n - max_delay - 1: seconds
[(n - max_delay - 1) * 0.08, (n - max_delay) * 0.08), the same span as the output audio frame
decoded from that step (the j-th token returned, j from 0, lies at [j * 0.08, (j + 1) * 0.08)).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..jobs.files import FRAME_SIZE, SAMPLE_RATE

FRAME_S = FRAME_SIZE / SAMPLE_RATE  # 80 ms: one LMGen step
TEXT_FORMATS = ("txt", "jsonl", "srt")
WORD_START = "\u2581"  # sentencepiece's word-boundary mark
# SRT cues: at most this many characters, a new cue after a pause this long or a sentence's end.
SRT_MAX_CHARS = 42
SRT_MAX_GAP_S = 1.0


def token_span(step: int, max_delay: int) -> tuple[float, float]:
    """Seconds of the input (and of the output audio) the text token returned at LMGen step
    `step` (1-based) describes; see the module docstring."""
    frame = step - max_delay - 1
    return frame * FRAME_S, (frame + 1) * FRAME_S


@dataclass
class TimedWord:
    text: str
    start: float
    end: float


def timed_words(pieces: list[str | None], steps: list[int], max_delay: int) -> list[TimedWord]:
    """Words from the text stream's pieces (None: padding or control, no text) and the steps that
    returned them: a piece starting with the word mark begins a word, others extend it."""
    words: list[TimedWord] = []
    for piece, step in zip(pieces, steps):
        if not piece:
            continue
        start, end = token_span(step, max_delay)
        if piece.startswith(WORD_START) or not words:
            words.append(TimedWord(piece.replace(WORD_START, " ").strip(), start, end))
        else:
            words[-1].text += piece.replace(WORD_START, " ")
            words[-1].end = end
    return [w for w in words if w.text]


def as_jsonl(words: list[TimedWord]) -> str:
    return "".join(
        json.dumps({**asdict(w), "start": round(w.start, 3), "end": round(w.end, 3)}, ensure_ascii=False) + "\n"
        for w in words
    )


def _srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt_cues(words: list[TimedWord]) -> list[TimedWord]:
    """Words grouped into readable subtitle lines: a new line when the current one would grow
    past `SRT_MAX_CHARS`, after a pause longer than `SRT_MAX_GAP_S`, or after a sentence's end."""
    cues: list[TimedWord] = []
    for word in words:
        last = cues[-1] if cues else None
        if (
            last is None
            or len(last.text) + 1 + len(word.text) > SRT_MAX_CHARS
            or word.start - last.end > SRT_MAX_GAP_S
            or last.text.endswith((".", "?", "!"))
        ):
            cues.append(TimedWord(word.text, word.start, word.end))
        else:
            last.text += " " + word.text
            last.end = word.end
    return cues


def as_srt(words: list[TimedWord]) -> str:
    return "\n".join(
        f"{i}\n{_srt_time(c.start)} --> {_srt_time(c.end)}\n{c.text}\n" for i, c in enumerate(srt_cues(words), start=1)
    )


def render_transcript(text_format: str, transcript: str, words: list[TimedWord]) -> str:
    """A transcript file's content in `text_format` (txt: the words only, as before)."""
    if text_format == "jsonl":
        return as_jsonl(words)
    if text_format == "srt":
        return as_srt(words)
    return transcript + "\n"
