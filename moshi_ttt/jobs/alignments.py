"""The text row of a recording, built from its moshi-finetune alignment file.

moshi-finetune trains on `NAME.wav` + `NAME.json`, the JSON holding
`{"alignments": [[word, [start_s, end_s], speaker], ...]}` (what its `annotate.py` writes, every
word labelled `SPEAKER_MAIN`). Its `Interleaver` (`finetune/data/interleaver.py`, built in
`train.py` with `keep_main_only=True`, the LM's text padding / end-of-padding ids, frame rate
12.5 Hz) turns that into one text token per audio frame; `text_row` follows the same rules:

1. words sorted by start time (a stable sort), each tokenized on its own (`word.strip()`, lines
   encoded separately and joined by the newline piece, no BOS);
2. only the main speaker's words kept, then only words with start < end;
3. frame t takes every word with `start * frame_rate < t + 1` not taken yet (so a word lands on
   frame floor(start * frame_rate), or later if an earlier one is still being written); a newly
   taken word *replaces* the tokens still waiting from the previous one (they are dropped);
4. while tokens wait, frame t gets the next one, and if frame t-1 holds padding (PAD, or the
   in-word padding, which is PAD too by default) it becomes EPAD (end of padding: "a word
   starts next frame"); otherwise frames up to int(end * frame_rate) of the last word taken get
   the in-word padding, and the rest stay PAD.
The row has one token per frame scored, T (the recording's full frames). moshi-finetune builds
a segment's row the same way over the segment's frames (its `prepare_item` is handed the frame
count where a duration is expected, so it builds a 12.5x longer row and crops it: the kept
frames are the same, except that a word starting at frame T would turn frame T-1 into EPAD
there; here words past the last frame are simply not in the row).
"""

from __future__ import annotations

import json
import math
import typing as tp
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MoshiTTTError

MAIN_SPEAKER = "SPEAKER_MAIN"  # moshi-finetune's `main_speaker_label`
FRAME_RATE = 12.5  # Mimi frames per second


@dataclass(frozen=True)
class AlignedWord:
    word: str
    start: float  # seconds
    end: float
    speaker: str


def alignment_path(audio: str | Path) -> Path:
    """`NAME.json` beside `NAME.wav` (moshi-finetune: the audio path's extension replaced)."""
    return Path(audio).with_suffix(".json")


def parse_alignments(data: tp.Any, source: str | Path | None = None) -> list[AlignedWord]:
    """The `alignments` of a loaded alignment JSON, checked entry by entry."""
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise MoshiTTTError('an alignment file must hold {"alignments": [[word, [start, end], speaker], ...]}', source)
    words = []
    for index, entry in enumerate(data["alignments"]):
        try:
            word, (start, end), speaker = entry
        except (TypeError, ValueError):
            word = start = end = speaker = None
        if not (
            isinstance(word, str)
            and isinstance(speaker, str)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (start, end))
        ):
            raise MoshiTTTError(
                f"alignment {index} is not [word, [start, end], speaker]: {json.dumps(entry)[:120]}", source
            )
        start, end = float(start), float(end)
        if not (math.isfinite(start) and math.isfinite(end)):
            raise MoshiTTTError(f"alignment {index} ({word!r}) has a non-finite time", source)
        words.append(AlignedWord(word, start, end, speaker))
    return words


def read_alignments(path: str | Path) -> list[AlignedWord]:
    """The words of an alignment file (see `parse_alignments`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoshiTTTError(f"cannot read the alignment file ({type(exc).__name__}: {exc})", path) from None
    return parse_alignments(data, path)


def word_tokens(tokenizer: tp.Any, word: str) -> list[int]:
    """A word's text tokens as moshi-finetune's `tokenize(tokenizer, word.strip(), bos=False)`
    gives them: each line encoded on its own, lines joined by the newline piece."""
    lines = tokenizer.encode(word.strip().split("\n"))
    tokens = list(lines[0])
    if len(lines) > 1:
        newline = tokenizer.encode("\n")[-1]
        for line in lines[1:]:
            tokens += [newline, *line]
    return tokens


def text_row(
    words: tp.Iterable[AlignedWord],
    frames: int,
    tokenizer: tp.Any,
    *,
    text_padding: int,
    end_of_text_padding: int,
    frame_rate: float = FRAME_RATE,
    main_speaker: str = MAIN_SPEAKER,
    in_word_padding: int | None = None,
) -> np.ndarray:
    """The text row [frames] int64 of a recording with these aligned words (rules: module doc).

    `text_padding` / `end_of_text_padding`: the LM's `text_padding_token_id` (PAD, 3) and
    `end_of_text_padding_id` (EPAD, 0); `in_word_padding` defaults to PAD, as in training.
    """
    in_word = text_padding if in_word_padding is None else in_word_padding
    ordered = sorted(words, key=lambda w: w.start)
    kept = [(word_tokens(tokenizer, w.word), w) for w in ordered if w.speaker == main_speaker]
    kept = [(tokens, w) for tokens, w in kept if w.start < w.end]

    row = [text_padding] * frames
    waiting: deque[int] = deque()
    next_word = 0
    last_word_end = -1  # frame index up to which the latest word's in-word padding runs
    for t in range(frames):
        while next_word < len(kept) and kept[next_word][1].start * frame_rate < t + 1:
            tokens, w = kept[next_word]
            waiting = deque(tokens)  # replaces whatever the previous word had left
            last_word_end = int(w.end * frame_rate)
            next_word += 1
        if waiting:
            if t > 0 and row[t - 1] in (text_padding, in_word):
                row[t - 1] = end_of_text_padding
            row[t] = waiting.popleft()
        elif t <= last_word_end:
            row[t] = in_word
    return np.asarray(row, dtype=np.int64)


def text_row_for(
    model: tp.Any, words: tp.Iterable[AlignedWord], frames: int, main_speaker: str = MAIN_SPEAKER
) -> np.ndarray:
    """`text_row` with a loaded model's tokenizer, padding ids and Mimi frame rate."""
    lm = model.lm
    frame_rate = float(getattr(model.mimi, "frame_rate", FRAME_RATE)) if model.mimi is not None else FRAME_RATE
    return text_row(
        words,
        frames,
        model.text_tokenizer,
        text_padding=lm.text_padding_token_id,
        end_of_text_padding=lm.end_of_text_padding_id,
        frame_rate=frame_rate,
        main_speaker=main_speaker,
    )
