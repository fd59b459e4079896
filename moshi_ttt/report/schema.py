"""What a run produces, as typed records up to the JSON boundary: per-layer TTT numbers, per-file
results and the run's report. No torch or moshi here, so front
ends (and `moshi-ttt --help`) can use these types without loading a model stack.
"""

from __future__ import annotations

import json
import math
import typing as tp
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .scores import ScoreSummary, pool

REPORT_SCHEMA = "moshi-ttt.report/1"
REPORT_NAME = "moshi-ttt-report.json"
SCORES_REPORT_NAME = "moshi-ttt-scores.json"  # `score` runs' default report


# Moshi's frame rate: one token (LM step) per 80 ms of audio.
SECONDS_PER_TOKEN = 0.08


@dataclass
class UpdateRecord:
    """One fast-weight update of a layer during a file (`--timeline`).

    Norms are Frobenius norms over all of the layer's fast weights taken together. `token` is the
    number of tokens the stream had consumed when the update was applied, i.e. the index of the
    first token that reads the updated weights (seconds: `token * SECONDS_PER_TOKEN`).
    """

    token: int
    tokens: int  # tokens in the chunk (mini-batch) the update came from
    update_norm: float | None  # ||W_after - W_before||, after any clipping
    # In-Place: lr * ||V^T Z||, the update had it not been clipped; None for families that never clip.
    update_norm_unclipped: float | None
    clipped: bool
    drift: float | None  # running ||W - W0|| right after this update
    # TTT-MLP: the inner loss on the mini-batch at its start weights and at the updated weights
    # (see `moshi_ttt.ttt.mlp.inner_loss`); None for other families.
    loss_before: float | None = None
    loss_after: float | None = None
    # TTT-MLP: the same mini-batch's inner loss under the checkpoint's weights W0 (the TTT paper's
    # Figure 5: l(W0; x), l(W_prev; x), l(W; x)); None for other families.
    loss_initial: float | None = None


@dataclass
class LayerReport:
    """Per-layer diagnostics after a file. Field names are the report schema's."""

    layer: int
    tokens: int
    updates: int
    pending_tokens: int
    norm_initial: float
    norm_final: float
    drift: float | None  # None only when read back from a report that held a non-finite value
    relative_drift: float | None
    # Updates whose delta was scaled down by a norm clip (In-Place `delta_clip`; 0 otherwise).
    clipped_updates: int = 0
    # Every update in order, with `--timeline` (None: not recorded; absent from the JSON then).
    timeline: list[UpdateRecord] | None = None

    @classmethod
    def from_json(cls, entry: dict) -> LayerReport:
        """Read back a report's layer entry (unknown keys ignored)."""
        values = {k: v for k, v in entry.items() if k in {f.name for f in fields(cls)}}
        if isinstance(values.get("timeline"), list):
            record_keys = {f.name for f in fields(UpdateRecord)}
            values["timeline"] = [
                UpdateRecord(**{k: v for k, v in record.items() if k in record_keys}) for record in values["timeline"]
            ]
        return cls(**values)


@dataclass
class FileTTT:
    """A file's TTT numbers: the family, its chunk size, and one record per TTT layer."""

    variant: str
    chunk_size: int
    layers: list[LayerReport] = field(default_factory=list)


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
    ttt: FileTTT | None = None
    transcript: str | None = None  # kept so a later --text run can write it without recomputing
    output_sha256: str | None = None  # ties these numbers to the output file they describe
    from_earlier_run: bool = False  # numbers carried over from the run that wrote the output
    warnings: list[str] = field(default_factory=list)  # e.g. which channel was taken of a dialogue
    # `score` runs: the file's teacher-forced NLL summary (its per-target array is the output).
    scores: ScoreSummary | None = None

    @classmethod
    def from_json(cls, entry: dict) -> FileResult:
        """Read back a report entry (unknown keys ignored, fields added since then defaulted)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in known}
        ttt = values.get("ttt")
        if isinstance(ttt, dict):
            values["ttt"] = FileTTT(
                variant=ttt.get("variant", "?"),
                chunk_size=ttt.get("chunk_size", 0),
                layers=[LayerReport.from_json(layer) for layer in ttt.get("layers", [])],
            )
        if isinstance(values.get("scores"), dict):
            values["scores"] = ScoreSummary.from_json(values["scores"])
        return cls(**values)


def sha256_of(path: Path) -> str:
    """An output's SHA-256: what ties a report entry to the very file it describes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_json(result: FileResult) -> dict:
    """A file's report entry: its fields, without the layers' `timeline` where none was recorded
    and without `scores` outside `score` runs (additive: reports keep their old shape)."""
    data = asdict(result)
    if data.get("scores") is None:
        data.pop("scores", None)
    for layer in (data.get("ttt") or {}).get("layers", []):
        if isinstance(layer, dict) and layer.get("timeline", ()) is None:
            del layer["timeline"]
    return data


def strict_json(value: tp.Any) -> tp.Any:
    """`value` with every non-finite float as null: bare NaN is not JSON and strict parsers reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


@dataclass
class RunSettings:
    """The report's `settings`: what produced its outputs. Field names are the report schema's.

    Model-side fields are None where no model was loaded (a shard that got no file); the Ray
    fields are written only for a Ray run. Keys this version does not know are kept in `extra`
    and written back, so rewriting a newer report loses nothing."""

    base: str
    checkpoint: str | None
    seed: int
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    channel: int | str | None = None
    lm: dict | None = None
    sampling: dict | None = None  # what LMGen sampled with
    sampling_overrides: dict | None = None  # which of it this run changed
    batch_size: int | None = None
    batch_size_reason: str | None = None
    decode_chunk: int | None = None
    ttt: dict | None = None
    backend: str | None = None  # "ray", or None for a local run
    workers: int | None = None
    gpus_per_worker: float | None = None
    # `score` runs: the user/text stream policies, loss weights (with where they came from), the
    # attention context in seconds and the position buckets.
    score: dict | None = None
    extra: dict = field(default_factory=dict)

    _ONLY_WHEN_SET = ("backend", "workers", "gpus_per_worker", "score")

    @classmethod
    def from_json(cls, data: dict | None) -> RunSettings:
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        values.setdefault("base", "")
        values.setdefault("checkpoint", None)
        values.setdefault("seed", 0)
        return cls(**values, extra=data)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for name in self._ONLY_WHEN_SET:
            if data[name] is None:
                del data[name]
        return {**data, **self.extra}


@dataclass
class Report:
    settings: RunSettings
    files: list[FileResult] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False
    # Files of the output folder this run did not plan, described by the runs that wrote them.
    earlier: list[FileResult] = field(default_factory=list)
    # `--shard I/N`: {"index", "count", "planned"} (files this shard planned); the JSON adds "done",
    # how many of them are finished, so a merge can tell a shard that was killed half way.
    shard: dict | None = None

    def all_files(self) -> list[FileResult]:
        return [*self.files, *self.earlier]

    def totals(self) -> dict:
        files = self.all_files()
        ok = [f for f in files if f.status == "ok"]
        audio_s = sum(f.duration_s for f in ok)
        return {
            "files": len(files),
            "ok": len(ok),
            "failed": sum(f.status == "failed" for f in files),
            "skipped": sum(f.status == "skipped" for f in files),
            "audio_s": round(audio_s, 3),
            "wall_s": round(self.wall_s, 3),
            # Seconds of processing per second of audio: below 1 is faster than real time.
            "real_time_factor": round(self.wall_s / audio_s, 4) if audio_s > 0 else 0.0,
            **({"scores": pooled.to_json()} if (pooled := pool([f.scores for f in ok if f.scores])) else {}),
        }

    def to_json(self) -> dict:
        data = {
            "schema": REPORT_SCHEMA,
            "settings": self.settings.to_json(),
            "files": [file_json(f) for f in self.all_files()],
            "totals": self.totals(),
        }
        if self.interrupted:
            data["interrupted"] = True
        if self.shard is not None:
            data["shard"] = {**self.shard, "done": len(self.files)}
        return strict_json(data)

    def write(self, path: Path) -> None:
        from ..jobs.files import atomic_output

        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
