"""Running many recordings: planning outputs, isolating failures, resuming, and the JSON report.

A single file is a batch of one, so every run gets the same guarantees: outputs appear under
their final name only when complete, existing outputs are kept unless asked, one bad file never
stops the others, and the report on disk always holds every file finished so far.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .audio import AUDIO_EXTENSIONS, PARTIAL_SUFFIX, SAMPLE_RATE, atomic_output, read_audio, write_text, write_wav
from .errors import AudioTooShortError, MoshiTTTError
from .runner import StreamingRunner

REPORT_SCHEMA = "moshi-ttt.report/1"
REPORT_NAME = "moshi-ttt-report.json"


@dataclass
class Job:
    input: Path
    output: Path
    text_output: Path | None = None


@dataclass
class FileResult:
    input: str
    output: str | None
    status: str  # "ok" | "failed" | "skipped"
    reason: str | None = None
    duration_s: float = 0.0
    frames: int = 0
    steps: int = 0
    wall_s: float = 0.0
    ttt: dict | None = None


def find_inputs(folder: Path, pattern: str | None = None, exclude: Path | None = None) -> list[Path]:
    """Audio files below `folder`, sorted; `pattern` (a glob) is matched against the path
    relative to `folder` and against the file name."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        if exclude is not None and exclude in path.parents:
            continue
        rel = path.relative_to(folder).as_posix()
        if pattern and not (fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(path.name, pattern)):
            continue
        found.append(path)
    return sorted(found)


def plan_jobs(source: Path, target: Path, pattern: str | None = None, text: bool = False) -> list[Job]:
    """Map inputs to outputs: a file to a file (or into a folder), a folder to a mirrored folder."""
    if source.is_file():
        output = target / f"{source.stem}.wav" if target.is_dir() else target
        return [Job(source, output, output.with_suffix(".txt") if text else None)]
    if not source.is_dir():
        raise MoshiTTTError("no such file or folder", source)
    if target.exists() and not target.is_dir():
        raise MoshiTTTError("input is a folder, so the output must be a folder too", target)
    jobs: list[Job] = []
    taken: set[Path] = set()
    inside = target.resolve() if target.resolve() != source.resolve() else None
    for path in find_inputs(source, pattern, exclude=inside):
        rel = path.relative_to(source)
        output = target / rel.with_suffix(".wav")
        if output in taken:  # a.wav and a.flac side by side: keep both, name the second by its full name
            output = target / rel.parent / f"{rel.name}.wav"
        taken.add(output)
        jobs.append(Job(path, output, output.with_suffix(".txt") if text else None))
    return jobs


class BatchEvents(tp.Protocol):
    """What a front end hears while a batch runs (progress bars, log lines)."""

    def file_started(self, index: int, total: int, job: Job, audio_s: float) -> None: ...
    def frames_done(self, done: int, total: int) -> None: ...
    def file_finished(self, index: int, total: int, result: FileResult) -> None: ...


class SilentEvents:
    """Hears nothing; also a context manager, like the front ends' event sinks."""

    def __enter__(self) -> "SilentEvents":
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        pass

    def file_started(self, index: int, total: int, job: Job, audio_s: float) -> None:
        pass

    def frames_done(self, done: int, total: int) -> None:
        pass

    def file_finished(self, index: int, total: int, result: FileResult) -> None:
        pass


@dataclass
class Report:
    settings: dict
    files: list[FileResult] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False

    def totals(self) -> dict:
        ok = [f for f in self.files if f.status == "ok"]
        audio_s = sum(f.duration_s for f in ok)
        return {
            "files": len(self.files),
            "ok": len(ok),
            "failed": sum(f.status == "failed" for f in self.files),
            "skipped": sum(f.status == "skipped" for f in self.files),
            "audio_s": round(audio_s, 3),
            "wall_s": round(self.wall_s, 3),
            # Seconds of processing per second of audio: below 1 is faster than real time.
            "real_time_factor": round(self.wall_s / audio_s, 4) if audio_s > 0 else 0.0,
        }

    def to_json(self) -> dict:
        data = {"schema": REPORT_SCHEMA, "settings": self.settings,
                "files": [asdict(f) for f in self.files], "totals": self.totals()}
        if self.interrupted:
            data["interrupted"] = True
        return data

    def write(self, path: Path) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


class BatchRunner:
    """Streams each job through one loaded model; see the module docstring for the guarantees."""

    def __init__(self, runner: StreamingRunner, settings: dict, report_path: Path | None = None,
                 overwrite: bool = False, events: BatchEvents | None = None):
        self.runner = runner
        self.report = Report(settings=settings)
        self.report_path = report_path
        self.overwrite = overwrite
        self.events: BatchEvents = events or SilentEvents()

    def run(self, jobs: list[Job]) -> Report:
        start = time.perf_counter()
        try:
            for index, job in enumerate(jobs):
                result = self._run_one(index, len(jobs), job)
                self.report.files.append(result)
                self.report.wall_s = time.perf_counter() - start
                self._save()
                self.events.file_finished(index, len(jobs), result)
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            self.report.wall_s = time.perf_counter() - start
            self._save()
        return self.report

    def _save(self) -> None:
        if self.report_path is not None:
            self.report.write(self.report_path)

    def _run_one(self, index: int, total: int, job: Job) -> FileResult:
        if job.output.exists() and not self.overwrite:
            return FileResult(str(job.input), str(job.output), "skipped", "exists")
        begin = time.perf_counter()
        try:
            pcm = read_audio(job.input)
        except AudioTooShortError as exc:
            return FileResult(str(job.input), None, "skipped", exc.reason)
        except MoshiTTTError as exc:
            return FileResult(str(job.input), None, "failed", exc.reason)
        duration = len(pcm) / SAMPLE_RATE
        self.events.file_started(index, total, job, duration)
        try:
            streamed = self.runner.run(pcm, progress=self.events.frames_done)
            if job.text_output is not None:
                write_text(job.text_output, self.runner.transcript(streamed.text_tokens) + "\n")
            write_wav(job.output, streamed.pcm)
        except MoshiTTTError as exc:
            return FileResult(str(job.input), None, "failed", exc.reason, duration_s=duration)
        except (RuntimeError, ValueError, OSError) as exc:
            # One file's failure (out of memory, a write error) must not stop the others.
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            return FileResult(str(job.input), None, "failed", reason, duration_s=duration)
        ttt = None
        model_ttt = self.runner.model.describe_ttt()
        if model_ttt is not None:
            ttt = {"variant": model_ttt["variant"], "chunk_size": model_ttt["chunk_size"],
                   "layers": [asdict(layer) for layer in streamed.ttt_layers]}
        return FileResult(str(job.input), str(job.output), "ok", None, duration_s=round(duration, 4),
                          frames=streamed.frames, steps=streamed.steps,
                          wall_s=round(time.perf_counter() - begin, 4), ttt=ttt)


def default_report_path(source: Path, target: Path) -> Path | None:
    """Directory mode writes a report by default; a single file only when asked."""
    return target / REPORT_NAME if source.is_dir() else None


def stale_partials(folder: Path) -> list[Path]:
    """Temporary outputs left by a killed run (kill -9 skips cleanup); never final outputs."""
    if not folder.is_dir():
        return []
    # Only names `partial_path` makes (`<name>.<pid>.partial`): a user's own `x.partial` is not ours.
    ours = re.compile(r".+\.\d+" + re.escape(PARTIAL_SUFFIX))
    return [p for p in folder.rglob(f"*{PARTIAL_SUFFIX}")
            if ours.fullmatch(p.name) and p.is_file() and not _pid_alive(p)]


def _pid_alive(path: Path) -> bool:
    try:
        pid = int(path.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
