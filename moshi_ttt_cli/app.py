"""The `moshi-ttt` command line: parse, call the library, render. No model logic lives here.

Library modules that import moshi are imported inside the commands, after `--device` is known:
moshi decides at import time whether to torch.compile, which must be off on CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import typing as tp
from enum import Enum
from pathlib import Path

# Ctrl-C while modules import (torch takes seconds) must be one line, not an import traceback.
# Some import-time code swallows KeyboardInterrupt, so the interrupt is also remembered and acted
# on once the imports are done.
_start_up_signals: list[int] = []


def _remember_sigint(signum: int, frame: tp.Any) -> None:
    _start_up_signals.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _remembering_interrupts() -> tp.Iterator[None]:
    """Run imports with SIGINT remembered; raise KeyboardInterrupt after them if one was swallowed.
    Leaves a handler someone else installed (a test runner, an embedding program) alone."""
    previous = signal.getsignal(signal.SIGINT)
    ours = previous is signal.default_int_handler
    _start_up_signals.clear()
    if ours:
        signal.signal(signal.SIGINT, _remember_sigint)
    try:
        yield
    except Exception:
        # An interrupt that landed inside an import can break a later import of the same
        # module (numpy: "CPU dispatcher tracer already initialized"): it is still the interrupt.
        if _start_up_signals:
            raise KeyboardInterrupt from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)
    if _start_up_signals:
        raise KeyboardInterrupt


if None in (sys.stdin, sys.stdout, sys.stderr):  # started with a closed stream: see render
    from .render import reopen_closed_standard_streams

    reopen_closed_standard_streams()

try:
    with _remembering_interrupts():
        import typer
        from rich.console import Console
        from rich.markup import escape

        from moshi_ttt import __version__
        from moshi_ttt.errors import MoshiTTTError
        from moshi_ttt.jobs.files import FOLDER_AUDIO_FORMATS
        from moshi_ttt.options import OptionError, RayOptions, RunOptions, Sampling, ScoreOptions
        from moshi_ttt.run import EXIT_CANNOT_START
        from moshi_ttt.runtime import DEFAULT_BASE, DTYPE_NAMES, prepare_runtime
        from moshi_ttt.streaming.transcripts import TEXT_FORMATS
        from moshi_ttt.ttt.families import FAMILY_NAMES

        from . import render
except KeyboardInterrupt:
    sys.stderr.write("interrupted during start-up\n")
    raise SystemExit(130) from None

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Offline inference for Moshi fine-tuned with Test-Time Training layers.",
)
# Output to people and to pipes never stops a run: a reader that goes away only silences it.
out = Console(file=render.SafeStream("stdout"))
err = Console(file=render.SafeStream("stderr"), stderr=True)


class BackendName(str, Enum):
    local = "local"
    ray = "ray"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DType = Enum("DType", {name: name for name in ("auto", *DTYPE_NAMES)}, type=str)


TextFormat = Enum("TextFormat", {name: name for name in TEXT_FORMATS}, type=str)
AudioFormat = Enum("AudioFormat", {name: name for name in FOLDER_AUDIO_FORMATS}, type=str)


# make-tiny's --variant: a base checkpoint alone, or one fine-tune per registered TTT family.
Variant = Enum("Variant", {name: name for name in ("base", *FAMILY_NAMES)}, type=str)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it stops exactly as Ctrl-C does."""


def _terminate(signum: int, frame: tp.Any) -> None:
    raise Terminated()


# Exit codes: `moshi_ttt.run`'s (0 ok, 1 some file failed, 2 cannot start, 3 report not written),
# and 130/143 when interrupted by SIGINT/SIGTERM.


# The flag of each `RunOptions` setting, for errors that name a setting.
FLAGS = {
    "ttt_enabled": "--no-ttt",
    "pattern": "--glob",
    "text_format": "--text-format",
    "audio_format": "--format",
    "include_hidden": "--include-hidden",
    "sampling.temp": "--temp",
    "sampling.temp_text": "--temp-text",
    "sampling.top_k": "--top-k",
    "sampling.top_k_text": "--top-k-text",
    "sampling.greedy": "--greedy",
    "ray.address": "--ray-address",
    "ray.workers": "--workers",
    "ray.gpus_per_worker": "--gpus-per-worker",
    "score.user_stream": "--user-stream",
    "score.text_stream": "--text-stream",
    "score.bucket_seconds": "--bucket-seconds",
    "score.first_codebook_weight": "--first-codebook-weight",
    "score.text_padding_weight": "--text-padding-weight",
}


def flag_of(setting: str) -> str:
    return FLAGS.get(setting, "--" + setting.rpartition(".")[2].replace("_", "-"))


def flag_message(exc: OptionError) -> str:
    """An option error as the command line says it: the flag, not the library's setting name."""
    detail = exc.detail.replace("backend ray", "--backend ray").replace("use greedy", "use --greedy")
    detail = detail.replace("device cpu", "--device cpu")
    return f"{', '.join(flag_of(s) for s in exc.setting.split(', '))} {detail}"


@contextlib.contextmanager
def user_errors() -> tp.Iterator[None]:
    """Bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except OptionError as exc:
        err.print(f"[bold red]error:[/] {escape(flag_message(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT_START) from None
    except MoshiTTTError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT_START) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"moshi-ttt {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Offline inference for Moshi fine-tuned with Test-Time Training layers."""


def _load_model_stack(device: str, dtype: str, threads: int | None) -> None:
    """Prepare the process for `device` and import torch and moshi (seconds), so Ctrl-C during
    the imports is one line like any other start-up interrupt."""
    with _remembering_interrupts():
        prepare_runtime(device, dtype, threads)
        import moshi_ttt.jobs.worker  # noqa: F401
        import moshi_ttt.streaming.batched  # noqa: F401  the model stack


# Options: each declared once, as an annotated type, and used by every command that takes it.
Source = tp.Annotated[
    Path,
    typer.Argument(
        metavar="IN",
        help="A recording, a folder searched recursively, or a "
        '.jsonl manifest of {"path", "duration"} lines (paths relative to it).',
    ),
]
Base = tp.Annotated[str, typer.Option(help="Base Moshi: Hugging Face repo id or local folder.")]
Checkpoint = tp.Annotated[
    str | None, typer.Option(help="TTT fine-tune folder (consolidated/, checkpoint or run folder).")
]
Step = tp.Annotated[int | None, typer.Option(help="Run folder: load checkpoint_NNNNNN of this step (default: latest).")]
NoTTT = tp.Annotated[bool, typer.Option("--no-ttt", help="Keep fast weights frozen (ablation).")]
DeltaClip = tp.Annotated[
    str | None,
    typer.Option(
        "--delta-clip",
        metavar="TAU|none",
        help="In-Place TTT: bound on each chunk's delta norm (before "
        "the learning rate), overriding the checkpoint; 'none' turns clipping off.",
    ),
]
DeviceOption = tp.Annotated[Device, typer.Option("--device")]
DTypeOption = tp.Annotated[DType, typer.Option("--dtype", help="auto: bfloat16 on GPU, float32 on CPU.")]
Threads = tp.Annotated[int | None, typer.Option(help="CPU intra-op threads (default: chosen for this machine).")]
Glob = tp.Annotated[str | None, typer.Option(help="Only inputs whose relative path or name matches.")]
IncludeHidden = tp.Annotated[
    bool, typer.Option("--include-hidden", help="Also take hidden files and folders as inputs (never macOS ._ files).")
]
IncludeOutputs = tp.Annotated[
    bool,
    typer.Option(
        "--include-outputs",
        help="Also take recordings in folders of IN holding a moshi-ttt report or lock (other runs' outputs).",
    ),
]
Overwrite = tp.Annotated[bool, typer.Option("--overwrite", help="Redo files whose output exists.")]
RedoOther = tp.Annotated[
    bool,
    typer.Option(
        "--redo-other",
        help="Redo existing outputs the report says another model or other "
        "output-changing settings made (kept and counted otherwise).",
    ),
]
Quiet = tp.Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables; errors still print.")]
JsonSummary = tp.Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON summary line to stdout (totals, report path) and nothing else "
        "there; progress goes to stderr.",
    ),
]
BatchSize = tp.Annotated[
    str,
    typer.Option(
        "--batch-size",
        metavar="B|auto",
        help="Recordings streamed at once, each with its own fast "
        "weights (auto: as many as fit in free GPU memory; at most 16 on CPU).",
    ),
]
ShardOption = tp.Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Process only shard I of N (by a hash of each file's relative "
        "path) into a report part (REPORT.shard-I-of-N.json); `moshi-ttt report merge OUT` joins them.",
    ),
]
BackendOption = tp.Annotated[
    BackendName,
    typer.Option(
        "--backend",
        help="local: stream in this process; ray: on a Ray actor pool "
        "(pip install 'moshi-ttt[ray]'), outputs and report as local.",
    ),
]
RayAddress = tp.Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDR",
        help="--backend ray: a running cluster (e.g. auto, ray://head:10001); default: start a local Ray instance.",
    ),
]
Workers = tp.Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="--backend ray: actors, each with its own model (default: one per GPU on GPU, "
        "one per --threads cores on CPU).",
    ),
]
GpusPerWorker = tp.Annotated[
    float | None,
    typer.Option("--gpus-per-worker", help="--backend ray: GPUs per actor (default 1 on GPU, 0 on CPU)."),
]


class UserStream(str, Enum):
    silence = "silence"
    copy = "copy"
    none = "none"


class TextStream(str, Enum):
    pad = "pad"
    none = "none"


def _run_command(
    source: Path,
    target: str,
    *,
    quiet: bool,
    json_summary: bool,
    details: bool | None,
    device: Device,
    dtype: DType,
    backend: BackendName,
    ray_address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    **settings: tp.Any,
) -> None:
    """What `infer` and `score` do once parsed: one `RunOptions`, validated before anything loads
    (errors name the flag), Ray looked for where asked, then the run."""
    with user_errors():
        options = RunOptions(
            device=device.value,
            dtype=dtype.value,
            backend=backend.value,
            ray=RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker),
            **settings,
        ).validate()
        if options.backend == "ray":
            from moshi_ttt.backends.ray import require_ray

            require_ray()
    raise typer.Exit(_run(source, target, options, details, quiet, json_summary))


@app.command()
def infer(
    source: Source,
    target: tp.Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="Output file (format by extension), or folder "
            "mirroring IN's layout (end it with / to create one for a single "
            "file).",
        ),
    ],
    base: Base = DEFAULT_BASE,
    checkpoint: Checkpoint = None,
    step: Step = None,
    no_ttt: NoTTT = False,
    delta_clip: DeltaClip = None,
    device: DeviceOption = Device.auto,
    dtype: DTypeOption = DType.auto,
    seed: tp.Annotated[int, typer.Option(help="RNG seed (0 to 2^32-1), reapplied at the start of every file.")] = 4242,
    threads: Threads = None,
    channel: tp.Annotated[
        str | None,
        typer.Option(
            metavar="N|left|right|mix",
            help="Input channel to stream (default 0; moshi-finetune dialogues: Moshi left, user right).",
        ),
    ] = None,
    glob: Glob = None,
    include_hidden: IncludeHidden = False,
    include_outputs: IncludeOutputs = False,
    text: tp.Annotated[bool, typer.Option("--text", help="Also write Moshi's text stream beside each output.")] = False,
    text_format: tp.Annotated[
        TextFormat,
        typer.Option(
            "--text-format",
            help="Transcripts as txt (words), jsonl (one timed word a line) or srt; jsonl/srt imply --text.",
        ),
    ] = TextFormat.txt,
    audio_format: tp.Annotated[
        AudioFormat | None,
        typer.Option("--format", help="Format of outputs written into a folder (default wav)."),
    ] = None,
    temp: tp.Annotated[
        float | None, typer.Option(help="Audio sampling temperature (default: the checkpoint's).")
    ] = None,
    temp_text: tp.Annotated[
        float | None, typer.Option(help="Text sampling temperature (default: the checkpoint's).")
    ] = None,
    top_k: tp.Annotated[int | None, typer.Option(help="Audio top-k (default: the checkpoint's).")] = None,
    top_k_text: tp.Annotated[int | None, typer.Option(help="Text top-k (default: the checkpoint's).")] = None,
    greedy: tp.Annotated[
        bool, typer.Option("--greedy", help="Argmax instead of sampling (seed-independent output).")
    ] = False,
    overwrite: Overwrite = False,
    redo_other: RedoOther = False,
    report: tp.Annotated[
        Path | None, typer.Option(help="JSON report (default in folder mode: OUT/moshi-ttt-report.json).")
    ] = None,
    details: tp.Annotated[
        bool | None,
        typer.Option("--details/--no-details", help="Per-layer TTT table after each file (default: single file only)."),
    ] = None,
    quiet: Quiet = False,
    timeline: tp.Annotated[
        bool,
        typer.Option("--timeline", help="Record every TTT update in the report (for `moshi-ttt plot`; can be large)."),
    ] = False,
    json_summary: JsonSummary = False,
    batch_size: BatchSize = "auto",
    decode_chunk: tp.Annotated[
        int | None,
        typer.Option(
            "--decode-chunk",
            metavar="FRAMES",
            help="Decode "
            "audio in chunks of this many frames: faster on CPU, audio within one 16-bit step "
            "of the default frame-by-frame decode.",
        ),
    ] = None,
    shard: ShardOption = None,
    backend: BackendOption = BackendName.local,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
) -> None:
    """Stream recordings through Moshi (+ TTT) and write what it says back."""
    _run_command(
        source,
        target,
        quiet=quiet,
        json_summary=json_summary,
        details=details,
        device=device,
        dtype=dtype,
        backend=backend,
        ray_address=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        base=base,
        checkpoint=checkpoint,
        step=step,
        ttt_enabled=not no_ttt,
        delta_clip=delta_clip,
        threads=threads,
        seed=seed,
        pattern=glob,
        include_hidden=include_hidden,
        include_outputs=include_outputs,
        text=text,
        text_format=text_format.value,
        channel=channel,
        audio_format=audio_format.value if audio_format else None,
        sampling=Sampling(temp=temp, temp_text=temp_text, top_k=top_k, top_k_text=top_k_text, greedy=greedy),
        overwrite=overwrite,
        redo_other=redo_other,
        report=report,
        timeline=timeline,
        batch_size=batch_size,
        decode_chunk=decode_chunk,
        shard=shard,
    )


@app.command()
def score(
    source: Source,
    target: tp.Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="Folder for the per-file NLL arrays "
            "(IN/talk/a.wav -> OUT/talk/a.nll.npy) and moshi-ttt-scores.json, "
            "or a .npy file for a single recording.",
        ),
    ],
    base: Base = DEFAULT_BASE,
    checkpoint: Checkpoint = None,
    step: Step = None,
    no_ttt: NoTTT = False,
    delta_clip: DeltaClip = None,
    device: DeviceOption = Device.auto,
    dtype: DTypeOption = DType.auto,
    threads: Threads = None,
    glob: Glob = None,
    include_hidden: IncludeHidden = False,
    include_outputs: IncludeOutputs = False,
    user_stream: tp.Annotated[
        UserStream,
        typer.Option(
            "--user-stream",
            help="Mono recordings: what the user "
            "stream is (silence: Mimi's codes of zeros; copy: the same audio; none: no tokens). "
            "Stereo recordings: channel 1.",
        ),
    ] = UserStream.silence,
    text_stream: tp.Annotated[
        TextStream,
        typer.Option(
            "--text-stream",
            help="Without an alignment file "
            "(NAME.json beside the recording): the text row is PAD tokens or none; text is not "
            "scored.",
        ),
    ] = TextStream.pad,
    bucket_seconds: tp.Annotated[
        float, typer.Option("--bucket-seconds", help="Width of the position buckets (report, table, plot).")
    ] = 60.0,
    first_codebook_weight: tp.Annotated[
        float | None,
        typer.Option(
            "--first-codebook-weight",
            help="The "
            "weighted loss's first-codebook multiplier (default: the fine-tune's "
            "training arguments, else 1.0).",
        ),
    ] = None,
    text_padding_weight: tp.Annotated[
        float | None,
        typer.Option(
            "--text-padding-weight",
            help="The "
            "weighted loss's weight of PAD/EPAD text targets (default: the fine-tune's "
            "training arguments, else 0.5).",
        ),
    ] = None,
    overwrite: Overwrite = False,
    redo_other: RedoOther = False,
    report: tp.Annotated[
        Path | None, typer.Option(help="JSON report (default in folder mode: OUT/moshi-ttt-scores.json).")
    ] = None,
    quiet: Quiet = False,
    timeline: tp.Annotated[
        bool,
        typer.Option(
            "--timeline",
            help="Record every TTT update in the report (TTT-MLP: "
            "with the inner loss under the checkpoint's weights too).",
        ),
    ] = False,
    json_summary: JsonSummary = False,
    batch_size: BatchSize = "auto",
    shard: ShardOption = None,
    backend: BackendOption = BackendName.local,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
) -> None:
    """Teacher-force every recording through the model and record the loss of every token it
    predicts: TTT against plain Moshi (--no-ttt), by position (see README: Does TTT help?)."""
    _run_command(
        source,
        target,
        quiet=quiet,
        json_summary=json_summary,
        details=False,
        device=device,
        dtype=dtype,
        backend=backend,
        ray_address=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        base=base,
        checkpoint=checkpoint,
        step=step,
        ttt_enabled=not no_ttt,
        delta_clip=delta_clip,
        threads=threads,
        pattern=glob,
        include_hidden=include_hidden,
        include_outputs=include_outputs,
        overwrite=overwrite,
        redo_other=redo_other,
        report=report,
        timeline=timeline,
        batch_size=batch_size,
        shard=shard,
        score=ScoreOptions(
            user_stream=user_stream.value,
            text_stream=text_stream.value,
            bucket_seconds=bucket_seconds,
            first_codebook_weight=first_codebook_weight,
            text_padding_weight=text_padding_weight,
        ),
    )


@contextlib.contextmanager
def _only_our_stderr(active: bool) -> tp.Iterator[None]:
    """With `active`, what others write to the process's stderr (file descriptor 2: Ray's C++
    core and the processes it starts, libraries' warnings) goes nowhere, while our own lines
    (`sys.stderr`, which the consoles write to) still reach where they went: `-q` with Ray."""
    if not active:
        yield
        return
    sys.stderr.flush()
    try:
        ours_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # captured (a test runner, a notebook): not fd 2
        ours_on_fd2 = False
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved_stderr = sys.stderr
    try:
        os.dup2(devnull, 2)
        if ours_on_fd2:  # our lines keep the terminal through a copy of the descriptor
            sys.stderr = open(saved_fd, "w", buffering=1, encoding=saved_stderr.encoding or "utf-8", closefd=False)  # noqa: SIM115
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = saved_stderr
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)


def _run(
    source: Path, target: str | Path, options: RunOptions, details: bool | None, quiet: bool, json_summary: bool = False
) -> int:
    """Run a batch through the library and render it; returns the exit code. With `json_summary`,
    stdout gets the one JSON line and everything for people goes to stderr."""
    people = err if json_summary else out
    events = render.make_events(people, err, quiet=quiet, details=details)
    started = False  # whether the plan was made (the lock taken) before an interrupt
    try:
        with user_errors(), _only_our_stderr(quiet and options.backend == "ray"):
            _load_model_stack(options.device, options.dtype, options.threads)
            from moshi_ttt.run import run_batch

            started = True
            outcome = run_batch(source, target, options, events)
    except KeyboardInterrupt as exc:
        _said_interrupted.append(True)
        err.print(
            "interrupted: files in progress were discarded; finished files and the report are kept"
            if started
            else "interrupted before any file was processed",
            soft_wrap=True,
        )
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    report_path = outcome.report_path if outcome.report_error is None else None
    if not quiet:
        (render.score_summary if options.score is not None else render.summary)(people, outcome.report, report_path)
    if json_summary:
        render.json_summary(out, outcome.report, report_path, outcome.exit_code)
    if outcome.report_error is not None:
        err.print(
            f"[bold red]error:[/] {render.shown(outcome.report_path)}: {escape(outcome.report_error)}",
            highlight=False,
            soft_wrap=True,
        )
    return outcome.exit_code


def _key_value(item: str, option: str) -> tuple[str, tp.Any]:
    """KEY=VALUE with VALUE read as JSON (true, 1e-5, "text", null); bare words stay strings."""
    import json

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise MoshiTTTError(f"{option} expects KEY=VALUE, got {item!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


report_app = typer.Typer(no_args_is_help=True, help="Work with run reports (merging shards' parts).")
app.add_typer(report_app, name="report")


@report_app.command("merge")
def report_merge(
    folder: Path = typer.Argument(..., metavar="OUT", help="The output folder the shards wrote into."),
    report: Path | None = typer.Option(
        None, help="The report the shards were given with --report (default: OUT/moshi-ttt-report.json)."
    ),
    mixed: bool = typer.Option(
        False,
        "--mixed",
        help="Merge even outputs made by different models or settings (each entry keeps its made_by; "
        "the settings list them all).",
    ),
) -> None:
    """Merge the report parts of `infer --shard I/N` runs (and any earlier report) into one report.

    Exit code 0 when every shard is complete, 1 when some shard is missing, still running or
    stopped short (the merged report is written all the same), 2 when there is nothing to merge,
    a part is not a readable report, or the outputs were made by different models (without --mixed)."""
    from moshi_ttt.report.shards import default_report_of, merge_reports

    with user_errors():
        outcome = merge_reports(
            Path(report) if report is not None else default_report_of(folder),
            lock_folder=Path(folder).absolute(),
            mixed=mixed,
        )
    render.merge_summary(out, err, outcome)
    raise typer.Exit(1 if outcome.incomplete else 0)


@app.command("make-tiny")
def make_tiny(
    folder: Path = typer.Argument(..., metavar="DIR"),
    seed: int = typer.Option(0),
    variant: Variant = typer.Option(
        Variant.base, help="base: DIR is a base checkpoint; inplace / ttt-mlp: DIR/base plus DIR/<variant> fine-tune."
    ),
    yarn: bool = typer.Option(False, "--yarn", help="Fine-tune with YaRN RoPE scaling (yarn_config, scale 4)."),
    lora: bool = typer.Option(False, "--lora", help="Fine-tune carrying LoRA adapters beside the TTT tensors."),
    ttt: list[str] = typer.Option(
        [],
        "--ttt",
        metavar="KEY=VALUE",
        help="Set a key of the fine-tune's TTT section (VALUE as JSON), e.g. "
        "use_rope=true or delta_clip_fro_norm=1e-5; repeatable.",
    ),
) -> None:
    """Write a tiny random-weight checkpoint in the real on-disk layout (offline)."""
    with user_errors():
        prepare_runtime("cpu")
        from moshi_ttt.checkpoints import tiny

        section = dict(_key_value(item, "--ttt") for item in ttt)
        if variant.value == "base":
            if yarn or lora or section:
                raise MoshiTTTError("--yarn / --lora / --ttt describe a fine-tune: pass --variant inplace or ttt-mlp")
            written = tiny.write_tiny_base(folder, seed=seed)
            out.print(f"wrote base checkpoint [bold]{written}[/]")
        else:
            paths = tiny.write_tiny_variant(
                folder, variant.value, seed=seed, yarn=tiny.TINY_YARN if yarn else None, lora=lora, ttt=section
            )
            out.print(
                f"wrote base checkpoint [bold]{paths.base}[/] and {variant.value} fine-tune [bold]{paths.finetune}[/]"
            )


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., metavar="FINETUNE"),
    base: str | None = typer.Option(None, help="Load the base too, to count parameters."),
    step: int | None = typer.Option(None, help="Run folder: inspect checkpoint_NNNNNN of this step."),
) -> None:
    """Show a fine-tune's TTT config, which layers carry TTT, and parameter counts."""
    with user_errors():
        prepare_runtime("cpu")
        from moshi_ttt.checkpoints.inspection import inspect_finetune

        info = inspect_finetune(checkpoint, base, step)
    render.inspection(out, info)


@app.command()
def plot(
    report: Path = typer.Argument(..., metavar="REPORT", help="A report written by `infer --timeline`."),
    output: Path | None = typer.Option(None, "--output", "-o", help="PNG to write (default: REPORT with .png)."),
    compare: Path | None = typer.Option(
        None, "--compare", metavar="OTHER_REPORT", help="A second report drawn beside it (e.g. a --no-ttt run)."
    ),
    width: int = typer.Option(1400, help="Figure width in pixels."),
    height: int | None = typer.Option(None, help="Figure height in pixels (default: grows with the files)."),
) -> None:
    """Plot what TTT did in each file: drift, update norms, clips, TTT-MLP inner losses."""
    with user_errors():
        from moshi_ttt.report.plot import plot_reports

        written = plot_reports(report, output or report.with_suffix(".png"), compare, width, height)
    out.print(f"wrote [bold]{escape(str(written))}[/]", highlight=False)


@app.command()
def demo(
    folder: Path | None = typer.Option(None, "--out", help="Where to write (default: the user cache dir)."),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(None),
) -> None:
    """Make a tiny In-Place TTT checkpoint and recordings, then run `infer` on them. Offline."""
    with user_errors():
        prepare_runtime("cpu", "float32", threads)
        from moshi_ttt.checkpoints import tiny

        root = folder or default_cache_dir() / "demo"
        out.print(f"demo folder: [bold]{root}[/]")
        paths = tiny.write_tiny_variant(root / "checkpoint", "inplace", seed=seed)
        recordings = root / "recordings"
        tiny.write_sample_recordings(recordings, seed=seed)
    options = RunOptions(
        base=str(paths.base),
        checkpoint=str(paths.finetune),
        device="cpu",
        dtype="float32",
        threads=threads,
        text=True,
        overwrite=True,
    )
    with user_errors():
        options = options.validate()
    raise typer.Exit(_run(recordings, root / "outputs", options, details=True, quiet=False))


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "moshi-ttt"


# Set once a command has said it was interrupted (see `main`).
_said_interrupted: list[bool] = []


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SystemExit as exc:
        # Typer turns Ctrl-C during argument parsing into a silent exit 130: say it in one line.
        if exc.code in (130, 143) and not _said_interrupted:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("interrupted during start-up\n")
        raise
    finally:
        render.settle_streams()  # a closed stdout must not turn the exit code into 120


if __name__ == "__main__":
    main()
