"""What a run is asked to do, in one frozen object validated in one place.

`RunOptions` holds every setting of a run except its inputs, outputs and front end; `Sampling`,
`RayOptions` and `ScoreOptions` are its parts. Every entry point (the CLI before anything loads,
`run_batch`, each Ray actor) calls `validate()`, which returns the options with every value in its
canonical form (`channel="left"` -> 0, `text_format="srt"` -> `text=True`, `batch_size="8"` -> 8)
or raises `OptionError` naming the setting; the CLI maps settings to its flags. Validating twice
gives the same object, so a worker may validate what its driver validated.

No torch here: `moshi-ttt --help` and option errors must be instant.
"""

from __future__ import annotations

import math
import os
import typing as tp
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import MoshiTTTError
from .jobs.files import FOLDER_AUDIO_FORMATS, parse_channel
from .report.shards import Shard, parse_shard
from .runtime import DEFAULT_BASE, DTYPE_NAMES
from .streaming.transcripts import TEXT_FORMATS

AUTO = "auto"
BACKENDS = ("local", "ray")
DEVICES = ("auto", "cpu", "cuda")
# numpy's seed must fit in 32 bits; torch's and random's take that range too.
SEED_RANGE = range(0, 2**32)
# More intra-op threads than this only spawn idle threads (and take minutes to start); a local run
# also takes no more than the CPUs it may use (`usable_cpus`): more only compete for them.
MAX_THREADS = 1024
# How the user stream is filled for a mono recording when scoring, and how the text row is
# filled without an alignment file (see `streaming/scoring.py`).
USER_STREAMS = ("silence", "copy", "none")
TEXT_STREAMS = ("pad", "none")


class OptionError(MoshiTTTError):
    """A setting that cannot be honoured. `setting` is the `RunOptions` field (dotted for parts,
    e.g. `ray.workers`); `reason` says what is wrong without naming it, so a front end can name
    the setting its own way (the CLI: `--workers`)."""

    def __init__(self, setting: str, reason: str):
        self.setting = setting
        self.detail = reason
        super().__init__(f"{setting} {reason}")


def _positive_number(setting: str, value: tp.Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise OptionError(setting, f"must be a positive number (use greedy for argmax), got {value!r}")
    return float(value)


def _whole(setting: str, value: tp.Any, least: int, most: int | None = None, what: str | None = None) -> int:
    """A whole number in range; `what` says what is expected instead of the range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        expected = what or (f"between {least} and {most}" if most is not None else f"at least {least}")
        raise OptionError(setting, f"must be {expected}, got {value!r}")
    return value


@dataclass(frozen=True)
class Sampling:
    """What a run changes about sampling; None keeps the checkpoint's (or moshi's default) value."""

    temp: float | None = None  # audio tokens
    temp_text: float | None = None
    top_k: int | None = None  # audio tokens
    top_k_text: int | None = None
    greedy: bool = False  # argmax everywhere (LMGen's use_sampling=False)

    def validate(self) -> Sampling:
        """Refuse values `LMGen` would misuse: a temperature must be a positive finite number (0
        divides by zero; use greedy), top-k at least 1."""
        for name in ("temp", "temp_text"):
            if getattr(self, name) is not None:
                _positive_number(f"sampling.{name}", getattr(self, name))
        for name in ("top_k", "top_k_text"):
            if getattr(self, name) is not None:
                _whole(f"sampling.{name}", getattr(self, name), 1)
        return self

    def overrides(self) -> dict:
        """The `LMGen` kwargs this run sets."""
        kwargs: dict = {
            name: getattr(self, name)
            for name in ("temp", "temp_text", "top_k", "top_k_text")
            if getattr(self, name) is not None
        }
        if self.greedy:
            kwargs["use_sampling"] = False
        return kwargs

    def apply(self, lm_gen_config: dict) -> dict:
        """The checkpoint's `lm_gen_config` with this run's overrides on top."""
        return {**lm_gen_config, **self.overrides()}


@dataclass(frozen=True)
class RayOptions:
    """How a run uses Ray (`backend="ray"`). Defaults are chosen from the cluster when the run
    starts (`backends.ray.RayBackend.resolved`)."""

    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None: start a local one
    workers: int | None = None  # actors (model copies); None: one per GPU, or per `threads` CPUs
    gpus_per_worker: float | None = None  # None: 1 when the run is on GPU, 0 on CPU
    # Ray restarts a dead actor up to this many times, and retries its unfinished task as often.
    max_restarts: int = 3
    max_task_retries: int = 3
    files_per_task: int | None = None  # files an actor gets at once; None: its batch size

    def given(self) -> list[str]:
        """The settings a user set that only mean something with Ray."""
        return [f"ray.{name}" for name in ("address", "workers", "gpus_per_worker") if getattr(self, name) is not None]

    def validate(self) -> RayOptions:
        if self.workers is not None:
            _whole("ray.workers", self.workers, 1)
        if self.gpus_per_worker is not None:
            value = self.gpus_per_worker
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise OptionError("ray.gpus_per_worker", f"must be 0 or more, got {value!r}")
        _whole("ray.max_restarts", self.max_restarts, 0)
        _whole("ray.max_task_retries", self.max_task_retries, 0)
        if self.files_per_task is not None:
            _whole("ray.files_per_task", self.files_per_task, 1)
        return self


@dataclass(frozen=True)
class ScoreOptions:
    """What `score` (teacher-forced loss of every token) needs beyond a run's settings; its
    presence in `RunOptions.score` makes the run a scoring run."""

    user_stream: str = "silence"  # mono input: silence | copy | none (see USER_STREAMS)
    text_stream: str = "pad"  # without an alignment file: pad | none
    bucket_seconds: float = 60.0
    # moshi-finetune's loss weights; None: the fine-tune's training arguments, else its defaults.
    first_codebook_weight: float | None = None
    text_padding_weight: float | None = None

    def validate(self) -> ScoreOptions:
        if self.user_stream not in USER_STREAMS:
            raise OptionError(
                "score.user_stream", f"must be one of {', '.join(USER_STREAMS)}, got {self.user_stream!r}"
            )
        if self.text_stream not in TEXT_STREAMS:
            raise OptionError(
                "score.text_stream", f"must be one of {', '.join(TEXT_STREAMS)}, got {self.text_stream!r}"
            )
        _positive_number("score.bucket_seconds", self.bucket_seconds)
        for name in ("first_codebook_weight", "text_padding_weight"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
            ):
                raise OptionError(f"score.{name}", f"must be a number >= 0, got {value!r}")
        return self


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run except its inputs, outputs and front end. Build it complete, then
    `validate()` it (every entry point does)."""

    base: str = DEFAULT_BASE
    checkpoint: str | None = None
    step: int | None = None  # a run folder's checkpoint_NNNNNN to load (default: the latest)
    ttt_enabled: bool = True  # False: the --no-ttt ablation (fast weights frozen)
    # In-Place TTT's bound on each chunk's delta norm, replacing the checkpoint's: None keeps the
    # checkpoint's, "none" (or 0) turns clipping off, a positive number is the bound.
    delta_clip: float | str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    seed: int = 4242  # reapplied at the start of every file
    pattern: str | None = None  # only inputs whose relative path or name matches this glob
    include_hidden: bool = False
    # Also take recordings in folders of IN that hold a moshi-ttt report or lock (another run's OUT).
    include_outputs: bool = False
    text: bool = False  # also write transcripts (implied by a text_format other than txt)
    text_format: str = "txt"  # txt (words) | jsonl (timed words) | srt (subtitles); see transcripts.py
    # An index, "left", "right", "mix", or None: channel 0, with a warning on two-track dialogues.
    channel: int | str | None = None
    audio_format: str | None = None  # wav | flac | ogg for outputs named into a folder (default wav)
    # Overrides of the checkpoint's lm_gen_config (temperatures, top-k, greedy).
    sampling: Sampling = field(default_factory=Sampling)
    overwrite: bool = False
    # Redo existing outputs whose report entry says another model or other output-changing
    # settings made them (see report/provenance.py); others are kept, counted and warned about.
    redo_other: bool = False
    report: Path | None = None  # default: OUT/moshi-ttt-report.json in folder mode
    timeline: bool = False  # record every TTT update in the report (can be large)
    # Recordings streamed at once: a positive number, or "auto" (free memory; see batch_size.py).
    batch_size: int | str = AUTO
    # Frames of tokens per Mimi decode call (None: one frame per step, see batched.py).
    decode_chunk: int | None = None
    shard: Shard | str | None = None  # "I/N": only this shard's inputs, into its own report part
    backend: str = "local"  # "local": stream in this process; "ray": on a Ray actor pool
    ray: RayOptions = field(default_factory=RayOptions)
    score: ScoreOptions | None = None  # set: score every token (teacher-forced) instead of generating

    def validate(self) -> RunOptions:
        """These options in canonical form, every check and implication applied; `OptionError`
        (naming the setting) for the first that cannot be honoured."""
        changes: dict[str, tp.Any] = {}
        if not isinstance(self.base, str) or not self.base.strip():
            raise OptionError("base", f"must name a checkpoint, got {self.base!r}")
        if self.step is not None:
            _whole("step", self.step, 0)
        if self.device not in DEVICES and not (isinstance(self.device, str) and self.device.startswith("cuda:")):
            raise OptionError("device", f"must be one of {', '.join(DEVICES)} (or cuda:N), got {self.device!r}")
        if self.dtype not in (AUTO, *DTYPE_NAMES):
            raise OptionError("dtype", f"must be one of {', '.join((AUTO, *DTYPE_NAMES))}, got {self.dtype!r}")
        if self.threads is not None:
            _whole("threads", self.threads, 1, MAX_THREADS)
            if self.backend == "local" and self.threads > (cpus := usable_cpus()):
                raise OptionError("threads", f"must be at most {cpus}, the CPUs this run may use, got {self.threads}")
        check_seed(self.seed)
        if not isinstance(self.redo_other, bool):
            raise OptionError("redo_other", f"must be true or false, got {self.redo_other!r}")
        if self.text_format not in TEXT_FORMATS:
            raise OptionError("text_format", f"must be one of {', '.join(TEXT_FORMATS)}, got {self.text_format!r}")
        if self.text_format != "txt" and not self.text:
            changes["text"] = True  # asking for a transcript format asks for transcripts
        if self.audio_format is not None and self.audio_format not in FOLDER_AUDIO_FORMATS:
            raise OptionError(
                "audio_format", f"must be one of {', '.join(FOLDER_AUDIO_FORMATS)}, got {self.audio_format!r}"
            )
        try:
            channel = parse_channel(self.channel)
        except MoshiTTTError:
            raise OptionError("channel", f"must be N (0 or more), left, right or mix, got {self.channel!r}") from None
        if channel != self.channel:
            changes["channel"] = channel
        self.sampling.validate()
        batch_size = parse_batch_size(self.batch_size)
        if batch_size != self.batch_size:
            changes["batch_size"] = batch_size
        if self.decode_chunk is not None:
            _whole("decode_chunk", self.decode_chunk, 1, what="a positive number of frames")
        delta_clip = parse_delta_clip(self.delta_clip)
        if delta_clip != self.delta_clip:
            changes["delta_clip"] = delta_clip
        if isinstance(self.shard, str):
            try:
                changes["shard"] = parse_shard(self.shard)
            except MoshiTTTError as exc:
                raise OptionError("shard", exc.reason.removeprefix("--shard ")) from None
        if self.report is not None and not isinstance(self.report, Path):
            changes["report"] = Path(self.report)
        if self.backend not in BACKENDS:
            raise OptionError("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend != "ray" and self.ray.given():
            raise OptionError(", ".join(self.ray.given()), "only apply with backend ray")
        self.ray.validate()
        if self.backend == "ray" and self.ray.gpus_per_worker and self.device == "cpu":
            raise OptionError("ray.gpus_per_worker", "with device cpu: the actors would hold GPUs they never use")
        if self.score is not None:
            self.score.validate()
            if self.audio_format is not None:
                raise OptionError("audio_format", "does not apply to scoring: it writes no audio")
            if self.text or self.text_format != "txt":
                raise OptionError("text", "does not apply to scoring: it writes no transcript")
            if self.sampling != Sampling():
                raise OptionError("sampling", "does not apply to scoring: it samples nothing")
            if self.decode_chunk is not None:
                raise OptionError("decode_chunk", "does not apply to scoring: it decodes no audio")
        return replace(self, **changes) if changes else self

    def ttt_overrides(self) -> dict[str, tp.Any]:
        """Fields of the checkpoint's TTT config this run replaces (see `ttt/config.py`)."""
        if self.delta_clip is None:
            return {}
        # The report's origin keeps the name users know it by.
        return {
            "delta_clip": None if self.delta_clip == "none" else self.delta_clip,
            "delta_clip_origin": "--delta-clip",
        }

    def changed(self) -> dict[str, tp.Any]:
        """The settings that differ from the defaults (for logs and tests)."""
        default = RunOptions()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        }


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or `taskset`'s share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_seed(seed: int) -> int:
    """A seed `seed_all` accepts (else every file would fail at its start)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEED_RANGE:
        raise OptionError("seed", f"must be between 0 and {SEED_RANGE.stop - 1}, got {seed!r}")
    return seed


def parse_batch_size(value: int | str | None) -> int | str:
    """A positive number of streams, or "auto" (also for None)."""
    if value is None or value == AUTO:
        return AUTO
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise OptionError("batch_size", f"must be a positive number or auto, got {value!r}")
    return size


def parse_delta_clip(value: float | str | None) -> float | str | None:
    """None (the checkpoint's), "none" (no clip; also 0, "off", "null"), or a positive bound."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "off", "null"):
            return "none"
        try:
            number = float(value)
        except ValueError:
            raise OptionError("delta_clip", f"must be a number or 'none', got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError("delta_clip", f"must be a number or 'none', got {value!r}")
    else:
        number = float(value)
    if not math.isfinite(number) or number < 0:
        raise OptionError("delta_clip", f"must be a finite number >= 0 or 'none', got {value!r}")
    return number if number > 0 else "none"
