"""The `moshi-ttt` command line: parse, call the library, render. No model logic lives here.

Library modules that import moshi are imported inside the commands, after `--device` is known:
moshi decides at import time whether to torch.compile, which must be off on CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
import typing as tp
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.families import FAMILY_NAMES
from moshi_ttt.runtime import prepare_environment, resolve_device, resolve_dtype, set_threads

from . import render

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline inference for Moshi fine-tuned with Test-Time Training layers.")
out = Console()
err = Console(stderr=True)

DEFAULT_BASE = "kyutai/moshiko-pytorch-bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


# make-tiny's --variant: a base checkpoint alone, or one fine-tune per registered TTT family.
Variant = Enum("Variant", {name: name for name in ("base", *FAMILY_NAMES)}, type=str)


@contextlib.contextmanager
def user_errors() -> tp.Iterator[None]:
    """Bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except MoshiTTTError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _setup(device: Device, dtype: DType, threads: int | None) -> tuple[tp.Any, tp.Any, int]:
    os.environ["MOSHI_TTT_DEVICE"] = device.value
    prepare_environment(device.value)
    torch_device = resolve_device(device.value)
    return torch_device, resolve_dtype(dtype.value, torch_device), set_threads(threads, torch_device)


@app.command()
def infer(
    source: Path = typer.Argument(..., metavar="IN", help="A recording, or a folder searched recursively."),
    target: Path = typer.Argument(..., metavar="OUT", help="Output WAV, or folder mirroring IN's layout."),
    base: str = typer.Option(DEFAULT_BASE, help="Base Moshi: Hugging Face repo id or local folder."),
    checkpoint: tp.Optional[str] = typer.Option(None, help="TTT fine-tune folder (consolidated/, checkpoint or run folder)."),
    step: tp.Optional[int] = typer.Option(None, help="Run folder: load checkpoint_NNNNNN of this step (default: latest)."),
    no_ttt: bool = typer.Option(False, "--no-ttt", help="Keep fast weights frozen (ablation)."),
    delta_clip: tp.Optional[str] = typer.Option(
        None, "--delta-clip", metavar="TAU|none",
        help="In-Place TTT: bound on each chunk's delta norm (before the learning rate), overriding "
             "the checkpoint; 'none' turns clipping off."),
    device: Device = typer.Option(Device.auto),
    dtype: DType = typer.Option(DType.auto, help="auto: bfloat16 on GPU, float32 on CPU."),
    seed: int = typer.Option(4242, help="RNG seed, reapplied at the start of every file."),
    threads: tp.Optional[int] = typer.Option(None, help="CPU intra-op threads (default: chosen for this machine)."),
    glob: tp.Optional[str] = typer.Option(None, help="Only inputs whose relative path or name matches."),
    text: bool = typer.Option(False, "--text", help="Also write Moshi's text stream as OUT .txt files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo files whose output exists."),
    report: tp.Optional[Path] = typer.Option(None, help="JSON report (default in folder mode: OUT/moshi-ttt-report.json)."),
    details: tp.Optional[bool] = typer.Option(None, "--details/--no-details",
                                              help="Per-layer TTT table after each file (default: single file only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or tables; errors still print."),
) -> None:
    """Stream recordings through Moshi (+ TTT) and write what it says back."""
    with user_errors():
        torch_device, torch_dtype, n_threads = _setup(device, dtype, threads)
        from moshi_ttt.batch import BatchRunner, default_report_path, plan_jobs, stale_partials
        from moshi_ttt.config import parse_delta_clip

        overrides = {} if delta_clip is None else {"delta_clip": parse_delta_clip(delta_clip),
                                                   "delta_clip_origin": "--delta-clip"}

        jobs = plan_jobs(source, target, glob, text)
        if not jobs:
            raise MoshiTTTError("no audio files found" + (f" matching {glob!r}" if glob else ""), source)
        report_path = report if report is not None else default_report_path(source, target)
        runner, settings = _load_runner(base, checkpoint, torch_device, torch_dtype, n_threads, seed,
                                        not no_ttt, quiet, overrides, step)
    if source.is_dir():  # temporaries of a killed (kill -9) earlier run into this folder
        for path in stale_partials(target):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    show_details = (len(jobs) == 1) if details is None else details
    events = render.make_events(out, err, quiet=quiet, details=show_details)
    batch = BatchRunner(runner, settings, report_path=report_path, overwrite=overwrite, events=events)
    try:
        with events:
            result = batch.run(jobs)
    except KeyboardInterrupt:
        err.print("interrupted: the current file was discarded; finished files and the report are kept",
                  soft_wrap=True)
        raise typer.Exit(130) from None
    if not quiet:
        render.summary(out, result, report_path)
    raise typer.Exit(1 if result.totals()["failed"] else 0)


def _load_runner(base: str, checkpoint: str | None, device: tp.Any, dtype: tp.Any, threads: int, seed: int,
                 ttt_enabled: bool, quiet: bool, ttt_overrides: dict,
                 step: int | None = None) -> tuple[tp.Any, dict]:
    """Load the model once for the whole run; return the runner and the settings to report."""
    from moshi_ttt.model import load_model
    from moshi_ttt.runner import StreamingRunner

    status = contextlib.nullcontext() if quiet else err.status(f"loading {base}" + (f" + {checkpoint}" if checkpoint else ""))
    with status:
        model = load_model(base, checkpoint, device=device, dtype=dtype, ttt_overrides=ttt_overrides, step=step)
    runner = StreamingRunner(model, seed=seed, ttt_enabled=ttt_enabled)
    ttt = model.describe_ttt()
    settings = {"base": base, "checkpoint": checkpoint, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "seed": seed, "threads": threads, "lm": model.describe_lm(),
                "ttt": None if ttt is None else {**ttt, "enabled": ttt_enabled}}
    return runner, settings


@app.command("make-tiny")
def make_tiny(
    folder: Path = typer.Argument(..., metavar="DIR"),
    seed: int = typer.Option(0),
    variant: Variant = typer.Option(Variant.base, help="base: DIR is a base checkpoint; inplace / ttt-mlp: "
                                    "DIR/base plus DIR/<variant> fine-tune."),
    yarn: bool = typer.Option(False, "--yarn", help="Fine-tune with YaRN RoPE scaling (yarn_config, scale 4)."),
    lora: bool = typer.Option(False, "--lora", help="Fine-tune carrying LoRA adapters beside the TTT tensors."),
) -> None:
    """Write a tiny random-weight checkpoint in the real on-disk layout (offline)."""
    with user_errors():
        prepare_environment("cpu")
        from moshi_ttt import tiny

        if variant.value == "base":
            if yarn or lora:
                raise MoshiTTTError("--yarn / --lora describe a fine-tune: pass --variant inplace or ttt-mlp")
            written = tiny.write_tiny_base(folder, seed=seed)
            out.print(f"wrote base checkpoint [bold]{written}[/]")
        else:
            paths = tiny.write_tiny_variant(folder, variant.value, seed=seed,
                                            yarn=tiny.TINY_YARN if yarn else None, lora=lora)
            out.print(f"wrote base checkpoint [bold]{paths.base}[/] and {variant.value} fine-tune "
                      f"[bold]{paths.finetune}[/]")


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., metavar="FINETUNE"),
    base: tp.Optional[str] = typer.Option(None, help="Load the base too, to count parameters."),
    step: tp.Optional[int] = typer.Option(None, help="Run folder: inspect checkpoint_NNNNNN of this step."),
) -> None:
    """Show a fine-tune's TTT config, which layers carry TTT, and parameter counts."""
    with user_errors():
        prepare_environment("cpu")
        from moshi_ttt.inspection import inspect_finetune

        info = inspect_finetune(checkpoint, base, step)
    render.inspection(out, info)


@app.command()
def demo(
    folder: tp.Optional[Path] = typer.Option(None, "--out", help="Where to write (default: the user cache dir)."),
    seed: int = typer.Option(0),
    threads: tp.Optional[int] = typer.Option(None),
) -> None:
    """Make a tiny In-Place TTT checkpoint and recordings, then run `infer` on them. Offline."""
    with user_errors():
        _setup(Device.cpu, DType.float32, threads)
        from moshi_ttt import tiny

        root = folder or default_cache_dir() / "demo"
        out.print(f"demo folder: [bold]{root}[/]")
        paths = tiny.write_tiny_variant(root / "checkpoint", "inplace", seed=seed)
        recordings = root / "recordings"
        tiny.write_sample_recordings(recordings, seed=seed)
    infer(source=recordings, target=root / "outputs", base=str(paths.base), checkpoint=str(paths.finetune),
          step=None, no_ttt=False, delta_clip=None, device=Device.cpu, dtype=DType.float32, seed=4242, threads=threads, glob=None,
          text=True, overwrite=True, report=None, details=True, quiet=False)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "moshi-ttt"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
