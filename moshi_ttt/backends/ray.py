"""Running a batch's files on a Ray cluster (`infer --backend ray`): the driver plans, guards and
reports as a local run does; Ray Data runs the streaming on a pool of actors.

The driver (`run.run_batch` with `RunOptions.backend == "ray"`, `RunOptions.ray` saying how) keeps
everything that makes a run safe: the plan, the source checks, the OUT lock, skipping existing outputs, and the report,
written after every file. `RayBackend.results` hands the files left to do to Ray Data as small
rows (index, input, output, transcript paths) and `map_batches` them through a fixed pool of
`FileActor`s. Each actor loads the model once and runs the library's own `jobs.worker.FileWorker`, the
code a local run runs, so outputs are written the same way (atomically, into OUT, which every
node must see at the same path) and are the same bytes. Actors return one small row per file
(its `FileResult` as JSON), which the driver records in the report as it arrives.

Failures: a bad file is a failed row, as in a local run. An actor that dies (killed, out of
memory, node lost) is restarted by Ray and its unfinished task retried, both bounded
(`options.RayOptions.max_restarts`, `max_task_retries`); a retried file is simply streamed again and its
output rewritten atomically (same seed, same bytes), so it is never half-written or listed twice.
A file whose task still fails after the retries is a failed entry naming the reason, and the
other files go on (`max_errored_blocks`). Temporaries of dead actors are removed at the end.

Ray is optional (`pip install 'moshi-ttt[ray]'`) and imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import typing as tp
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import MoshiTTTError, first_line
from ..events import BatchEvents, SilentEvents
from ..jobs.files import is_our_temporary, temporary_of
from ..jobs.plan import Job
from ..options import RayOptions, RunOptions
from ..report.schema import FileResult, RunSettings, file_json, strict_json
from ..streaming.batch_size import CPU_BATCH_SIZE

INSTALL_HINT = "--backend ray needs Ray: pip install 'moshi-ttt[ray]'"
# Files per actor task on GPU with `--batch-size auto`: the streams an actor fills at once (a
# smaller batch size than auto would pick wastes some of the GPU, a larger one costs load balance
# and retries whole tasks).
GPU_FILES_PER_TASK = 16
# Report settings the driver decides; the rest (the model's, the worker's) come from the actors.
DRIVER_SETTINGS = ("base", "checkpoint", "seed", "backend", "workers", "gpus_per_worker", "made_by")


def require_ray() -> tp.Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MoshiTTTError(INSTALL_HINT) from None
    return ray


@dataclass
class Resolved:
    """RayOptions with every default decided."""

    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    files_per_task: int


class FileActor:
    """One worker of the pool: the model, loaded once, behind the library's `FileWorker`.

    Ray Data builds it once per actor (and again after a restart) and calls it with a batch of
    job rows; it returns one row per file, in the order they finish."""

    def __init__(self, options: RunOptions, files: int):
        from ..run import make_worker, run_settings
        from ..runtime import prepare_runtime

        options = options.validate()  # what the driver validated, checked where it is used
        device, dtype, threads = prepare_runtime(options.device, options.dtype, options.threads)
        self.worker = make_worker(options, device, dtype, files)
        self.settings = json.dumps(strict_json(run_settings(options, self.worker, threads).to_json()))

    def __call__(self, batch: dict[str, tp.Any]) -> dict[str, list]:
        jobs = [
            (int(index), Job(Path(str(source)), Path(str(output)), Path(str(text)) if text else None))
            for index, source, output, text in zip(
                batch["index"], batch["input"], batch["output"], batch["text_output"]
            )
        ]
        total = int(batch["total"][0]) if len(batch["total"]) else len(jobs)
        rows: dict[str, list] = {"index": [], "result": [], "settings": []}
        for index, result in self.worker.results(jobs, total, SilentEvents()):
            rows["index"].append(index)
            rows["result"].append(json.dumps(strict_json(file_json(result)), allow_nan=False))
            rows["settings"].append(self.settings)
        return rows


@dataclass
class RayBackend:
    """A `jobs.worker.Backend` that streams the jobs on a Ray actor pool, as `options.ray` says;
    see the module docstring.

    `settings` is the report's settings: the driver loads no model, so the model's part of it is
    filled in from the first result an actor returns (the record is updated in place)."""

    options: RunOptions
    settings: RunSettings = field(init=False)
    # Variables of `PASSED_ENV` the user set (see `run_batch`), given to every actor.
    env: dict[str, str] = field(default_factory=dict)
    started_ray: bool = False

    def __post_init__(self) -> None:
        # Actors may start in another folder (or on another machine): local checkpoint folders
        # are passed by absolute path.
        self.options = replace(
            self.options,
            base=_absolute_if_local(self.options.base),
            checkpoint=None if self.options.checkpoint is None else _absolute_if_local(self.options.checkpoint),
        )
        self.settings = RunSettings(
            base=self.options.base, checkpoint=self.options.checkpoint, seed=self.options.seed, backend="ray"
        )

    @property
    def ray_options(self) -> RayOptions:
        return self.options.ray

    def connect(self) -> Resolved:
        """Join the cluster at `address`, or start a local Ray instance; decide the defaults."""
        ray = require_ray()
        # Ray's own log lines are not ours to show: its Python loggers (Ray Data's too) say errors
        # only, and a core we start only what is fatal (the CLI's -q silences the rest).
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        if not ray.is_initialized():  # else: joined by the caller (a notebook, a test), left running
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
            try:
                ray.init(
                    address=self.ray_options.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    configure_logging=True,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.ray_options.address or "a local Ray instance"
                raise MoshiTTTError(f"cannot start Ray on {where}: {str(exc).splitlines()[0]}") from None
            self.started_ray = True
        resolved = self.resolved(ray.cluster_resources())
        self.settings.workers, self.settings.gpus_per_worker = resolved.workers, resolved.gpus_per_worker
        return resolved

    def resolved(self, resources: dict[str, float]) -> Resolved:
        """The defaults, from the cluster's resources: on GPU one actor per `gpus_per_worker`
        GPUs (default 1); on CPU one actor per `threads` cores (a 2-core machine: 2 actors of
        one thread)."""
        opts, ray_opts = self.options, self.ray_options
        gpus = float(resources.get("GPU", 0))
        on_gpu = opts.device.startswith("cuda") or (opts.device == "auto" and gpus > 0)
        per_gpu = ray_opts.gpus_per_worker if ray_opts.gpus_per_worker is not None else (1.0 if on_gpu else 0.0)
        if per_gpu > 0 and gpus < per_gpu:
            raise MoshiTTTError(f"--gpus-per-worker {per_gpu:g}, but the Ray cluster has {gpus:g} GPUs")
        threads = opts.threads or 1
        cpus = max(1.0, float(resources.get("CPU", 1)))
        workers = ray_opts.workers or (int(gpus // per_gpu) if per_gpu > 0 else max(1, int(cpus // threads)))
        if workers < 1:
            raise MoshiTTTError(f"--workers must be at least 1, got {workers}")
        return Resolved(workers, per_gpu, float(min(threads, cpus)), self.files_per_task(per_gpu > 0))

    def files_per_task(self, on_gpu: bool) -> int:
        """Files an actor is handed at once, all streamed together: the batch size when it is a
        number (then a Ray run computes what a local run with that batch size computes), else
        what `auto` picks on CPU, and `GPU_FILES_PER_TASK` on GPU."""
        if self.ray_options.files_per_task:
            return self.ray_options.files_per_task
        if isinstance(self.options.batch_size, int):
            return self.options.batch_size
        return GPU_FILES_PER_TASK if on_gpu else CPU_BATCH_SIZE

    def results(
        self, jobs: list[tuple[int, Job]], total: int, events: BatchEvents | None = None
    ) -> tp.Iterator[tuple[int, FileResult]]:
        events = events or SilentEvents()
        ray = require_ray()
        resolved = self.connect()
        rows = [
            {
                "index": index,
                "input": str(job.input),
                "output": str(job.output),
                "text_output": "" if job.text_output is None else str(job.text_output),
                "total": total,
            }
            for index, job in jobs
        ]
        by_index = dict(jobs)
        context = ray.data.DataContext.get_current()
        saved = (context.max_errored_blocks, context.enable_progress_bars)
        # A task that keeps failing after its retries loses its files (failed entries below),
        # not the whole run.
        context.max_errored_blocks, context.enable_progress_bars = -1, False
        seen: set[int] = set()
        error: str | None = None
        try:
            # Every actor gets work even when the files are few; `files` bounds each actor's batch.
            per_task = max(1, min(resolved.files_per_task, -(-len(rows) // resolved.workers)))
            dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_task))
            with warnings.catch_warnings():  # actor restarts are only reachable through ray_remote_args
                warnings.simplefilter("ignore")
                dataset = dataset.map_batches(
                    FileActor,
                    fn_constructor_kwargs={"options": self.options, "files": per_task},
                    batch_size=per_task,
                    compute=ray.data.ActorPoolStrategy(size=resolved.workers),
                    num_cpus=resolved.cpus_per_worker,
                    num_gpus=resolved.gpus_per_worker or None,
                    runtime_env={"env_vars": self.env} if self.env else None,
                    max_restarts=self.ray_options.max_restarts,
                    max_task_retries=self.ray_options.max_task_retries,
                )
            for row in dataset.iter_rows():
                index = int(row["index"])
                if index in seen:  # a retried task may return a file again: the first word stands
                    continue
                seen.add(index)
                if len(seen) == 1:
                    self._take_settings(row["settings"])
                result = FileResult.from_json(json.loads(row["result"]))
                for warning in result.warnings:
                    events.file_warning(by_index[index], warning)
                yield index, result
        except MoshiTTTError:
            raise
        except Exception as exc:  # noqa: BLE001  Ray's errors: the files not done fail, the run reports
            error = first_line(exc)
        finally:
            context.max_errored_blocks, context.enable_progress_bars = saved
        retries = self.ray_options.max_task_retries
        reason = (
            f"its Ray worker failed ({error})"
            if error
            else f"its Ray worker died while streaming it, and again on each of {retries} retries"
            if retries
            else "its Ray worker died while streaming it (no retries)"
        )
        for index, job in jobs:
            if index not in seen:
                yield index, FileResult(str(job.input), None, "failed", reason)
        discard_temporaries([job for _, job in jobs])

    def _take_settings(self, text: str) -> None:
        """The model's part of the settings, as the actor that streamed the first file saw it; what
        the driver decides (the checkpoints it was given, the seed, how Ray ran) stays the driver's."""
        theirs = RunSettings.from_json(json.loads(text))
        for name in (f.name for f in fields(RunSettings)):
            if name == "extra":
                self.settings.extra.update(theirs.extra)
            elif name not in DRIVER_SETTINGS:
                setattr(self.settings, name, getattr(theirs, name))

    def close(self) -> None:
        """Stop the local Ray instance this backend started (a cluster it joined keeps running)."""
        if self.started_ray:
            ray = require_ray()
            ray.shutdown()
            self.started_ray = False


def discard_temporaries(jobs: list[Job]) -> None:
    """Once the pool is done no actor writes these outputs any more: temporaries of them left by
    an actor that died are removed, whatever machine wrote them (its pid means nothing here)."""
    finals: dict[Path, set[str]] = {}
    for job in jobs:
        for path in (job.output, job.text_output):
            if path is not None:
                finals.setdefault(path.parent, set()).add(path.name)
    for folder, names in finals.items():
        with contextlib.suppress(OSError):
            for path in folder.iterdir():
                if path.name.startswith(".") and is_our_temporary(path) is not None and temporary_of(path) in names:
                    with contextlib.suppress(OSError):
                        path.unlink()


def _absolute_if_local(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.absolute()) if path.exists() else name
