"""Planning a run: which recordings become which outputs, and what is checked before any model
loads (sources never written, OUT writable and locked, stale temporaries of killed runs removed).

A single file is a batch of one, so every run gets the same guarantees: outputs appear under
their final name only when complete, existing outputs are kept unless asked, one bad file never
stops the others, and the report on disk always holds every file finished so far.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import os
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError
from ..report.history import EarlierResults, earlier_results, read_report
from ..report.journal import journal_path
from ..report.schema import REPORT_NAME, SCORES_REPORT_NAME, FileResult
from ..report.shards import Shard, holder_of, lock_is_held, running_shards
from .files import AUDIO_EXTENSIONS, PARTIAL_SUFFIX, TEMP_MARK, is_our_temporary, output_format, temporary_of
from .guard import LOCK_NAME, OutputLock, check_sources_untouched, check_writable, nearest_existing
from .manifest import is_manifest, name_limits, read_manifest


@dataclass
class Job:
    input: Path
    output: Path
    text_output: Path | None = None
    duration_hint: float | None = None  # seconds, as a manifest says (for progress before reading)
    # Why this file cannot be processed, known from the plan alone (an output name the filesystem
    # cannot hold): the run lists it as failed with this reason and streams the others.
    problem: str | None = None


# Files only a moshi-ttt run writes into its OUT: a folder of IN holding one is another run's
# output folder, not recordings (unless asked for; see `find_inputs`).
OUTPUT_MARKERS = re.compile(
    "(" + "|".join(re.escape(name.removesuffix(".json")) for name in (REPORT_NAME, SCORES_REPORT_NAME)) + ")"
    r"(\.shard-\d+-of-\d+)?\.json|\.moshi-ttt(\.shard-\d+-of-\d+)?\.lock"
)
# What a temporary adds to its final name: `.NAME.moshi-ttt-PID-RANDOM.partial` (pids of up to
# 10 digits), so an output name must leave this much room under the filesystem's name limit.
TEMPORARY_OVERHEAD = len(f".{TEMP_MARK}{'9' * 10}-{'x' * 8}{PARTIAL_SUFFIX}")


# What `score` writes for each recording: its `[1 + dep_q, T]` NLL array (IN/a.wav -> OUT/a.nll.npy).
SCORES_SUFFIX = ".nll.npy"


def is_junk(rel: Path, include_hidden: bool = False) -> bool:
    """macOS AppleDouble files (`._x.wav`) are never recordings; hidden files and folders are
    skipped unless asked for."""
    if rel.name.startswith("._"):
        return True
    return not include_hidden and any(part.startswith(".") for part in rel.parts)


def is_inside(path: Path, folder: Path) -> bool:
    """`path` lies strictly below `folder`, links resolved."""
    return folder.resolve() in path.resolve().parents


def find_inputs(
    folder: Path,
    pattern: str | None = None,
    exclude: Path | None = None,
    include_hidden: bool = False,
    include_outputs: bool = False,
) -> list[Path]:
    """Audio files below `folder`, sorted; `pattern` (a glob) is matched against the path
    relative to `folder` and against the file name. Nothing under `exclude` (compared resolved,
    so `.` and `out` find the outputs of an earlier run in `./out`), and, unless
    `include_outputs`, nothing in a folder below `folder` that holds a moshi-ttt report or lock
    (another run's OUT: its outputs are not recordings)."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    output_folders = set()
    for path in folder.rglob("*"):
        if OUTPUT_MARKERS.fullmatch(path.name) and path.parent != folder:
            output_folders.add(path.parent.relative_to(folder))
        if not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        rel = path.relative_to(folder)
        if is_junk(rel, include_hidden):
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue
        if not matches(rel, pattern):
            continue
        found.append(path)
    if output_folders and not include_outputs:
        found = [p for p in found if not output_folders.intersection(p.relative_to(folder).parents)]
    return sorted(found)


def matches(rel: Path, pattern: str | None) -> bool:
    """`pattern` (a glob) matches the path relative to IN or the file name; no pattern matches all."""
    return not pattern or fnmatch.fnmatch(rel.as_posix(), pattern) or fnmatch.fnmatch(rel.name, pattern)


def output_names(rels: list[Path], suffix: str) -> list[Path]:
    """The output of each input (paths relative to IN or the manifest, all distinct), relative to
    OUT; a `MoshiTTTError` naming two inputs where no name is left for one of them.

    The rule, total and independent of the order of the inputs: an output is its input's path
    with `suffix` in place of the input's extension (`a.flac` -> `a.wav`). Inputs that would
    share an output name (also names that differ only in case, which are one name on
    case-insensitive filesystems, or an output named as another's folder) each take their full
    name plus `suffix` instead (`a.flac` -> `a.flac.wav`), except an input already named as its
    output would be (`a.wav`), which keeps its name. Any collision left (a file `a.flac.wav`
    beside `a.flac` and `a.wav`) is refused.
    """
    plain = [rel.with_suffix(suffix) for rel in rels]
    # A name is shared when two outputs, or an output and another output's folder, would hold it.
    shared = collections.Counter(_fold(p) for p in plain)
    shared.update({_fold(folder) for p in plain for folder in p.parents})
    names = [
        p if shared[_fold(p)] == 1 or rel == p else rel.parent / f"{rel.name}{suffix}" for rel, p in zip(rels, plain)
    ]
    owner: dict[str, int] = {}
    for index, name in enumerate(names):
        first = owner.setdefault(name.as_posix(), index)
        if first != index:
            raise _collision(rels[first], rels[index], name)
    folders = {parent.as_posix(): index for index, name in enumerate(names) for parent in name.parents}
    for index, name in enumerate(names):
        if name.as_posix() in folders:
            raise _collision(rels[folders[name.as_posix()]], rels[index], name, " (one as a file, one as a folder)")
    return names


def _fold(path: Path) -> str:
    return path.as_posix().casefold()


def _collision(first: Path, second: Path, name: Path, how: str = "") -> MoshiTTTError:
    return MoshiTTTError(
        f"{first.as_posix()!r} and {second.as_posix()!r} would both be written to {name.as_posix()!r}{how}; "
        "rename one of them (or give them separate runs)"
    )


def name_problem(path: Path, name_max: int, path_max: int, what: str = "output") -> str | None:
    """Why the filesystem cannot hold `path` (or the temporary it is first written to), if so."""
    name, whole = len(os.fsencode(path.name)), len(os.fsencode(str(path)))
    if name + TEMPORARY_OVERHEAD > name_max:
        return (
            f"its {what}'s name is {name} bytes long; names written here may have at most "
            f"{name_max - TEMPORARY_OVERHEAD} ({name_max} on this filesystem, less {TEMPORARY_OVERHEAD} for the "
            "temporary's)"
        )
    if whole + TEMPORARY_OVERHEAD >= path_max:
        return (
            f"its {what}'s path is {whole} bytes long; paths written here may have at most "
            f"{path_max - 1 - TEMPORARY_OVERHEAD} ({path_max - 1} on this system, less {TEMPORARY_OVERHEAD} for the "
            "temporary's)"
        )
    return None


def plan_jobs(
    source: Path,
    target: Path | str,
    pattern: str | None = None,
    text: bool = False,
    include_hidden: bool = False,
    text_format: str = "txt",
    audio_format: str | None = None,
    scores: bool = False,
    include_outputs: bool = False,
) -> list[Job]:
    """Map inputs to outputs: a file to a file (or into a folder), a folder or a `.jsonl` manifest
    to a folder mirroring the recordings' relative paths (named by `output_names`, over every
    input whatever `pattern` selects, so the names never depend on the selection).

    `target` ending in "/" is a folder even if it does not exist yet. A single output is written
    in the format its extension names; outputs named here (into a folder) get `audio_format`'s
    extension (default wav). Transcripts are beside their output, with `text_format`'s extension.
    With `scores`, outputs are per-target NLL arrays (`SCORES_SUFFIX`), named likewise.
    Paths are made absolute, so reports and resumes do not depend on the working folder. A job
    whose output (or transcript) name the filesystem cannot hold carries the reason in
    `problem`; for a single file that is an error.
    """
    suffix = SCORES_SUFFIX if scores else f".{audio_format or 'wav'}"
    text_suffix = f".{text_format}"
    as_folder = str(target).endswith(("/", os.sep))
    source, target = Path(source).absolute(), Path(target).absolute()
    name_max, path_max = name_limits(nearest_existing(target))
    if is_manifest(source):
        root = source.parent
        inputs = [(root / e.rel, e.rel, e.duration) for e in read_manifest(source)]
    elif source.is_file():
        output = target / f"{source.stem}{suffix}" if as_folder or target.is_dir() else target
        if not scores:
            output_format(output)
        elif output.suffix.lower() != ".npy":
            raise MoshiTTTError(
                "scores are written as a .npy array: name OUT *.npy, or a folder (end it with /)", output
            )
        job = Job(source, output, output.with_suffix(text_suffix) if text else None)
        problem = _name_problem(job, name_max, path_max)
        if problem is not None:
            raise MoshiTTTError(problem, source)
        return [job]
    elif not source.is_dir():
        raise MoshiTTTError("no such file or folder", source)
    else:
        inside = target if is_inside(target, source) else None  # our outputs in IN are not inputs
        inputs = [
            (path, path.relative_to(source), None)
            for path in find_inputs(
                source, exclude=inside, include_hidden=include_hidden, include_outputs=include_outputs
            )
        ]
    if target.exists() and not target.is_dir():
        raise MoshiTTTError("input is a folder or a manifest, so the output must be a folder too", target)
    if target.resolve() == source.resolve():
        raise MoshiTTTError(
            "the output folder is the input folder: outputs would replace the recordings; choose another output folder",
            target,
        )
    try:
        names = output_names([rel for _, rel, _ in inputs], suffix)
    except MoshiTTTError as exc:
        raise MoshiTTTError(exc.reason, source) from None
    jobs: list[Job] = []
    for (path, rel, duration), name in zip(inputs, names):
        if not matches(rel, pattern):
            continue
        output = target / name
        job = Job(path, output, output.with_suffix(text_suffix) if text else None, duration)
        job.problem = _name_problem(job, name_max, path_max)
        jobs.append(job)
    return jobs


def _written(job: Job) -> list[Path]:
    return [job.output] + ([job.text_output] if job.text_output is not None else [])


def _name_problem(job: Job, name_max: int, path_max: int) -> str | None:
    return name_problem(job.output, name_max, path_max) or (
        None if job.text_output is None else name_problem(job.text_output, name_max, path_max, "transcript")
    )


def default_report_path(source: Path, target: Path, name: str = REPORT_NAME) -> Path | None:
    """Folder and manifest runs write a report by default; a single file only when asked."""
    return Path(target).absolute() / name if Path(source).is_dir() or is_manifest(Path(source)) else None


def stale_partials(folder: Path, finals: set[Path] | None = None, recursive: bool = True) -> list[Path]:
    """Temporaries left by a killed run (kill -9 skips cleanup): only files this tool created
    (see `audio.is_our_temporary`) whose process is gone; never outputs, never a user's files.
    With `finals`, only temporaries of those final paths (a shard's own outputs: pids are
    host-local, so another machine's live temporary looks dead here). Not `recursive`: only
    those directly in `folder`."""
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    found = [p for p in candidates if (pid := is_our_temporary(p)) is not None and not _pid_alive(pid)]
    if finals is not None:
        names = {(f.parent.absolute(), f.name) for f in finals}
        found = [p for p in found if (p.parent.absolute(), temporary_of(p)) in names]
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@dataclass
class BatchPlan:
    """Everything a run settles before it loads a model; `lock` is held from `prepare_batch` on."""

    source: Path
    jobs: list[Job]
    report_path: Path | None
    earlier: EarlierResults
    lock: OutputLock
    shard: Shard | None = None
    # Inputs' paths are relative to this folder (IN, or a manifest's folder); it decides shards.
    root: Path | None = None

    def keeps(self, entry: FileResult) -> bool:
        """Whether an earlier entry of a file this run does not plan belongs in its report: all of
        them, or for a shard those of its own files (the other shards report theirs)."""
        if self.shard is None:
            return True
        if self.root is None or not Path(entry.input).is_relative_to(self.root):
            return False
        return self.shard.holds(Path(entry.input).relative_to(self.root))


def prepare_batch(
    source: Path,
    target: Path | str,
    *,
    pattern: str | None = None,
    text: bool = False,
    report: Path | None = None,
    include_hidden: bool = False,
    text_format: str = "txt",
    audio_format: str | None = None,
    shard: Shard | None = None,
    scores: bool = False,
    include_outputs: bool = False,
) -> BatchPlan:
    """Plan the jobs and check, before any model loads, that the run can do what it promises:
    no source is ever written (outputs, transcripts and the report are checked against every file
    of IN), OUT and the report can be written, the report path holds our report or nothing, and no
    other run uses OUT (its lock is taken here; release it with `plan.lock.release()`).

    Stale temporaries of a killed run into OUT are removed once the lock is held.

    With `shard`, only the inputs of that shard are planned (see `shards.py`), the report is the
    shard's part, the lock is the shard's own, and only this shard's stale temporaries go; an
    unsharded run and a shard never share OUT at the same time.
    """
    source = Path(source).absolute()
    jobs = plan_jobs(source, target, pattern, text, include_hidden, text_format, audio_format, scores, include_outputs)
    if audio_format is not None and jobs[0:1] and jobs[0].output.suffix.lower() != f".{audio_format}":
        raise MoshiTTTError(
            f"--format {audio_format} names outputs written into a folder, but OUT is a file "
            f"with another extension (end OUT with / for a folder)",
            jobs[0].output,
        )
    if not jobs:
        raise MoshiTTTError("no audio files found" + (f" matching {pattern!r}" if pattern else ""), source)
    report_name = SCORES_REPORT_NAME if scores else REPORT_NAME
    report_path = (
        Path(report).absolute() if report is not None else default_report_path(source, Path(target), report_name)
    )
    folder_mode = source.is_dir() or is_manifest(source)
    root = source if source.is_dir() else source.parent
    if shard is not None:
        if not folder_mode or report_path is None:
            raise MoshiTTTError("--shard splits a folder or a manifest; IN is a single file", source)
        # The partition is of the whole plan: a shard with no file is complete, not an error.
        jobs = [job for job in jobs if shard.holds(job.input.relative_to(root))]
    main_report = report_path
    if shard is not None and report_path is not None:
        report_path = shard.part_path(report_path)
    out_root = Path(target).absolute() if folder_mode else jobs[0].output.parent
    outputs = [p for job in jobs for p in (job.output, job.text_output) if p is not None]
    if report_path is not None:
        if report_path.is_dir():
            raise MoshiTTTError("the report path is a folder", report_path)
        if any(report_path.resolve() == p.resolve() for p in outputs):
            raise MoshiTTTError("the report path is also an output of this run", report_path)
    # Every file of IN is a source (not only the selected recordings), except our own outputs
    # when OUT lies inside IN.
    outputs_inside = folder_mode and is_inside(out_root, source)
    if is_manifest(source):  # the manifest and every recording it lists
        sources = [source, *(job.input for job in jobs)]
    elif folder_mode:
        sources = [p for p in source.rglob("*") if p.is_file() and not (outputs_inside and is_inside(p, out_root))]
    else:
        sources = [source]
    check_sources_untouched(sources, [*outputs, *([report_path, journal_path(report_path)] if report_path else [])])
    check_writable(out_root, "outputs")
    if report_path is not None:
        check_writable(report_path.parent, "report")
        earlier = earlier_results(tp.cast(Path, main_report), report_path, read_report(report_path))
    else:
        earlier = EarlierResults()
    # One lock per output folder (per shard of it); a single output locks only its own name.
    if shard is not None:
        lock = OutputLock(out_root, shard.lock_name)
    else:
        lock = OutputLock(out_root) if folder_mode else OutputLock(out_root, f".{jobs[0].output.name}.moshi-ttt.lock")
    lock.acquire()
    try:
        if folder_mode:
            check_no_other_kind(out_root, shard)
    except MoshiTTTError:
        lock.release()
        raise
    # With the lock held, no run of ours is writing these. A single file's lock is its output's:
    # only that output's (and transcript's) temporaries, only beside it.
    if folder_mode:
        finals = None if shard is None else {p for job in jobs for p in _written(job)} | {tp.cast(Path, report_path)}
        stale = stale_partials(out_root, finals)
    else:
        stale = stale_partials(out_root, set(_written(jobs[0])), recursive=False)
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return BatchPlan(
        source=source, jobs=jobs, report_path=report_path, earlier=earlier, lock=lock, shard=shard, root=root
    )


def check_no_other_kind(out_root: Path, shard: Shard | None) -> None:
    """Shards of one OUT run side by side, each under its own lock; an unsharded run (or a report
    merge) takes the main lock. Each kind probes the other's locks after taking its own, so of two
    that start together at least one sees the other and refuses: never both run."""
    if shard is not None:
        main = out_root / LOCK_NAME
        if lock_is_held(main):
            raise MoshiTTTError(
                f"in use by an unsharded moshi-ttt run or a report merge ({holder_of(main)}); wait for it to end",
                out_root,
            )
        return
    running = running_shards(out_root)
    if running:
        names = ", ".join(f"{s} ({holder})" for s, holder in running[:3]) + (" ..." if len(running) > 3 else "")
        raise MoshiTTTError(
            f"shards of a --shard run are writing here: {names}; wait for them to end, or run with --shard too",
            out_root,
        )
