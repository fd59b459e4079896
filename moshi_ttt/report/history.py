"""Which earlier report entry describes an output: the one rule resume (a run skipping existing
outputs) and `report merge` share.

An entry describes an output only while that output is the very file it was written as (same
SHA-256); several reports may describe one output (the main report and shard parts), and of the
candidates the newest report wins.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

from ..errors import MoshiTTTError
from .schema import FileResult, sha256_of
from .shards import find_parts, read_report_file

if tp.TYPE_CHECKING:
    from ..jobs.plan import Job


def read_report(path: Path) -> dict | None:
    """The report an earlier run left at `path` (None if there is none). Anything else there is
    refused rather than replaced: `--report` may name a user's file by mistake."""
    try:
        found = read_report_file(path)
    except MoshiTTTError:
        raise MoshiTTTError("exists and is not a moshi-ttt report; refusing to replace it", path) from None
    return None if found is None else found.data


class EarlierResults:
    """Results earlier runs recorded, by output file, trusted only while that output is the
    very file they describe (same SHA-256): a replaced output gets no borrowed numbers.

    Several reports may describe one output (the main report and shard parts, see `shards.py`):
    they are given newest first, and the first whose SHA-256 matches the file wins."""

    def __init__(self, *reports: dict | None):
        self._by_output: dict[str, list[FileResult]] = {}
        for report in reports:
            for entry in (report or {}).get("files", []):
                if isinstance(entry, dict) and entry.get("output"):
                    result = FileResult.from_json(entry)
                    self._by_output.setdefault(self._key(Path(tp.cast(str, result.output))), []).append(result)

    @staticmethod
    def _key(path: Path) -> str:
        return str(path.resolve())

    def for_output(self, output: Path) -> FileResult | None:
        candidates = [e for e in self._by_output.get(self._key(output), []) if e.output_sha256 is not None]
        if not candidates or not output.is_file():
            return None
        digest = sha256_of(output)
        return next((e for e in candidates if e.output_sha256 == digest), None)

    def others(self, jobs: list[Job], keep: tp.Callable[[FileResult], bool] | None = None) -> list[FileResult]:
        """Entries for the outputs this run does not plan (e.g. outside its --glob) that still
        exist: with the earlier numbers where they still describe the file. `keep` narrows them
        (a shard keeps only its own files)."""
        planned = {self._key(job.output) for job in jobs}
        kept = []
        for key, entries in self._by_output.items():
            entry = entries[0]
            output = Path(tp.cast(str, entry.output))
            if key in planned or not output.is_file() or (keep is not None and not keep(entry)):
                continue
            earlier = self.for_output(output)
            kept.append(
                carried(earlier, "not selected in this run")
                if earlier
                else FileResult(entry.input, entry.output, "skipped", "not selected in this run")
            )
        return kept


def carried(earlier: FileResult, reason: str) -> FileResult:
    """An earlier run's result for a file this run skipped: its numbers, marked as earlier."""
    return dataclasses.replace(earlier, status="skipped", reason=reason, from_earlier_run=True)


def earlier_results(main_report: Path, own_path: Path, own: dict | None) -> EarlierResults:
    """What earlier runs recorded about OUT's files: this run's own report (or shard part), and
    the other reports beside it: the main report and every shard part (so an unsharded run after
    shards, or shards after a merge, keep their numbers: the automatic merge). Newest first; a
    report that cannot be read is passed over (it is only read here, never replaced)."""
    others = []
    for path, part in [(main_report, None), *((p, s) for s, p in find_parts(main_report).items())]:
        if path == own_path:
            continue
        try:
            found = read_report_file(path, part)
        except MoshiTTTError:
            continue
        if found is not None:
            others.append(found)
    reports = sorted(others, key=lambda r: r.mtime_ns, reverse=True)
    own_time = own_path.stat().st_mtime_ns if own is not None else -1
    ordered = (
        [r.data for r in reports if r.mtime_ns > own_time] + [own] + [r.data for r in reports if r.mtime_ns <= own_time]
    )
    return EarlierResults(*ordered)
