"""Which earlier report entry describes an output: the one rule resume (a run skipping existing
outputs) and `report merge` share.

An entry describes an output only while that output is the very file it was written as (same
SHA-256); several reports may describe one output (the main report and shard parts), and of the
candidates the newest report wins.

Hashing every output on every resume costs as much as reading them all (hours of audio: GBs),
so an entry also records the output's size, mtime (ns) and inode when its hash was last known to
hold (`output_stat`), and the hash is trusted while those are unchanged, as make and git trust a
file's stat: writing a file changes its mtime, replacing it changes its inode. Only an output
whose stat differs is hashed again; when the hash still matches (a `touch`, a copy with `cp -p`),
its entry takes the new stat, so the next resume trusts it. Not noticed: an edit that restores
size, mtime to the nanosecond and inode (`touch -d` after an in-place edit of the same length).
"""

from __future__ import annotations

import dataclasses
import os
import stat as stat_module
import typing as tp
from pathlib import Path

from ..errors import MoshiTTTError
from .schema import FileResult, sha256_of
from .shards import ReportFile, find_parts, read_report_file

if tp.TYPE_CHECKING:
    from ..jobs.plan import Job


def read_report(path: Path) -> ReportFile | None:
    """The report an earlier run left at `path` with its journal (None if there is none).
    Anything else there is refused rather than replaced: `--report` may name a user's file by
    mistake; a report of ours with malformed entries is refused saying which."""
    try:
        return read_report_file(path)
    except MoshiTTTError as exc:
        if exc.reason.startswith("is not a moshi-ttt report"):
            raise MoshiTTTError("exists and is not a moshi-ttt report; refusing to replace it", path) from None
        raise


def stat_of(path: Path | str) -> dict | None:
    """What `output_stat` records of a regular file (None for anything else, or nothing)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat_module.S_ISREG(info.st_mode):
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ino": info.st_ino}


class OutputCheck:
    """Whether an output on disk is the file an entry describes: its recorded stat unchanged, or
    else its SHA-256 equal (each output hashed at most once per check)."""

    def __init__(self) -> None:
        self._stats: dict[str, dict | None] = {}
        self._hashes: dict[str, str | None] = {}

    def stat(self, path: str) -> dict | None:
        if path not in self._stats:
            self._stats[path] = stat_of(path)
        return self._stats[path]

    def sha(self, path: str) -> str | None:
        if path not in self._hashes:
            try:
                self._hashes[path] = sha256_of(Path(path)) if self.stat(path) is not None else None
            except OSError:
                self._hashes[path] = None
        return self._hashes[path]

    def matches(self, entry: FileResult, path: Path | str | None = None) -> FileResult | None:
        """`entry` (its stat refreshed if the hash had to be taken) if its output on disk (at
        `path`, default the entry's own) is the file it describes, else None."""
        where = str(path if path is not None else entry.output or "")
        if not where or not entry.output_sha256:
            return None
        current = self.stat(where)
        if current is None:
            return None
        if entry.output_stat == current:
            return entry
        if self.sha(where) != entry.output_sha256:
            return None
        return dataclasses.replace(entry, output_stat=current)


def describing(
    candidates: tp.Iterable[FileResult], check: OutputCheck, output: Path | None = None
) -> FileResult | None:
    """The rule resume and `report merge` share: of the entries that may describe an output
    (newest report first), the first whose output on disk (at `output`, default each entry's
    own) is the very file it recorded (`OutputCheck`: stat, else SHA-256); None if none is."""
    for entry in candidates:
        found = check.matches(entry, output)
        if found is not None:
            return found
    return None


class EarlierResults:
    """Results earlier runs recorded, by output file, trusted only while that output is the
    very file they describe (see the module docstring): a replaced output gets no borrowed numbers.

    Several reports may describe one output (the main report and shard parts, see `shards.py`):
    they are given newest first, and the first that still describes the file wins."""

    def __init__(self, *reports: ReportFile | dict | None):
        self._by_output: dict[str, list[FileResult]] = {}
        self._folders: dict[str, str] = {}
        self.check = OutputCheck()
        # The last journal line the run's own report holds (see `earlier_results`); None: unknown.
        self.journal_seq: int | None = None
        for report in reports:
            if report is None:
                continue
            entries = (
                report.entries
                if isinstance(report, ReportFile)
                else [FileResult.from_json(e) for e in report.get("files", []) if isinstance(e, dict)]
            )
            for result in entries:
                if result.output:
                    self._by_output.setdefault(self._key(result.output), []).append(result)

    def _key(self, path: Path | str) -> str:
        """The output's path with its folder's links resolved (resolving each folder once: a
        resume over 10,000 outputs in a few folders resolves a few folders)."""
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in self._folders:
            self._folders[folder] = str(Path(folder).resolve())
        return os.path.join(self._folders[folder], name)

    def for_output(self, output: Path) -> FileResult | None:
        return describing(self._by_output.get(self._key(output), []), self.check, output)

    def others(self, jobs: list[Job], keep: tp.Callable[[FileResult], bool] | None = None) -> list[FileResult]:
        """Entries for the outputs this run does not plan (e.g. outside its --glob) that still
        exist: with the earlier numbers where they still describe the file. `keep` narrows them
        (a shard keeps only its own files)."""
        planned = {self._key(job.output) for job in jobs}
        kept = []
        for key, entries in self._by_output.items():
            entry = entries[0]
            output = Path(tp.cast(str, entry.output))
            if key in planned or (keep is not None and not keep(entry)) or self.check.stat(str(output)) is None:
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


def earlier_results(main_report: Path, own_path: Path, own: ReportFile | dict | None) -> EarlierResults:
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
    if own is None:
        own_time = -1
    elif isinstance(own, ReportFile):
        own_time = own.mtime_ns
    else:
        own_time = own_path.stat().st_mtime_ns
    ordered = [r for r in reports if r.mtime_ns > own_time] + [own] + [r for r in reports if r.mtime_ns <= own_time]
    earlier = EarlierResults(*ordered)
    earlier.journal_seq = own.journal_seq if isinstance(own, ReportFile) else 0 if own is None else None
    return earlier
