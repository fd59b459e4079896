"""moshi-finetune's data manifests: a `.jsonl` file, one `{"path": ..., "duration": ...}` a line,
paths relative to the manifest's folder. As IN, its recordings are the inputs and OUT mirrors
their relative paths.

A manifest is read defensively, whatever its bytes: line by line, each line at most
`MAX_LINE_BYTES` (so memory stays bounded), and anything malformed (not UTF-8, not JSON, nested
too deeply, not an object, a path holding NUL or lone surrogates or longer than a path can be,
a duration that is not a number of seconds) is one `MoshiTTTError` naming the manifest and the
line number. A recording listed on several lines is one input (its first line's).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError

MANIFEST_SUFFIX = ".jsonl"
# A manifest line holds a path and a few numbers: far below this. Longer lines are refused, so a
# hostile manifest cannot make us hold more than this at once.
MAX_LINE_BYTES = 1 << 20
# Linux's limits, where the filesystem does not say its own.
DEFAULT_NAME_MAX, DEFAULT_PATH_MAX = 255, 4096


@dataclass
class ManifestEntry:
    rel: Path  # relative to the manifest's folder: where the recording is, and where its output goes
    duration: float | None  # seconds, as the manifest says (None if it does not)


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() == MANIFEST_SUFFIX and path.is_file()


def name_limits(folder: Path) -> tuple[int, int]:
    """The longest file name and path (in bytes) the filesystem holding `folder` takes."""
    limits = []
    for key, default in (("PC_NAME_MAX", DEFAULT_NAME_MAX), ("PC_PATH_MAX", DEFAULT_PATH_MAX)):
        try:
            value = os.pathconf(folder, key)
        except (OSError, ValueError):
            value = -1
        limits.append(value if value > 0 else default)
    return limits[0], limits[1]


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Every recording `path` lists, in order, each once; a bad line is one error naming the
    manifest and the line number (see the module docstring). Blank lines are allowed."""
    root = path.parent.absolute()
    name_max, path_max = name_limits(root)
    entries: dict[Path, ManifestEntry] = {}
    try:
        with open(path, "rb") as handle:
            number = 0
            while True:
                raw = handle.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                number += 1
                where = f"line {number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise MoshiTTTError(f"{where}: longer than {MAX_LINE_BYTES >> 20} MiB", path)
                line = _decode(raw, where, path, first=number == 1)
                if line.strip():
                    entry = _entry(line, root, where, path, name_max, path_max)
                    entries.setdefault(entry.rel, entry)
    except OSError as exc:
        raise MoshiTTTError(f"cannot read the manifest: {exc.strerror or exc}", path) from None
    return list(entries.values())


def _decode(raw: bytes, where: str, manifest: Path, first: bool) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoshiTTTError(
            f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", manifest
        ) from None
    return line.removeprefix("\ufeff") if first else line  # a byte-order mark some editors write


def _entry(line: str, root: Path, where: str, manifest: Path, name_max: int, path_max: int) -> ManifestEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoshiTTTError(f"{where}: not JSON ({exc.msg})", manifest) from None
    except RecursionError:
        raise MoshiTTTError(f"{where}: JSON nested too deeply", manifest) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise MoshiTTTError(f"{where}: not JSON we can read ({str(exc).split(';')[0]})", manifest) from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise MoshiTTTError(f'{where}: expected an object with a "path" string', manifest)
    duration = record.get("duration")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise MoshiTTTError(f'{where}: "duration" must be a number of seconds, got {_short(duration)}', manifest)
    given = record["path"]
    _check_path(given, where, manifest, name_max, path_max)
    # Outputs mirror these paths under OUT, so a path may not leave the manifest's folder.
    full = Path(os.path.normpath(root / given))
    if full == root:
        raise MoshiTTTError(f"{where}: {_short(given)} names the manifest's folder, not a recording", manifest)
    if root not in full.parents:
        raise MoshiTTTError(
            f"{where}: {_short(given)} is outside the manifest's folder (outputs mirror paths relative to it)",
            manifest,
        )
    return ManifestEntry(full.relative_to(root), None if duration is None else float(duration))


def _check_path(given: str, where: str, manifest: Path, name_max: int, path_max: int) -> None:
    """A path the filesystem could hold: no NUL, no lone surrogates, no name or path too long."""
    if "\0" in given:
        raise MoshiTTTError(f'{where}: the "path" holds a NUL character', manifest)
    try:
        encoded = given.encode("utf-8")
    except UnicodeEncodeError:
        raise MoshiTTTError(f'{where}: the "path" holds a lone surrogate (not Unicode text)', manifest) from None
    if len(encoded) >= path_max:
        raise MoshiTTTError(
            f'{where}: the "path" is {len(encoded)} bytes long, longer than a path can be ({path_max - 1})', manifest
        )
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > name_max:
        raise MoshiTTTError(
            f'{where}: the "path" has a name of {longest} bytes, longer than a file name can be ({name_max})',
            manifest,
        )


def _short(value: object, limit: int = 80) -> str:
    """A value as a message shows it: repr, cut short."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested deeply, or an integer too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
