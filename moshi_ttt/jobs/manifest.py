"""moshi-finetune's data manifests: a `.jsonl` file, one `{"path": ..., "duration": ...}` a line,
paths relative to the manifest's folder. As IN, its recordings are the inputs and OUT mirrors
their relative paths."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError

MANIFEST_SUFFIX = ".jsonl"


@dataclass
class ManifestEntry:
    rel: Path  # relative to the manifest's folder: where the recording is, and where its output goes
    duration: float | None  # seconds, as the manifest says (None if it does not)


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() == MANIFEST_SUFFIX and path.is_file()


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Every recording `path` lists, in order; a bad line is one error naming the manifest and
    the line number. Blank lines are allowed."""
    root = path.parent.absolute()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MoshiTTTError(f"cannot read the manifest: {getattr(exc, 'strerror', None) or exc}", path) from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            entries.append(_entry(line, root, f"line {number}", path))
    return entries


def _entry(line: str, root: Path, where: str, manifest: Path) -> ManifestEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoshiTTTError(f"{where}: not JSON ({exc.msg})", manifest) from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise MoshiTTTError(f'{where}: expected an object with a "path" string', manifest)
    duration = record.get("duration")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not math.isfinite(duration)
        or duration < 0
    ):
        raise MoshiTTTError(f'{where}: "duration" must be a number of seconds, got {duration!r}', manifest)
    # Outputs mirror these paths under OUT, so a path may not leave the manifest's folder.
    full = Path(os.path.normpath(root / record["path"]))
    if root not in full.parents:
        raise MoshiTTTError(
            f"{where}: {record['path']!r} is outside the manifest's folder (outputs mirror paths relative to it)",
            manifest,
        )
    return ManifestEntry(full.relative_to(root), None if duration is None else float(duration))
