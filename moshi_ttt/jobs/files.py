"""Names and writes that need no audio library: the audio formats, input channels, and files that
appear under their final name only when complete (`AtomicFile`), with recognisable temporaries.
No numpy here: the CLI imports this before anything heavy."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import typing as tp
from pathlib import Path

from ..errors import MoshiTTTError

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # 80 ms at 24 kHz: one Mimi frame, one LMGen step


# What the readers (sphn's symphonia, then libsndfile) decode; used to find inputs in folders.
AUDIO_EXTENSIONS = (
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".m4a",
    ".aac",
    ".aif",
    ".aiff",
    ".aifc",
    ".caf",
    ".au",
    ".w64",
    ".wv",
)


# Below this a file holds no usable speech, and resampling it to 24 kHz only multiplies the work
# (a 144-byte WAV at 1 Hz would become 17 minutes of audio).
MIN_SAMPLE_RATE = 4_000


# What we write, by output extension: (libsndfile format, subtype). 16-bit PCM where the container
# has a choice, as moshi writes its outputs.
OUTPUT_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".oga": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".aif": ("AIFF", "PCM_16"),
    ".aiff": ("AIFF", "PCM_16"),
    ".aifc": ("AIFF", "PCM_16"),
    ".caf": ("CAF", "PCM_16"),
    ".au": ("AU", "PCM_16"),
    ".w64": ("W64", "PCM_16"),
}


# What `--format` may name for outputs written into a folder (a single OUT file's extension may
# name any of OUTPUT_FORMATS).
FOLDER_AUDIO_FORMATS = ("wav", "flac", "ogg")
PARTIAL_SUFFIX = ".partial"


# Temporaries are `.<final name>.moshi-ttt-<pid>-<random>.partial`: hidden, beside the final name,
# unpredictable, and recognisably ours (see `is_our_temporary`).
TEMP_MARK = ".moshi-ttt-"
_TEMP_NAME = re.compile(r"\..+" + re.escape(TEMP_MARK) + r"(\d+)-[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX))


# --channel: an index, or a name. moshi-finetune's dialogues are stereo with Moshi on the left and
# the user on the right.
CHANNEL_NAMES = {"left": 0, "right": 1}
MIX = "mix"


def parse_channel(text: str | int | None) -> int | str | None:
    """--channel N|left|right|mix as an index or "mix"; None is the default (channel 0, with a
    warning where that choice matters)."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        if text is not None and text < 0:
            raise MoshiTTTError(f"--channel must be N (0 or more), left, right or mix, got {text}")
        return text
    name = str(text).strip().lower()
    if name in CHANNEL_NAMES:
        return CHANNEL_NAMES[name]
    if name == MIX:
        return MIX
    if name.isdigit():
        return int(name)
    raise MoshiTTTError(f"--channel must be N (0 or more), left, right or mix, got {text!r}")


def output_format(path: Path) -> tuple[str, str]:
    """The (format, subtype) an output's extension names, or an error saying which ones work."""
    import soundfile

    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None or not soundfile.check_format(*fmt):
        usable = ", ".join(ext for ext, f in OUTPUT_FORMATS.items() if soundfile.check_format(*f))
        raise MoshiTTTError(
            f"cannot write {path.suffix or 'a file without an extension'}: the output's "
            f"extension names its format; use one of {usable} (or end a folder with /)",
            path,
        )
    return fmt


def is_our_temporary(path: Path) -> int | None:
    """The pid that made `path` if it is a temporary of this tool (by name, a regular file, not a
    link, owned by this user), else None. A user's `x.partial` or `x.123.partial` is never ours."""
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None:
        return None
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        return None
    return int(match.group(1))


def temporary_of(path: Path) -> str:
    """The final name a temporary of ours stands for (`.NAME.moshi-ttt-PID-RANDOM.partial`)."""
    return path.name[1 : path.name.rindex(TEMP_MARK)]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicFile:
    """A temporary beside `path`, renamed to `path` by `commit()` and removed by `abort()`.

    An interrupted or failed write leaves nothing under the final name, so a rerun can trust
    that every existing output is complete. The temporary is created exclusively (O_EXCL, never
    through a link) under an unpredictable name in the same folder, so nobody can plant a link
    there to redirect the write, and the rename stays atomic.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}{TEMP_MARK}{os.getpid()}-", suffix=PARTIAL_SUFFIX
        )
        self.tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        finally:
            os.close(fd)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> tp.Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` only if the block completes (`AtomicFile`)."""
    target = AtomicFile(path)
    try:
        yield target.tmp
        target.commit()
    finally:
        target.abort()


def write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
