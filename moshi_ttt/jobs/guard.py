"""What a run checks and holds before it loads anything: sources it must never write, places it
must be able to write, and a lock so that two runs never share one output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
import typing as tp
from pathlib import Path

from ..errors import MoshiTTTError

LOCK_NAME = ".moshi-ttt.lock"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()  # follows links: a link to a source is that source
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_sources_untouched(sources: tp.Iterable[Path], writes: tp.Iterable[Path]) -> None:
    """Refuse any path we would write (outputs, transcripts, the report) that is one of the
    sources, by file identity, so links and `./x` vs `x` spellings cannot slip through."""
    protected = {key: path for path in sources if (key := _identity(path)) is not None}
    for path in writes:
        key = _identity(path)
        if key is not None and key in protected:
            raise MoshiTTTError(
                f"would overwrite the input {protected[key]}; sources are never written, choose another output", path
            )


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str) -> None:
    """Check that `folder` (which may not exist yet) can be created and written, without
    creating it: its nearest existing ancestor must be a folder we can create a file in."""
    anchor = nearest_existing(folder)
    if not anchor.is_dir():
        raise MoshiTTTError(f"cannot write the {what} here: {anchor} is a file, not a folder", folder)
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".moshi-ttt-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MoshiTTTError(f"cannot write the {what} in {anchor}: {exc.strerror or exc}", folder) from None


class OutputLock:
    """An exclusive `flock` on a lock file inside the output folder, held for the whole run.

    The kernel drops a flock when its holder dies, however it dies, so a lock file left by a
    killed run is stale and simply taken over. The file records who holds it, for the refusal
    message, and is removed on release (with the folders this lock had to create, if empty).
    """

    def __init__(self, folder: Path, name: str = LOCK_NAME):
        self.folder = folder
        self.path = folder / name
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> OutputLock:
        missing = []
        for parent in [self.folder, *self.folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                self._remove_created()
                raise MoshiTTTError(
                    f"in use by another moshi-ttt run ({holder}); wait for it to end or choose another output",
                    self.folder,
                ) from None
            # The holder we waited for may have removed the file just before we locked it:
            # then our lock is on a file nobody else will open. Start again on the new one.
            if _identity(self.path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked, so nobody locks the file being removed
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run that never started leaves nothing behind

    def __enter__(self) -> OutputLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: tp.Any) -> None:
        self.release()
