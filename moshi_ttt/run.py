"""One batch run, start to end: the library's entry point.

`run_batch(source, target, options, events)` is what the CLI's `infer` and `demo`, the tests and
a distributed backend call. Its steps are ordered so that bad input costs a moment and nothing is
written before it is known to be safe:

1. the process (device, dtype, threads; torch.compile off on CPU) and the seed;
2. the plan: inputs, outputs, report, source protection, writability, the OUT lock and stale
   temporaries (`batch.prepare_batch`);
3. the checkpoints' configs, still without weights (`model.resolve_checkpoints`);
4. the model, loaded once (`make_worker`), then every job streamed, up to `batch_size` at once
   (`batch.FileWorker` under `batch.BatchRunner`), the report written after each file.

A KeyboardInterrupt propagates once the report is marked interrupted; the lock is always
released. Importing this module is cheap: the heavy modules load inside `run_batch`.
"""

from __future__ import annotations

import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from .results import BatchEvents, Report, SilentEvents
from .runtime import DEFAULT_BASE, prepare_runtime
from .sampling import Sampling
from .ray_backend import PASSED_ENV, RayOptions
from .shards import Shard

# Exit codes of a run (the CLI's): all files ok or skipped; some file failed; the run could not
# start (bad arguments, checkpoint, paths); the report could not be written (outputs are complete).
EXIT_OK, EXIT_FILES_FAILED, EXIT_CANNOT_START, EXIT_REPORT_FAILED = 0, 1, 2, 3


@dataclass
class RunOptions:
    """Everything about a run except its inputs, outputs and front end."""

    base: str = DEFAULT_BASE
    checkpoint: str | None = None
    step: int | None = None  # a run folder's checkpoint_NNNNNN to load (default: the latest)
    ttt_enabled: bool = True  # False: the --no-ttt ablation (fast weights frozen)
    # Fields of the checkpoint's TTT config replaced for this run, e.g. {"delta_clip": None}.
    ttt_overrides: dict[str, tp.Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    seed: int = 4242  # reapplied at the start of every file
    pattern: str | None = None  # only inputs whose relative path or name matches this glob
    include_hidden: bool = False
    text: bool = False  # also write transcripts
    text_format: str = "txt"  # txt (words) | jsonl (timed words) | srt (subtitles); see transcripts.py
    # --channel: an index, left, right, mix, or None: channel 0, with a warning on two-track dialogues.
    channel: int | str | None = None
    audio_format: str | None = None  # wav | flac | ogg for outputs named into a folder (default wav)
    # Overrides of the checkpoint's lm_gen_config (temperatures, top-k, greedy).
    sampling: Sampling = field(default_factory=Sampling)
    overwrite: bool = False
    report: Path | None = None  # default: OUT/moshi-ttt-report.json in folder mode
    timeline: bool = False  # record every TTT update in the report (can be large)
    # Recordings streamed at once: a number, or "auto"/None (free GPU memory; the CPU default).
    batch_size: int | str | None = None
    # Frames of tokens per Mimi decode call (None: the device's default, see batched.py).
    decode_chunk: int | None = None
    shard: Shard | None = None  # --shard I/N: only this shard's inputs, into its own report part
    backend: str = "local"  # "local": stream in this process; "ray": on a Ray actor pool (ray_backend.py)
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class RunOutcome:
    report: Report
    report_path: Path | None
    report_error: str | None  # why the report could not be written at the end; None if it was

    @property
    def exit_code(self) -> int:
        if self.report_error is not None:
            return EXIT_REPORT_FAILED
        return EXIT_FILES_FAILED if self.report.totals()["failed"] else EXIT_OK


def make_worker(options: RunOptions, device: tp.Any, dtype: tp.Any, files: int = 1) -> tp.Any:
    """Load the model and wrap it in a `batch.FileWorker` streaming up to `options.batch_size`
    of `files` recordings at once (`auto`: see `batch_size.py`; chosen after loading, from the
    memory the model left free): what `run_batch` runs, and what each worker of a distributed
    backend runs."""
    from .audio import parse_channel
    from .batch import FileWorker
    from .batch_size import choose_batch_size, parse_batch_size
    from .batched import BatchedRunner
    from .model import load_model

    model = load_model(options.base, options.checkpoint, device=device, dtype=dtype,
                       ttt_overrides=options.ttt_overrides, step=options.step)
    batch_size, reason = choose_batch_size(parse_batch_size(options.batch_size), model, files)
    runner = BatchedRunner(model, batch_size, seed=options.seed, ttt_enabled=options.ttt_enabled,
                           timeline=options.timeline, sampling=options.sampling, decode_chunk=options.decode_chunk)
    return FileWorker(runner, text_format=options.text_format, channel=parse_channel(options.channel),
                      batch_size_reason=reason)


def run_settings(options: RunOptions, worker: tp.Any, threads: int | None) -> dict:
    """The report's `settings`: what produced its outputs."""
    runner = worker.runner
    model = runner.model
    ttt = model.describe_ttt()
    return {"base": options.base, "checkpoint": options.checkpoint, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "seed": options.seed, "threads": threads,
            "channel": 0 if worker.channel is None else worker.channel, "lm": model.describe_lm(),
            # What LMGen sampled with, and which of it this run changed.
            "sampling": runner.lm_gen_config, "sampling_overrides": options.sampling.overrides(),
            "batch_size": runner.batch_size, "batch_size_reason": worker.batch_size_reason,
            "decode_chunk": runner.decode_chunk,
            "ttt": None if ttt is None else {**ttt, "enabled": options.ttt_enabled}}


def run_batch(source: Path | str, target: Path | str, options: RunOptions | None = None,
              events: BatchEvents | None = None) -> RunOutcome:
    """Stream every recording of `source` (a file or a folder) into `target`; see the module
    docstring for the order of things. Raises `MoshiTTTError` when the run cannot start."""
    options = options or RunOptions()
    events = events or SilentEvents()
    # With Ray the driver streams nothing: its process needs no GPU, the actors resolve the device.
    on_ray = options.backend == "ray"
    # What the user set for moshi, before this process sets its own (which the actors must not inherit).
    user_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    device, dtype, threads = prepare_runtime("cpu" if on_ray else options.device, options.dtype, options.threads)
    from .audio import parse_channel
    from .batch import BatchRunner, prepare_batch
    from .batch_size import check_decode_chunk, parse_batch_size
    from .model import resolve_checkpoints
    from .runner import check_seed

    check_seed(options.seed)
    options.sampling.check()
    parse_channel(options.channel)
    parse_batch_size(options.batch_size)
    check_decode_chunk(options.decode_chunk)
    plan = prepare_batch(Path(source), target, pattern=options.pattern, text=options.text,
                         report=options.report, include_hidden=options.include_hidden,
                         text_format=options.text_format, audio_format=options.audio_format,
                         shard=options.shard)
    backend: tp.Any = None
    try:
        resolve_checkpoints(options.base, options.checkpoint, options.ttt_overrides, options.step)
        what = options.base + (f" + {options.checkpoint}" if options.checkpoint else "")
        if not plan.jobs:  # a shard that got no file: its (empty) part says it is done, no model needed
            settings = {"base": options.base, "checkpoint": options.checkpoint, "seed": options.seed}
        elif on_ray:
            from .ray_backend import RayBackend

            # Ray starts (or is joined) only if some file needs streaming; the model's part of
            # the settings arrives with the first result.
            backend = RayBackend(options, env=user_env)
            settings = backend.settings
        else:
            with events.loading(what):
                backend = make_worker(options, device, dtype, len(plan.jobs))
            events.batch_size_chosen(backend.runner.batch_size, backend.batch_size_reason)
            settings = run_settings(options, backend, threads)
        batch = BatchRunner(backend, settings, report_path=plan.report_path, overwrite=options.overwrite,
                            events=events, earlier=plan.earlier, text_format=options.text_format)
        if plan.shard is not None:
            batch.report.shard = {"index": plan.shard.index, "count": plan.shard.count, "planned": len(plan.jobs)}
        with events:
            report = batch.run(plan.jobs, keep=plan.keeps)
    finally:
        try:
            if on_ray and backend is not None:
                backend.close()
        finally:
            plan.lock.release()
    return RunOutcome(report, plan.report_path, batch.report_error)
