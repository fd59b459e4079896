"""One batch run, start to end: the library's entry point.

`run_batch(source, target, options, events)` is what the CLI's `infer`, `score` and `demo`, the
tests and a notebook call. Its steps are ordered so that bad input costs a moment and nothing is
written before it is known to be safe:

1. the options, validated (`RunOptions.validate`); the process (device, dtype, threads;
   torch.compile off on CPU);
2. the plan: inputs, outputs, report, source protection, writability, the OUT lock and stale
   temporaries (`jobs.plan.prepare_batch`);
3. the checkpoints' configs, still without weights (`checkpoints.model.resolve_checkpoints`);
4. the model, loaded once (`make_worker`), then every job streamed, up to `batch_size` at once
   (`jobs.worker.FileWorker` under `jobs.driver.BatchRunner`), the report written after each
   file; or, with `backend="ray"`, the same worker on every actor of a Ray pool.

A KeyboardInterrupt propagates once the report is marked interrupted; the lock is always
released. Importing this module loads no torch: the model stack is imported by `make_worker`.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from .events import BatchEvents
from .jobs.driver import BatchRunner
from .jobs.plan import prepare_batch
from .options import RunOptions
from .report.schema import Report, RunSettings
from .runtime import prepare_runtime

if tp.TYPE_CHECKING:
    from .jobs.kinds import LossWeights
    from .jobs.worker import FileWorker

# Exit codes of a run (the CLI's): all files ok or skipped; some file failed; the run could not
# start (bad arguments, checkpoint, paths); the report could not be written (outputs are complete).
EXIT_OK, EXIT_FILES_FAILED, EXIT_CANNOT_START, EXIT_REPORT_FAILED = 0, 1, 2, 3
# Environment the Ray actors need to behave as this process does (moshi reads NO_TORCH_COMPILE when
# it is imported; offline runs must stay offline on the workers too).
PASSED_ENV = ("NO_TORCH_COMPILE", "HF_HUB_OFFLINE", "HF_HOME")


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


def make_worker(options: RunOptions, device: tp.Any, dtype: tp.Any, files: int = 1) -> FileWorker:
    """Load the model and wrap it in a `FileWorker` streaming up to `options.batch_size` of
    `files` recordings at once (`auto`: see `streaming/batch_size.py`; chosen after loading,
    from the memory the model left free), for `infer` jobs or, with `options.score`, `score` jobs:
    what `run_batch` runs, and what each Ray actor runs."""
    from .checkpoints.model import load_model
    from .jobs.worker import FileWorker
    from .streaming.batch_size import choose_batch_size

    options = options.validate()
    model = load_model(
        options.base,
        options.checkpoint,
        device=device,
        dtype=dtype,
        ttt_overrides=options.ttt_overrides(),
        step=options.step,
        streams=options.batch_size,
    )
    batch_size, reason = choose_batch_size(options.batch_size, model, files)
    if options.score is not None:
        from .jobs.kinds import ScoreFiles
        from .streaming.score_runner import ScoreRunner

        score = options.score
        runner = ScoreRunner(
            model,
            batch_size,
            ttt_enabled=options.ttt_enabled,
            timeline=options.timeline,
            user_stream=score.user_stream,
            text_stream=score.text_stream,
        )
        return FileWorker(
            ScoreFiles(runner, loss_weights(options, model), score.bucket_seconds), batch_size_reason=reason
        )
    from .streaming.batched import BatchedRunner

    runner = BatchedRunner(
        model,
        batch_size,
        seed=options.seed,
        ttt_enabled=options.ttt_enabled,
        timeline=options.timeline,
        sampling=options.sampling,
        decode_chunk=options.decode_chunk,
    )
    return FileWorker(runner, text_format=options.text_format, channel=options.channel, batch_size_reason=reason)


def loss_weights(options: RunOptions, model: tp.Any) -> LossWeights:
    """The weighted loss's weights: the run's options, else the fine-tune's training arguments,
    else moshi-finetune's defaults (`checkpoints.layouts.training_loss_weights`)."""
    from .checkpoints.layouts import training_loss_weights
    from .jobs.kinds import LossWeights

    recorded = training_loss_weights(model.finetune)
    score = tp.cast(tp.Any, options.score)
    first, first_source = recorded["first_codebook_weight_multiplier"]
    padding, padding_source = recorded["text_padding_weight"]
    if score.first_codebook_weight is not None:
        first, first_source = score.first_codebook_weight, "--first-codebook-weight"
    if score.text_padding_weight is not None:
        padding, padding_source = score.text_padding_weight, "--text-padding-weight"
    return LossWeights(first, first_source, padding, padding_source)


def run_settings(options: RunOptions, worker: FileWorker, threads: int | None) -> RunSettings:
    """The report's `settings`: what produced its outputs."""
    runner = worker.runner
    model = runner.model
    ttt = model.describe_ttt()
    score = None
    if options.score is not None:
        weights = worker.files.weights  # type: ignore[union-attr]
        context = model.context
        score = {
            "user_stream": options.score.user_stream,
            "text_stream": options.score.text_stream,
            "bucket_seconds": options.score.bucket_seconds,
            "context_frames": context,
            "context_s": None if context is None else round(context * 0.08, 3),
            "first_codebook_weight": {"value": weights.first_codebook, "source": weights.first_codebook_source},
            "text_padding_weight": {"value": weights.text_padding, "source": weights.text_padding_source},
        }
    return RunSettings(
        base=options.base,
        checkpoint=options.checkpoint,
        seed=options.seed,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        threads=threads,
        channel=None if options.score is not None else 0 if worker.channel is None else worker.channel,
        lm=model.describe_lm(),
        sampling=None if options.score is not None else runner.lm_gen_config,
        sampling_overrides=None if options.score is not None else options.sampling.overrides(),
        batch_size=runner.batch_size,
        batch_size_reason=worker.batch_size_reason,
        decode_chunk=getattr(runner, "decode_chunk", None),
        ttt=None if ttt is None else {**ttt, "enabled": options.ttt_enabled},
        score=score,
    )


# Files beside a fine-tune's weights that change what it computes (its TTT and LM configs).
FINETUNE_CONFIGS = ("config.json", "training_config.json", "args.yaml")


def origin_of(options: RunOptions, info: tp.Any, finetune: tp.Any, dtype: str) -> dict:
    """What this run's outputs are made by (`report.provenance`), from the checkpoints as
    `resolve_checkpoints` found them: known before any weights load, from a few MB of the files."""
    from .errors import CheckpointError
    from .report.provenance import describe_origin, fingerprint_files

    try:
        base_fingerprint = fingerprint_files(
            [info.moshi_weights, info.mimi_weights, info.tokenizer], extra=info.raw_config
        )
        finetune_fingerprint = None
        if finetune is not None:
            configs = {finetune.folder / name for name in FINETUNE_CONFIGS} | {finetune.config_source}
            present = sorted((p for p in configs if p is not None and p.is_file()), key=lambda p: p.name)
            finetune_fingerprint = fingerprint_files([finetune.weights, *present])
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint's files: {exc.strerror or exc}", exc.filename) from None
    sampling = options.sampling.apply(info.lm_gen_config or {})
    ttt = None if finetune is None else finetune.ttt
    return describe_origin(
        base=options.base,
        base_fingerprint=base_fingerprint,
        checkpoint=options.checkpoint,
        finetune_fingerprint=finetune_fingerprint,
        step=None if finetune is None else finetune.step,
        seed=options.seed,
        greedy=sampling.get("use_sampling", True) is False,
        ttt=None if ttt is None else options.ttt_enabled,
        delta_clip=getattr(ttt, "delta_clip", None),
        sampling=sampling,
        channel=options.channel,
        dtype=dtype,
        score=None if options.score is None else dataclasses.asdict(options.score),
    )


def run_batch(
    source: Path | str, target: Path | str, options: RunOptions | None = None, events: BatchEvents | None = None
) -> RunOutcome:
    """Stream every recording of `source` (a file, a folder or a `.jsonl` manifest) into `target`;
    see the module docstring for the order of things. Raises `MoshiTTTError` (`OptionError` for a
    bad setting) when the run cannot start. Without `events`, a library run shows a tqdm progress
    bar (`events.ProgressBar`); pass `SilentEvents()` for none."""
    options = (options or RunOptions()).validate()
    if events is None:
        from .events import ProgressBar

        events = ProgressBar()
    on_ray = options.backend == "ray"
    # What the user set for moshi, before this process sets its own (which the actors must not inherit).
    user_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    # With Ray the driver streams nothing: its process needs no GPU, the actors resolve the device.
    device, dtype, threads = prepare_runtime("cpu" if on_ray else options.device, options.dtype, options.threads)
    from .checkpoints.model import resolve_checkpoints

    plan = prepare_batch(
        Path(source),
        target,
        pattern=options.pattern,
        text=options.text,
        report=options.report,
        include_hidden=options.include_hidden,
        text_format=options.text_format,
        audio_format=options.audio_format,
        shard=tp.cast(tp.Any, options.shard),
        scores=options.score is not None,
        include_outputs=options.include_outputs,
    )
    backend: tp.Any = None
    batch: BatchRunner | None = None
    try:
        info, finetune = resolve_checkpoints(options.base, options.checkpoint, options.ttt_overrides(), options.step)
        dtype_name = str(dtype).removeprefix("torch.")
        if on_ray and options.dtype == "auto":  # the actors resolve it: as they will, where it is known here
            import torch

            from .runtime import resolve_dtype

            known = options.device != "auto"
            resolved = resolve_dtype("auto", torch.device(options.device)) if known else "auto"
            dtype_name = str(resolved).removeprefix("torch.")
        made_by = origin_of(options, info, finetune, dtype_name)
        what = options.base + (f" + {options.checkpoint}" if options.checkpoint else "")
        if not plan.jobs:  # a shard that got no file: its (empty) part says it is done, no model needed
            settings = RunSettings(base=options.base, checkpoint=options.checkpoint, seed=options.seed)
        elif on_ray:
            from .backends.ray import RayBackend

            # Ray starts (or is joined) only if some file needs streaming; the model's part of
            # the settings arrives with the first result.
            backend = RayBackend(options, env=user_env)
            settings = backend.settings
        else:
            with events.loading(what):
                backend = make_worker(options, device, dtype, len(plan.jobs))
            events.batch_size_chosen(backend.runner.batch_size, backend.batch_size_reason)
            settings = run_settings(options, backend, threads)
        settings.made_by = made_by
        batch = BatchRunner(
            backend,
            settings,
            report_path=plan.report_path,
            overwrite=options.overwrite,
            events=events,
            earlier=plan.earlier,
            text_format=options.text_format,
            redo_other=options.redo_other,
        )
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
