"""Planning a run: which recordings become which outputs, and what is checked before any model
loads (sources never written, OUT writable and locked, stale temporaries of killed runs removed).

A single file is a batch of one, so every run gets the same guarantees: outputs appear under
their final name only when complete, existing outputs are kept unless asked, one bad file never
stops the others, and the report on disk always holds every file finished so far.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiTTTError
from ..report.history import EarlierResults, earlier_results, read_report
from ..report.journal import journal_path
from ..report.schema import REPORT_NAME, FileResult
from ..report.shards import Shard, holder_of, lock_is_held, running_shards
from .audio import AUDIO_EXTENSIONS, is_our_temporary, output_format, temporary_of
from .guard import LOCK_NAME, OutputLock, check_sources_untouched, check_writable
from .manifest import is_manifest, read_manifest


@dataclass
class Job:
    input: Path
    output: Path
    text_output: Path | None = None
    duration_hint: float | None = None  # seconds, as a manifest says (for progress before reading)


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
    folder: Path, pattern: str | None = None, exclude: Path | None = None, include_hidden: bool = False
) -> list[Path]:
    """Audio files below `folder`, sorted; `pattern` (a glob) is matched against the path
    relative to `folder` and against the file name. Nothing under `exclude` (compared resolved,
    so `.` and `out` find the outputs of an earlier run in `./out`)."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
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
    return sorted(found)


def matches(rel: Path, pattern: str | None) -> bool:
    """`pattern` (a glob) matches the path relative to IN or the file name; no pattern matches all."""
    return not pattern or fnmatch.fnmatch(rel.as_posix(), pattern) or fnmatch.fnmatch(rel.name, pattern)


def plan_jobs(
    source: Path,
    target: Path | str,
    pattern: str | None = None,
    text: bool = False,
    include_hidden: bool = False,
    text_format: str = "txt",
    audio_format: str | None = None,
) -> list[Job]:
    """Map inputs to outputs: a file to a file (or into a folder), a folder or a `.jsonl` manifest
    to a folder mirroring the recordings' relative paths.

    `target` ending in "/" is a folder even if it does not exist yet. A single output is written
    in the format its extension names; outputs named here (into a folder) get `audio_format`'s
    extension (default wav). Transcripts are beside their output, with `text_format`'s extension.
    Paths are made absolute, so reports and resumes do not depend on the working folder.
    """
    suffix = f".{audio_format or 'wav'}"
    text_suffix = f".{text_format}"
    as_folder = str(target).endswith(("/", os.sep))
    source, target = Path(source).absolute(), Path(target).absolute()
    if is_manifest(source):
        root = source.parent
        inputs = [(root / e.rel, e.rel, e.duration) for e in read_manifest(source) if matches(e.rel, pattern)]
    elif source.is_file():
        output = target / f"{source.stem}{suffix}" if as_folder or target.is_dir() else target
        output_format(output)
        return [Job(source, output, output.with_suffix(text_suffix) if text else None)]
    elif not source.is_dir():
        raise MoshiTTTError("no such file or folder", source)
    else:
        inside = target if is_inside(target, source) else None  # our outputs in IN are not inputs
        inputs = [
            (path, path.relative_to(source), None)
            for path in find_inputs(source, pattern, exclude=inside, include_hidden=include_hidden)
        ]
    if target.exists() and not target.is_dir():
        raise MoshiTTTError("input is a folder or a manifest, so the output must be a folder too", target)
    if target.resolve() == source.resolve():
        raise MoshiTTTError(
            "the output folder is the input folder: outputs would replace the recordings; choose another output folder",
            target,
        )
    jobs: list[Job] = []
    taken: set[Path] = set()
    for path, rel, duration in inputs:
        output = target / rel.with_suffix(suffix)
        if output in taken:  # a.wav and a.flac side by side: keep both, name the second by its full name
            output = target / rel.parent / f"{rel.name}{suffix}"
        taken.add(output)
        jobs.append(Job(path, output, output.with_suffix(text_suffix) if text else None, duration))
    return jobs


def default_report_path(source: Path, target: Path) -> Path | None:
    """Folder and manifest runs write a report by default; a single file only when asked."""
    return Path(target).absolute() / REPORT_NAME if Path(source).is_dir() or is_manifest(Path(source)) else None


def stale_partials(folder: Path, finals: set[Path] | None = None) -> list[Path]:
    """Temporaries left by a killed run (kill -9 skips cleanup): only files this tool created
    (see `audio.is_our_temporary`) whose process is gone; never outputs, never a user's files.
    With `finals`, only temporaries of those final paths (a shard's own outputs: pids are
    host-local, so another machine's live temporary looks dead here)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob(".*") if (pid := is_our_temporary(p)) is not None and not _pid_alive(pid)]
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
    jobs = plan_jobs(source, target, pattern, text, include_hidden, text_format, audio_format)
    if audio_format is not None and jobs[0:1] and jobs[0].output.suffix.lower() != f".{audio_format}":
        raise MoshiTTTError(
            f"--format {audio_format} names outputs written into a folder, but OUT is a file "
            f"with another extension (end OUT with / for a folder)",
            jobs[0].output,
        )
    if not jobs:
        raise MoshiTTTError("no audio files found" + (f" matching {pattern!r}" if pattern else ""), source)
    report_path = Path(report).absolute() if report is not None else default_report_path(source, Path(target))
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
    if folder_mode:  # with the lock held, no run of ours is writing these
        finals = (
            None
            if shard is None
            else {p for job in jobs for p in (job.output, job.text_output) if p is not None}
            | {tp.cast(Path, report_path)}
        )
        for path in stale_partials(out_root, finals):
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
