"""What the report costs on a large folder: a first run's bookkeeping, and a resume with every
output present.

    .venv/bin/python bench/report_scale.py [--files 10000] [--seconds 0.2] [--real-files 256]
        [--folder DIR] [--cli]

Writes a folder of `--files` tiny recordings (kept in `--folder` for reruns), then:

1. **first run, bookkeeping only**: the library's driver (`BatchRunner`, report and journal on)
   over the whole plan with a fake backend that writes each output (the bytes of a real 0.2 s
   output) and returns a result shaped like the tiny In-Place model's, instantly. Bookkeeping is
   the run's wall time minus the backend's own; it is compared with what the tiny model takes
   per file on this machine (`--real-files` files streamed for real, batch size 16), and the same
   real files are run with and without a report as a direct check.
2. **plan + resume**: `prepare_batch` (planning, source protection, the lock, reading the report)
   and a rerun of the driver with every output present (nothing to stream), then the same after
   `touch`ing every output (each is hashed again once).
3. with `--cli`: `moshi-ttt infer IN OUT --quiet` as a user runs it (process start, torch import,
   tiny model load included), over the folder the fake run left.

Entries carry the origin the CLI computes for the tiny checkpoint, so the CLI's resume takes them
as its own. Timing goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from moshi_ttt.jobs.driver import BatchRunner  # noqa: E402
from moshi_ttt.jobs.files import SAMPLE_RATE, atomic_output  # noqa: E402
from moshi_ttt.jobs.plan import Job, prepare_batch  # noqa: E402
from moshi_ttt.options import RunOptions  # noqa: E402
from moshi_ttt.report.schema import FileResult, FileTTT, LayerReport, RunSettings, sha256_of  # noqa: E402


def wav_bytes(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pcm = 0.3 * np.sin(np.arange(int(seconds * SAMPLE_RATE)) * 0.05) + rng.normal(0, 0.01, int(seconds * SAMPLE_RATE))
    buffer = io.BytesIO()
    sf.write(buffer, pcm.astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_corpus(folder: Path, files: int, seconds: float) -> None:
    """`files` recordings, 100 to a folder; skipped when the folder already holds them."""
    marker = folder / f".corpus-{files}-{seconds}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    data = wav_bytes(seconds, 0)
    for i in range(files):
        path = folder / f"d{i // 100:03d}" / f"rec_{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    marker.write_text("")


class FakeBackend:
    """Writes each output (real WAV bytes) atomically and describes it as the tiny In-Place model
    would (two TTT layers, a transcript): everything the worker hands the driver, at once."""

    def __init__(self, seconds: float):
        self.output = wav_bytes(seconds, 1)
        self.seconds = seconds
        self.busy = Span(0.0, 0.0)  # time spent here, not in the driver

    def results(self, jobs: list[tuple[int, Job]], total: int, events: tp.Any) -> tp.Iterator[tuple[int, FileResult]]:
        for index, job in jobs:
            begin = now()
            with atomic_output(job.output) as tmp:
                tmp.write_bytes(self.output)
            layers = [LayerReport(layer, 2, 1, 0, 1.234567, 1.2456789, 0.0123456, 0.0098765, 0) for layer in (1, 3)]
            result = FileResult(
                str(job.input),
                str(job.output),
                "ok",
                None,
                duration_s=self.seconds,
                frames=2,
                steps=2,
                wall_s=0.05,
                ttt=FileTTT("inplace", 8, layers),
                transcript="hello there",
                output_sha256=sha256_of(job.output),
            )
            self.busy += now() - begin
            yield index, result


class NoBackend:
    def results(self, jobs: list, total: int, events: tp.Any) -> tp.Iterator:
        raise AssertionError(f"a resume with every output present streamed {len(jobs)} files")


def origin_and_options(tiny: tp.Any) -> tuple[RunOptions, dict]:
    """The options the CLI gets and the origin it computes for them (before any model loads)."""
    from moshi_ttt.checkpoints.model import resolve_checkpoints
    from moshi_ttt.run import origin_of

    options = RunOptions(base=str(tiny.base), checkpoint=str(tiny.finetune), device="cpu").validate()
    info, finetune = resolve_checkpoints(options.base, options.checkpoint, options.ttt_overrides(), options.step)
    return options, origin_of(options, info, finetune, "float32")


def settings_for(options: RunOptions, made_by: dict, batch_size: int = 16) -> RunSettings:
    return RunSettings(
        base=options.base,
        checkpoint=options.checkpoint,
        seed=options.seed,
        device="cpu",
        dtype="float32",
        batch_size=batch_size,
        made_by=made_by,
    )


class Span(tp.NamedTuple):
    """Wall and CPU seconds (this process; CPU time is what a loaded machine cannot inflate)."""

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:.2f} s (cpu {self.cpu:.2f} s)"

    def __add__(self, other: tp.Any) -> Span:
        return Span(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: tp.Any) -> Span:
        return Span(self.wall - other.wall, self.cpu - other.cpu)


def now() -> Span:
    return Span(time.perf_counter(), time.process_time())


def timed(fn: tp.Callable[[], tp.Any]) -> tuple[Span, tp.Any]:
    begin = now()
    value = fn()
    return now() - begin, value


def plan_and_resume(src: Path, out: Path, options: RunOptions, made_by: dict) -> tuple[Span, Span, tp.Any]:
    plan_s, plan = timed(lambda: prepare_batch(src, out))
    try:
        runner = BatchRunner(
            NoBackend(), settings_for(options, made_by), report_path=plan.report_path, earlier=plan.earlier
        )
        resume_s, report = timed(lambda: runner.run(plan.jobs, keep=plan.keeps))
    finally:
        plan.lock.release()
    return plan_s, resume_s, report


def real_per_file(tiny: tp.Any, src: Path, files: int, root: Path) -> tuple[Span, Span, Span]:
    """Seconds per file of the tiny model on `files` recordings at batch size 16, without a
    report and with one (each run into a fresh folder; the fastest of three), and the load time."""
    from moshi_ttt.run import make_worker
    from moshi_ttt.runtime import prepare_runtime

    options = RunOptions(base=str(tiny.base), checkpoint=str(tiny.finetune), device="cpu", batch_size=16)
    device, dtype, _ = prepare_runtime("cpu", "float32", 1)
    load_s, worker = timed(lambda: make_worker(options.validate(), device, dtype, files))
    inputs = sorted(src.rglob("*.wav"))[:files]
    spans: dict[bool, list[Span]] = {False: [], True: []}
    for with_report in (False, True) * 3:  # alternated, the fastest of each kept: this machine is noisy
        out = root / "real"
        shutil.rmtree(out, ignore_errors=True)
        jobs = [Job(p, out / p.relative_to(src)) for p in inputs]
        settings = RunSettings(base="b", checkpoint="c", seed=1)
        runner = BatchRunner(worker, settings, report_path=(out / "r.json") if with_report else None)
        span, _ = timed(lambda: runner.run(jobs))  # noqa: B023  called at once
        spans[with_report].append(Span(span.wall / files, span.cpu / files))
    fastest = {k: Span(min(s.wall for s in v), min(s.cpu for s in v)) for k, v in spans.items()}
    return fastest[False], fastest[True], load_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--real-files", type=int, default=256)
    parser.add_argument("--folder", type=Path, default=None, help="keep the corpus here between runs")
    parser.add_argument("--cli", action="store_true", help="also time `moshi-ttt infer` resuming the folder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from moshi_ttt.checkpoints.tiny import write_tiny_variant

    root = args.folder or Path(tempfile.mkdtemp(prefix="moshi-ttt-report-scale-"))
    src, out = root / "in", root / "out"
    print(f"{args.files} files of {args.seconds} s in {root}")
    corpus_s, _ = timed(lambda: write_corpus(src, args.files, args.seconds))
    tiny = write_tiny_variant(root / "tiny", "inplace", seed=0)
    options, made_by = origin_and_options(tiny)
    print(f"corpus written in {corpus_s.wall:.1f} s")

    # 1. A first run: the driver's bookkeeping with a backend that costs nothing.
    shutil.rmtree(out, ignore_errors=True)
    plan_s, plan = timed(lambda: prepare_batch(src, out))
    backend = FakeBackend(args.seconds)
    try:
        settings = settings_for(options, made_by)
        runner = BatchRunner(backend, settings, report_path=plan.report_path, earlier=plan.earlier)
        first_s, report = timed(lambda: runner.run(plan.jobs, keep=plan.keeps))
    finally:
        plan.lock.release()
    assert report.totals()["ok"] == args.files, report.totals()
    bookkeeping = first_s - backend.busy
    per_file_ms = 1e3 * bookkeeping.cpu / args.files
    print(
        f"first run (fake backend): plan {plan_s}, run {first_s}, of which the backend {backend.busy} "
        f"and bookkeeping {bookkeeping}: {per_file_ms:.3f} ms of cpu per file"
    )
    if args.real_files:
        bare, reported, _ = real_per_file(tiny, src, args.real_files, root)
        print(
            f"tiny model, batch 16, {args.real_files} files, fastest of 3: {1e3 * bare.wall:.1f} ms per file "
            f"(cpu {1e3 * bare.cpu:.1f}) without a report, {1e3 * reported.wall:.1f} ms (cpu {1e3 * reported.cpu:.1f}) "
            f"with one ({100 * (reported.cpu / bare.cpu - 1):+.1f}% cpu); the fake run's bookkeeping per file is "
            f"{100 * per_file_ms / (1e3 * bare.cpu):.2f}% of a file's cpu time"
        )

    # 2. A resume with every output present: planning, and the driver skipping every file.
    plan_s, resume_s, report = plan_and_resume(src, out, options, made_by)
    totals = report.totals()
    assert totals["skipped"] == args.files and totals["made_by_other"] == 0, totals
    print(f"resume, all outputs present: plan {plan_s} + run {resume_s} = {plan_s + resume_s}")
    now = time.time() + 5
    for path in out.rglob("*.wav"):
        os.utime(path, (now, now))
    plan_s, resume_s, report = plan_and_resume(src, out, options, made_by)
    assert report.totals()["skipped"] == args.files and report.files[0].from_earlier_run
    print(f"resume after touching every output (each hashed again): plan {plan_s} + run {resume_s}")
    plan_s, resume_s, report = plan_and_resume(src, out, options, made_by)
    print(f"and the resume after that (stats trusted again): plan {plan_s} + run {resume_s}")

    if args.cli:
        script = Path(sys.executable).with_name("moshi-ttt")
        head = [str(script)] if script.exists() else [sys.executable, "-m", "moshi_ttt_cli.app"]
        command = [*head, "infer", str(src), str(out), "--base", str(tiny.base), "--checkpoint", str(tiny.finetune)]
        for extra in (["--quiet"], []):
            env = {**os.environ, "COLUMNS": "120"}
            before, begin = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            done = subprocess.run([*command, "--device", "cpu", *extra], capture_output=True, text=True, env=env)
            wall, after = time.perf_counter() - begin, resource.getrusage(resource.RUSAGE_CHILDREN)
            assert done.returncode == 0, done.stderr[-2000:]
            assert "warning" not in done.stderr, done.stderr[-2000:]
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            flags = " ".join(extra)
            print(f"`moshi-ttt infer IN OUT {flags}` resuming, all outputs present: {Span(wall, cpu)} (whole process)")
    print(f"kept in {root}" if args.folder else f"(temporary folder {root}; pass --folder to keep the corpus)")
    if not args.folder:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
