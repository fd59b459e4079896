"""Errors the tool reports to users as one line: which file, and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


def printable(text: str) -> str:
    """`text` with control characters (newlines, terminal escape codes, undecodable bytes) written
    as escapes, so a file name can neither break a one-line message nor drive the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class MoshiTTTError(Exception):
    """A user-facing error. `str()` is a single line naming the file (if any) and the reason."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = " ".join(str(reason).split())  # keep it on one line
        self.path = None if path is None else printable(str(path))
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")


class CheckpointError(MoshiTTTError):
    """A checkpoint or its config is missing, malformed or inconsistent."""


class AudioError(MoshiTTTError):
    """An input recording cannot be read or is unusable."""


class AudioTooShortError(AudioError):
    """A recording holds less than one frame: nothing to stream, not a failure of the file."""


class StreamingError(MoshiTTTError):
    """The streaming loop was driven in a way the TTT layers cannot support."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type where it has none), at most 300 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def os_reason(exc: BaseException) -> str:
    """A one-line reason for an exception that is not ours: its type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def failure_reason(exc: BaseException) -> str:
    """What a report says of a file's failure: our own errors say it already."""
    return exc.reason if isinstance(exc, MoshiTTTError) else os_reason(exc)
