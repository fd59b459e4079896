"""Running many recordings: planning outputs, isolating failures, resuming, and the JSON report.

A single file is a batch of one, so every run gets the same guarantees: outputs appear under
their final name only when complete, existing outputs are kept unless asked, one bad file never
stops the others, and the report on disk always holds every file finished so far.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import os
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import (AUDIO_EXTENSIONS, FOLDER_AUDIO_FORMATS, SAMPLE_RATE, AudioWriter, is_our_temporary,
                    output_format, probe_duration, read_recording, temporary_of, write_text)
from .errors import AudioTooShortError, MoshiTTTError
from .guard import LOCK_NAME, OutputLock, check_sources_untouched, check_writable
from .manifest import is_manifest, read_manifest
from .results import (REPORT_NAME, REPORT_SCHEMA, BatchEvents, FileResult, FileTTT, Job, Report, SilentEvents,
                      sha256_of, strict_json)
from .runner import StreamResult, timed_words_of, transcript_of
from .shards import Shard, find_parts, holder_of, lock_is_held, read_report_file, running_shards
from .transcripts import TEXT_FORMATS, render_transcript

if tp.TYPE_CHECKING:
    from .batched import BatchedRunner

__all__ = ["REPORT_NAME", "REPORT_SCHEMA", "Backend", "BatchEvents", "BatchPlan", "BatchRunner", "FileResult",
           "FileWorker", "Job", "Report", "SilentEvents", "find_inputs", "plan_jobs", "prepare_batch", "strict_json"]

def is_junk(rel: Path, include_hidden: bool = False) -> bool:
    """macOS AppleDouble files (`._x.wav`) are never recordings; hidden files and folders are
    skipped unless asked for."""
    if rel.name.startswith("._"):
        return True
    return not include_hidden and any(part.startswith(".") for part in rel.parts)


def is_inside(path: Path, folder: Path) -> bool:
    """`path` lies strictly below `folder`, links resolved."""
    return folder.resolve() in path.resolve().parents


def find_inputs(folder: Path, pattern: str | None = None, exclude: Path | None = None,
                include_hidden: bool = False) -> list[Path]:
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


def plan_jobs(source: Path, target: Path | str, pattern: str | None = None, text: bool = False,
              include_hidden: bool = False, text_format: str = "txt", audio_format: str | None = None) -> list[Job]:
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
        inputs = [(path, path.relative_to(source), None)
                  for path in find_inputs(source, pattern, exclude=inside, include_hidden=include_hidden)]
    if target.exists() and not target.is_dir():
        raise MoshiTTTError("input is a folder or a manifest, so the output must be a folder too", target)
    if target.resolve() == source.resolve():
        raise MoshiTTTError("the output folder is the input folder: outputs would replace the recordings; "
                            "choose another output folder", target)
    jobs: list[Job] = []
    taken: set[Path] = set()
    for path, rel, duration in inputs:
        output = target / rel.with_suffix(suffix)
        if output in taken:  # a.wav and a.flac side by side: keep both, name the second by its full name
            output = target / rel.parent / f"{rel.name}{suffix}"
        taken.add(output)
        jobs.append(Job(path, output, output.with_suffix(text_suffix) if text else None, duration))
    return jobs


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
            kept.append(carried(earlier, "not selected in this run") if earlier else
                        FileResult(entry.input, entry.output, "skipped", "not selected in this run"))
        return kept


def carried(earlier: FileResult, reason: str) -> FileResult:
    """An earlier run's result for a file this run skipped: its numbers, marked as earlier."""
    return dataclasses.replace(earlier, status="skipped", reason=reason, from_earlier_run=True)


class Backend(tp.Protocol):
    """What streams the jobs a run has to do: `FileWorker` in this process, or a distributed
    backend whose workers each run a `FileWorker`."""

    def results(self, jobs: list[tuple[int, Job]], total: int,
                events: BatchEvents) -> tp.Iterator[tuple[int, FileResult]]:
        """Each job's result as soon as it is known (any order), keyed by its index in the plan
        of `total` jobs. A bad file gives a failed or skipped result, never an exception.
        `events` hears what the backend can tell of files in progress (starts, frames, warnings)."""
        ...


@dataclass
class _InFlight:
    """A file being streamed: its job, its output writer, and what is known of it so far."""

    job: Job
    writer: AudioWriter
    duration: float
    begin: float
    warnings: list[str]
    error: Exception | None = None  # the output could not be written; the file fails at its end


class FileWorker:
    """Runs jobs on one loaded model: reads each recording, streams up to the runner's batch size
    at once, writes each output block by block to a temporary renamed into place when complete,
    and describes each file in a `FileResult`. A local run and each distributed worker run this.

    A file that cannot be read or written fails alone. A failure inside a batched step (e.g. out
    of memory) fails the files streaming at that moment, not the others: the worker starts a
    fresh batch for the files left.
    """

    def __init__(self, runner: BatchedRunner, text_format: str = "txt", channel: int | str | None = None,
                 batch_size_reason: str = ""):
        self.runner = runner
        self.batch_size_reason = batch_size_reason  # how the runner's batch size was chosen
        self.text_format = text_format
        self.channel = channel  # see audio.pick_channel

    def results(self, jobs: list[tuple[int, Job]], total: int,
                events: BatchEvents | None = None) -> tp.Iterator[tuple[int, FileResult]]:
        events = events or SilentEvents()
        pending = iter(jobs)
        known: collections.deque[tuple[int, FileResult]] = collections.deque()  # results not streamed
        flights: dict[int, _InFlight] = {}

        def recordings() -> tp.Iterator[tuple[int, np.ndarray]]:
            for index, job in pending:
                begin = time.perf_counter()
                try:
                    recording = read_recording(job.input, self.channel)
                except AudioTooShortError as exc:
                    known.append((index, FileResult(str(job.input), None, "skipped", exc.reason)))
                    continue
                except MoshiTTTError as exc:
                    known.append((index, FileResult(str(job.input), None, "failed", exc.reason)))
                    continue
                duration = len(recording.pcm) / SAMPLE_RATE
                try:
                    writer = AudioWriter(job.output)
                except (MoshiTTTError, OSError) as exc:
                    known.append((index, FileResult(str(job.input), None, "failed", _reason(exc),
                                                    duration_s=duration)))
                    continue
                flights[index] = _InFlight(job, writer, duration, begin, recording.warnings)
                events.file_started(index, total, job, duration)
                for warning in recording.warnings:
                    events.file_warning(job, warning)
                yield index, recording.pcm

        def write(index: int, block: np.ndarray) -> None:
            flight = flights[index]
            if flight.error is None:
                try:
                    flight.writer.write(block)
                except OSError as exc:  # disk full: this file fails at its end, the others go on
                    flight.error = exc

        try:
            while True:
                try:
                    for index, streamed in self.runner.run(recordings(), on_audio=write, progress=events.frames_done):
                        yield from _drain(known)
                        yield index, self._finish(flights.pop(index), streamed)
                    yield from _drain(known)
                    return
                except (RuntimeError, ValueError, OSError) as exc:
                    # The step that failed was every streaming file's: those fail, the rest go on.
                    for index, flight in flights.items():
                        flight.writer.abort()
                        known.append((index, FileResult(str(flight.job.input), None, "failed", _os_reason(exc),
                                                        duration_s=flight.duration)))
                    flights.clear()
                    yield from _drain(known)
        finally:  # interrupted: no temporaries left behind
            for flight in flights.values():
                flight.writer.abort()

    def _finish(self, flight: _InFlight, streamed: StreamResult) -> FileResult:
        job, model = flight.job, self.runner.model
        try:
            if flight.error is not None:
                raise flight.error
            transcript = transcript_of(model, streamed.text_tokens)
            if job.text_output is not None:
                write_text(job.text_output, render_transcript(self.text_format, transcript,
                                                              timed_words_of(model, streamed)))
            flight.writer.commit()
            digest = sha256_of(job.output)
        except (MoshiTTTError, RuntimeError, ValueError, OSError) as exc:
            flight.writer.abort()
            return FileResult(str(job.input), None, "failed", _reason(exc), duration_s=flight.duration)
        model_ttt = model.describe_ttt()
        ttt = None if model_ttt is None else FileTTT(model_ttt["variant"], model_ttt["chunk_size"],
                                                     list(streamed.ttt_layers))
        return FileResult(str(job.input), str(job.output), "ok", None, duration_s=round(flight.duration, 4),
                          frames=streamed.frames, steps=streamed.steps,
                          wall_s=round(time.perf_counter() - flight.begin, 4), ttt=ttt, transcript=transcript,
                          output_sha256=digest, warnings=flight.warnings)


def _drain(known: collections.deque) -> tp.Iterator[tp.Any]:
    while known:
        yield known.popleft()


class BatchRunner:
    """Drives a run: keeps existing outputs (with their earlier results), hands the other jobs to
    a `Backend`, and records every result in the report as it arrives; see the module docstring
    for the guarantees."""

    def __init__(self, backend: Backend, settings: dict, report_path: Path | None = None,
                 overwrite: bool = False, events: BatchEvents | None = None,
                 earlier: EarlierResults | None = None, text_format: str = "txt"):
        self.backend = backend
        self.text_format = text_format
        self.report = Report(settings=settings)
        self.report_path = report_path
        self.overwrite = overwrite
        self.events: BatchEvents = events or SilentEvents()
        self.earlier = earlier or EarlierResults()
        # Why the last report write failed; None once a write succeeds again.
        self.report_error: str | None = None

    def run(self, jobs: list[Job], keep: tp.Callable[[FileResult], bool] | None = None) -> Report:
        """`keep`: which earlier entries of files this run does not plan the report lists (all)."""
        start = time.perf_counter()
        self.report.earlier = self.earlier.others(jobs, keep)
        self.events.batch_started([job.duration_hint if job.duration_hint is not None else probe_duration(job.input)
                                   for job in jobs])
        done: dict[int, FileResult] = {}

        def record(index: int, result: FileResult) -> None:
            done[index] = result
            self.report.files = [done[i] for i in sorted(done)]  # plan order, whatever finished first
            self.report.wall_s = time.perf_counter() - start
            self._save()
            self.events.file_finished(index, len(jobs), result)

        try:
            todo = []
            for index, job in enumerate(jobs):
                if job.output.exists() and not self.overwrite:
                    record(index, self._skip_existing(job))
                else:
                    todo.append((index, job))
            if todo:
                results = self.backend.results(todo, len(jobs), self.events)
                try:
                    for index, result in results:
                        record(index, result)
                finally:  # interrupted between files: the backend drops its temporaries now
                    getattr(results, "close", lambda: None)()
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            self.report.wall_s = time.perf_counter() - start
            self._save()
        return self.report

    def _save(self) -> None:
        """A report that cannot be written (disk full, folder gone) is said once, not fatal:
        the outputs still get made, and the next write may succeed."""
        if self.report_path is None:
            return
        try:
            self.report.write(self.report_path)
        except OSError as exc:
            reason = f"cannot write the report: {exc.strerror or exc}"
            if reason != self.report_error:
                self.events.report_failed(self.report_path, reason)
            self.report_error = reason
        else:
            self.report_error = None

    def _skip_existing(self, job: Job) -> FileResult:
        """The output exists: keep it, and keep what the run that wrote it recorded about it."""
        try:
            earlier = self.earlier.for_output(job.output)
            result = carried(earlier, "exists") if earlier else FileResult(str(job.input), str(job.output), "skipped", "exists")
            if job.text_output is not None and not job.text_output.exists():
                if result.transcript is not None and self.text_format == "txt":
                    write_text(job.text_output, result.transcript + "\n")
                    result.reason = "exists; transcript written from the earlier run's result"
                else:  # the report keeps the words, not their times
                    result.reason = "exists; its transcript needs recomputing: rerun with --overwrite"
            return result
        except OSError as exc:
            return FileResult(str(job.input), str(job.output), "failed", _os_reason(exc))


def _os_reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _reason(exc: Exception) -> str:
    """What a report says of a file's failure: our own errors say it already."""
    return exc.reason if isinstance(exc, MoshiTTTError) else _os_reason(exc)


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


def check_formats(text_format: str, audio_format: str | None) -> None:
    if text_format not in TEXT_FORMATS:
        raise MoshiTTTError(f"unknown transcript format {text_format!r}: use one of {', '.join(TEXT_FORMATS)}")
    if audio_format is not None and audio_format not in FOLDER_AUDIO_FORMATS:
        raise MoshiTTTError(f"unknown output format {audio_format!r}: use one of {', '.join(FOLDER_AUDIO_FORMATS)}")


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


def prepare_batch(source: Path, target: Path | str, *, pattern: str | None = None, text: bool = False,
                  report: Path | None = None, include_hidden: bool = False, text_format: str = "txt",
                  audio_format: str | None = None, shard: Shard | None = None) -> BatchPlan:
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
    check_formats(text_format, audio_format)
    jobs = plan_jobs(source, target, pattern, text, include_hidden, text_format, audio_format)
    if audio_format is not None and jobs[0:1] and jobs[0].output.suffix.lower() != f".{audio_format}":
        raise MoshiTTTError(f"--format {audio_format} names outputs written into a folder, but OUT is a file "
                            f"with another extension (end OUT with / for a folder)", jobs[0].output)
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
    check_sources_untouched(sources, [*outputs, *([report_path] if report_path else [])])
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
        finals = None if shard is None else \
            {p for job in jobs for p in (job.output, job.text_output) if p is not None} | {tp.cast(Path, report_path)}
        for path in stale_partials(out_root, finals):
            with contextlib.suppress(OSError):
                path.unlink()
    return BatchPlan(source=source, jobs=jobs, report_path=report_path, earlier=earlier, lock=lock, shard=shard,
                     root=root)


def check_no_other_kind(out_root: Path, shard: Shard | None) -> None:
    """Shards of one OUT run side by side, each under its own lock; an unsharded run (or a report
    merge) takes the main lock. Each kind probes the other's locks after taking its own, so of two
    that start together at least one sees the other and refuses: never both run."""
    if shard is not None:
        main = out_root / LOCK_NAME
        if lock_is_held(main):
            raise MoshiTTTError(f"in use by an unsharded moshi-ttt run or a report merge ({holder_of(main)}); "
                                "wait for it to end", out_root)
        return
    running = running_shards(out_root)
    if running:
        names = ", ".join(f"{s} ({holder})" for s, holder in running[:3]) + (" ..." if len(running) > 3 else "")
        raise MoshiTTTError(f"shards of a --shard run are writing here: {names}; wait for them to end, "
                            "or run with --shard too", out_root)


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
    ordered = [r.data for r in reports if r.mtime_ns > own_time] + [own] + \
        [r.data for r in reports if r.mtime_ns <= own_time]
    return EarlierResults(*ordered)
