"""Splitting one `infer` over independent processes (`--shard I/N`) and merging their reports.

N processes (SLURM array jobs, machines on a shared filesystem) each run `infer --shard I/N` on
the same IN and OUT. A recording belongs to shard `sha256(relative path) mod N`: the partition
depends only on the file's own path, so adding files to a corpus never moves the others to
another shard, and every shard computes it alone, with no coordinator.

Each shard keeps the single-run guarantees for its own files: it locks OUT for its shard only
(`OUT/.moshi-ttt.shard-I-of-N.lock`), cleans up only its own outputs' stale temporaries (pids are
host-local: a temporary of a live process on another machine looks dead here), and writes its own
report part (`OUT/moshi-ttt-report.shard-I-of-N.json`). `merge_reports` (the CLI's
`moshi-ttt report merge OUT`) joins the parts and any main report into the one report; an
unsharded run over the same OUT reads the parts as earlier results too.

No torch here: the CLI's `report merge` and the planner import it cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ..errors import MoshiTTTError
from .schema import REPORT_NAME, REPORT_SCHEMA, SCORES_REPORT_NAME, FileResult, MalformedEntry, Report, RunSettings

# Settings each process decides for itself (auto batch size from its own file count and memory,
# its threads and device): differing between shards is expected, not worth a warning.
PER_PROCESS_SETTINGS = ("shard", "threads", "device", "batch_size", "batch_size_reason")
SHARD_LOCK = re.compile(r"\.moshi-ttt\.shard-(\d+)-of-(\d+)\.lock")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """How file names carry the shard: `shard-I-of-N`."""
        return f"shard-{self.index}-of-{self.count}"

    @property
    def lock_name(self) -> str:
        return f".moshi-ttt.{self.tag}.lock"

    def part_path(self, report: Path) -> Path:
        """This shard's part of `report`: `moshi-ttt-report.json` -> `moshi-ttt-report.shard-I-of-N.json`."""
        return report.with_name(f"{report.stem}.{self.tag}{report.suffix}")

    def holds(self, rel: PurePath | str) -> bool:
        return shard_of(rel, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 <= I < N: one line saying what is wrong otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise MoshiTTTError(f"--shard expects I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise MoshiTTTError(f"--shard {text}: I must be between 0 and N-1 (shards are numbered from 0)")
    return Shard(index, count)


def shard_of(rel: PurePath | str, count: int) -> int:
    """The shard of a recording, from its path relative to IN (or to the manifest's folder) in
    POSIX form: the same on every machine and for every run, whatever else IN holds."""
    key = PurePath(rel).as_posix().encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % count


def part_pattern(report: Path) -> re.Pattern[str]:
    return re.compile(re.escape(report.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(report.suffix))


def find_parts(report: Path) -> dict[Shard, Path]:
    """The shard parts written beside `report` (any N)."""
    pattern = part_pattern(report)
    found: dict[Shard, Path] = {}
    if report.parent.is_dir():
        for path in sorted(report.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                index, count = int(match.group(1)), int(match.group(2))
                if index < count:
                    found[Shard(index, count)] = path
    return found


# -- locks -----------------------------------------------------------------------------------------


def lock_is_held(path: Path) -> bool:
    """Whether some process holds `path`'s flock. The probe takes a *shared* lock for a moment, so
    probes never block each other (N shards starting together all probe the main lock), only an
    exclusive holder fails them. Opening an absent file fails: nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def holder_of(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8", errors="replace").strip() or "unknown process"
    return "unknown process"


def running_shards(folder: Path) -> list[tuple[Shard, str]]:
    """Shards whose run holds its lock in `folder` now, with who holds it."""
    running = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            match = SHARD_LOCK.fullmatch(path.name)
            if match and lock_is_held(path):
                running.append((Shard(int(match.group(1)), int(match.group(2))), holder_of(path)))
    return running


# -- reading reports -------------------------------------------------------------------------------


@dataclass
class ReportFile:
    """A report (main or part) as read from disk with its journal's newer lines applied, its
    entries parsed once, and when it was last written (report or journal, the later)."""

    path: Path
    data: dict
    mtime_ns: int
    shard: Shard | None = None
    entries: list[FileResult] = field(default_factory=list)
    journal_seq: int = 0  # the last journal line it holds

    @property
    def files(self) -> list[FileResult]:
        return self.entries


def read_report_file(path: Path, shard: Shard | None = None) -> ReportFile | None:
    """A report at `path` (with its journal: `journal.py`), or None if there is none; anything
    else there is an error naming it, one line, whatever is wrong inside."""
    from .journal import fold, read_journal, report_seq

    # The journal first: a run compacting meanwhile only moves lines into the report read next.
    journal = read_journal(path)
    try:
        text = path.read_bytes()
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        text, mtime_ns = None, -1
    except OSError as exc:
        raise MoshiTTTError(f"cannot read: {exc.strerror or exc}", path) from None
    if text is None:
        data: dict | None = {"schema": REPORT_SCHEMA, "settings": {}, "files": []}
    else:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            data = None
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA or not isinstance(data.get("files"), list):
        raise MoshiTTTError("is not a moshi-ttt report", path)
    for key in ("settings", "totals", "shard", "journal"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise MoshiTTTError(f"malformed report: {key} must be a JSON object", path)
    seq = report_seq(data)
    if journal is None and text is None:
        return None
    newer = [] if journal is None else journal.after(seq)
    if journal is not None:
        data = fold(data, newer)
        seq = max(seq, journal.last_seq)
        if newer:
            mtime_ns = max(mtime_ns, journal.mtime_ns)
    entries = []
    for number, entry in enumerate(data["files"], start=1):
        try:
            entries.append(FileResult.from_json(entry))
        except MalformedEntry as exc:
            raise MoshiTTTError(f"malformed report entry {number}: {exc}", path) from None
    try:
        settings = RunSettings.from_json(data.get("settings"))
    except MalformedEntry as exc:
        raise MoshiTTTError(f"malformed report: {exc}", path) from None
    if newer:  # the totals of what the report and journal hold
        wall_s = (data.get("totals") or {}).get("wall_s")
        wall_s = wall_s if isinstance(wall_s, (int, float)) and not isinstance(wall_s, bool) else 0.0
        data["totals"] = Report(settings, entries, wall_s=wall_s).totals()
    return ReportFile(path, data, mtime_ns, shard, entries, seq)


def reports_beside(report: Path) -> list[ReportFile]:
    """The main report and every shard part beside it, newest first (the order that decides
    which entry wins when several describe one file; see `pick`)."""
    found = [
        r
        for r in (read_report_file(report), *(read_report_file(p, s) for s, p in find_parts(report).items()))
        if r is not None
    ]
    return sorted(found, key=lambda r: r.mtime_ns, reverse=True)


def pick(candidates: list[tuple[FileResult, ReportFile]], check: tp.Any) -> tuple[FileResult, ReportFile]:
    """One entry per input when several reports describe it (`candidates` newest report first):
    an entry describing the output as it is on disk wins (`history.OutputCheck`: its recorded
    stat, else its SHA-256), since the output is what the user has; otherwise the newest report's
    entry (a later failure or skip is the latest word on a file without a matching output).
    Outputs are looked at only here, i.e. only on conflicts."""
    from .history import describing

    if len(candidates) == 1:
        return candidates[0]
    for entry, source in candidates:
        found = describing([entry], check)
        if found is not None:
            return found, source
    return candidates[0]  # no output matches: the newest report's word on the file


def merged_entries(reports: list[ReportFile]) -> list[tuple[FileResult, ReportFile]]:
    """Every input once across `reports` (newest first), sorted by input path, with the report
    each entry was taken from."""
    from .history import OutputCheck

    by_input: dict[str, list[tuple[FileResult, ReportFile]]] = {}
    for report in reports:
        for entry in report.files:
            by_input.setdefault(entry.input, []).append((entry, report))
    check = OutputCheck()
    return [pick(by_input[key], check) for key in sorted(by_input)]


# -- merging ---------------------------------------------------------------------------------------


@dataclass
class ShardState:
    """What the merge knows about one shard of a partition."""

    shard: Shard
    path: Path | None
    state: str  # "complete" | "missing" | "running" | "interrupted" | "unfinished"
    files: int = 0
    planned: int | None = None


@dataclass
class MergeOutcome:
    report: Report
    path: Path
    shards: list[ShardState] = field(default_factory=list)
    # Settings keys that differ between the parts (e.g. two checkpoints): the merge still happens.
    differing_settings: list[str] = field(default_factory=list)
    # With `mixed`: the distinct origins (`made_by`) of the merged outputs, when more than one.
    origins: list[dict] = field(default_factory=list)

    @property
    def incomplete(self) -> list[ShardState]:
        return [s for s in self.shards if s.state != "complete"]


def shard_states(parts: dict[Shard, ReportFile], lock_folder: Path) -> list[ShardState]:
    """Per partition (each N seen), every shard 0..N-1: complete, or why not."""
    running = {shard for shard, _ in running_shards(lock_folder)}
    states = []
    for count in sorted({s.count for s in parts} | {s.count for s in running}):
        for index in range(count):
            shard = Shard(index, count)
            part = parts.get(shard)
            if part is None:
                states.append(ShardState(shard, None, "running" if shard in running else "missing"))
                continue
            info = part.data.get("shard") if isinstance(part.data.get("shard"), dict) else {}
            planned = _count(info.get("planned"))
            done = _count(info.get("done"))
            if shard in running:
                state = "running"
            elif part.data.get("interrupted"):
                state = "interrupted"
            elif planned is not None and done is not None and done < planned:
                state = "unfinished"  # killed (kill -9, node lost): it stopped short of its plan
            else:
                state = "complete"
            files = done if done is not None else len(part.data["files"])
            states.append(ShardState(shard, part.path, state, files, planned))
    return states


def _count(value: tp.Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _wall_s(report: ReportFile) -> float:
    value = (report.data.get("totals") or {}).get("wall_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _origin_label(made_by: dict) -> str:
    checkpoint = made_by.get("checkpoint")
    name = "no fine-tune" if not checkpoint else PurePath(str(checkpoint)).name or str(checkpoint)
    step = made_by.get("step")
    return f"{name}{'' if step is None else f' step {step}'}, origin {str(made_by.get('id'))[:8]}"


def check_one_origin(picked: list[tuple[FileResult, ReportFile]]) -> list[dict]:
    """The distinct origins (`made_by`, by id) of the merged outputs, first seen first; more
    than one is refused by `merge_reports` unless asked."""
    origins: dict[str, dict] = {}
    for entry, _ in picked:
        if entry.output and entry.made_by and entry.made_by.get("id"):
            origins.setdefault(entry.made_by["id"], entry.made_by)
    return list(origins.values())


def _refuse_mixed(picked: list[tuple[FileResult, ReportFile]], origins: list[dict]) -> tp.NoReturn:
    from .provenance import difference

    sources: dict[str, list[str]] = {}
    for entry, source in picked:
        if entry.output and entry.made_by and entry.made_by.get("id"):
            names = sources.setdefault(entry.made_by["id"], [])
            if source.path.name not in names:
                names.append(source.path.name)
    said = "; ".join(f"{', '.join(sources[o['id']])} ({_origin_label(o)})" for o in origins)
    raise MoshiTTTError(
        f"refusing to merge outputs made by different models or settings: {said}; they differ in "
        f"{difference(origins[0], origins[1])}. Redo the odd files with `infer --redo-other`, or "
        "pass --mixed to merge anyway (each file keeps its origin in made_by)"
    )


def merge_reports(report: Path, lock_folder: Path | None = None, mixed: bool = False) -> MergeOutcome:
    """Merge the shard parts beside `report` (and `report` itself, if it exists) into `report`:
    each input once (see `pick`), totals recomputed, `wall_s` the sum of the parts' (processing
    time, so the real-time factor stays seconds of work per second of audio). Parts are kept:
    merging again gives the same report. Raises `MoshiTTTError` when there is nothing to merge,
    and when the merged outputs were made by different models or settings (`made_by`) unless
    `mixed`: then the report's settings list them all (`mixed_origins`) and claim none."""
    from ..jobs.guard import OutputLock
    from .journal import remove_journal

    report = Path(report).absolute()
    lock_folder = lock_folder or report.parent
    reports = reports_beside(report)
    parts = {r.shard: r for r in reports if r.shard is not None}
    if not parts:
        if report.parent.is_dir() or report.exists():
            raise MoshiTTTError(
                "no shard reports to merge here (expected moshi-ttt-report.shard-I-of-N.json from `infer --shard I/N`)",
                report.parent,
            )
        raise MoshiTTTError("no such folder", report.parent)
    # The settings of the newest part that streamed something (an empty shard loads no model).
    newest = max(parts.values(), key=lambda r: (bool(r.data.get("files")), r.mtime_ns))
    settings = RunSettings.from_json(newest.data.get("settings"))
    settings.extra.pop("shard", None)
    newest_json = settings.to_json()
    differing = sorted(
        {
            key
            for part in parts.values()
            for key, value in (part.data.get("settings") or {}).items()
            if key not in PER_PROCESS_SETTINGS and newest_json.get(key) != value
        }
    )
    main = next((r for r in reports if r.shard is None), None)
    with OutputLock(lock_folder):  # no unsharded run (nor another merge) writes the report meanwhile
        states = shard_states(parts, lock_folder)
        picked = merged_entries(reports)
        origins = check_one_origin(picked)
        if len(origins) > 1:
            if not mixed:
                _refuse_mixed(picked, origins)
            settings.made_by = None
            settings.extra["mixed_origins"] = origins
        merged = Report(
            settings=settings,
            files=[entry for entry, _ in picked],
            wall_s=sum(_wall_s(r) for r in parts.values()),
        )
        merged.interrupted = False
        if main is not None and main.journal_seq:
            merged.journal_seq = main.journal_seq  # the main report's journal is folded in
        merged.write(report)
        if main is not None and main.journal_seq:
            remove_journal(report)
    return MergeOutcome(merged, report, states, differing, origins if len(origins) > 1 else [])


def default_report_of(out: Path) -> Path:
    """The report `report merge OUT` merges into: `infer`'s, or `score`'s where only that one (or
    its parts) is there."""
    infer, score = Path(out).absolute() / REPORT_NAME, Path(out).absolute() / SCORES_REPORT_NAME
    if not infer.exists() and not find_parts(infer) and (score.exists() or find_parts(score)):
        return score
    return infer
