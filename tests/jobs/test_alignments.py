"""Text rows from moshi-finetune alignment files: the Interleaver's rules on a hand-built alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from moshi_ttt.checkpoints.tiny import TOKENIZER_NAME
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.jobs.alignments import AlignedWord, alignment_path, read_alignments, text_row, word_tokens

PAD, EPAD = 3, 0


@pytest.fixture(scope="module")
def tokenizer(tiny_inplace):
    return spm.SentencePieceProcessor(model_file=str(tiny_inplace.base / TOKENIZER_NAME))


def test_text_row_follows_the_interleaver_rules(tokenizer, tmp_path) -> None:
    # The tiny tokenizer's pieces for the words used (checked, so the row below is by hand).
    assert word_tokens(tokenizer, "apple") == [182]
    assert word_tokens(tokenizer, " cat ") == [112]  # stripped
    assert word_tokens(tokenizer, "dog") == [125, 254, 250]
    assert word_tokens(tokenizer, "the") == [4, 5]
    M = "SPEAKER_MAIN"
    alignment = {
        "alignments": [
            # Out of order in the file: sorted by start.
            ["cat", [0.9, 1.0], M],  # 11.25 -> frame 11 (frame 10 is PAD: EPAD there)
            ["apple", [0.0, 0.2], M],  # frame 0, no EPAD before frame 0; in-word up to int(2.5) = 2
            ["telescope", [0.3, 0.5], "SPEAKER_OTHER"],  # not the main speaker: dropped
            ["butterfly", [0.4, 0.4], M],  # zero duration: dropped
            ["dog", [0.5, 1.0], M],  # 6.25 -> frames 6, 7, 8 (EPAD at 5); in-word to 12
            ["the", [1.25, 1.3], M],  # 15.6 -> frame 15 ('▁'), EPAD at 14 ...
            ["apple", [1.3, 1.5], M],  # 16.25 -> frame 16: replaces the 'the' left waiting; in-word to 18
            ["dog", [1.9, 2.2], M],  # 23.75 -> frame 23: past the 20 frames scored
        ]
    }
    path = tmp_path / "talk.json"
    path.write_text(json.dumps(alignment))
    assert alignment_path(tmp_path / "talk.wav") == path
    row = text_row(read_alignments(path), 20, tokenizer, text_padding=PAD, end_of_text_padding=EPAD)
    expected = [
        182,
        PAD,
        PAD,
        PAD,
        PAD,  # 0-4: apple, in-word padding (= PAD) to frame 2, then PAD
        EPAD,
        125,
        254,
        250,
        PAD,  # 5-9: EPAD, d o g, in-word padding
        EPAD,
        112,
        PAD,
        PAD,
        EPAD,  # 10-14: EPAD, cat, in-word to 12 (dog's end) and cat's (12), PAD, EPAD
        4,
        182,
        PAD,
        PAD,
        PAD,  # 15-19: '▁' of 'the', apple (no EPAD: frame 15 is a token), in-word to 18
    ]
    assert row.dtype == np.int64
    assert row.tolist() == expected


def test_a_word_with_a_newline_is_joined_by_the_newline_piece(tokenizer) -> None:
    newline = tokenizer.encode("\n")[-1]
    assert word_tokens(tokenizer, "apple\ncat") == [182, newline, 112]


def test_bad_alignment_files_are_refused(tmp_path) -> None:
    for content in (
        "not json",
        json.dumps({"words": []}),
        json.dumps({"alignments": [["a", [0.1], "S"]]}),
        json.dumps({"alignments": [["a", [0.1, "x"], "S"]]}),
    ):
        path = tmp_path / "bad.json"
        path.write_text(content)
        with pytest.raises(MoshiTTTError, match="bad.json"):
            read_alignments(path)


def test_the_main_speaker_can_be_named(tokenizer) -> None:
    words = [AlignedWord("cat", 0.1, 0.3, "A"), AlignedWord("apple", 0.2, 0.4, "B")]
    row = text_row(words, 6, tokenizer, text_padding=PAD, end_of_text_padding=EPAD, main_speaker="B")
    assert row.tolist() == [PAD, EPAD, 182, PAD, PAD, PAD]  # 2.5 -> frame 2; A's "cat" dropped
