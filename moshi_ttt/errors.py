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
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)[:300]


def failure_reason(exc: BaseException) -> str:
    """What a report says of a file's failure: our own errors say it already; a crash of a native
    decoder (a Rust panic surfaces as pyo3's `PanicException`) or running out of memory is named as
    such, in one line."""
    if isinstance(exc, MoshiTTTError):
        return exc.reason
    if type(exc).__name__ == "PanicException":  # pyo3_runtime's, a BaseException: not importable by name
        return f"a native library crashed ({os_reason(exc)})"[:300]
    if isinstance(exc, MemoryError):
        return f"out of memory ({os_reason(exc)})"[:300]
    return os_reason(exc)


def stops_the_run(exc: BaseException) -> bool:
    """Whether `exc` ends the whole run rather than one file: an interrupt (Ctrl-C, SIGTERM), an
    exit, or a generator being closed. Anything else that happens while a file is read, streamed or
    written is that file's failure (`failure_reason`), a Rust panic or an out-of-memory included."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))
