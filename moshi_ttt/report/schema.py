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
        values = {k: v for k, v in entry.items() if k in _LAYER_FIELDS}
        if isinstance(values.get("timeline"), list):
            values["timeline"] = [
                UpdateRecord(**{k: v for k, v in record.items() if k in _RECORD_FIELDS})
                for record in values["timeline"]
            ]
        return cls(**values)


_LAYER_FIELDS = frozenset(f.name for f in fields(LayerReport))
_RECORD_FIELDS = frozenset(f.name for f in fields(UpdateRecord))


@dataclass
class FileTTT:
    """A file's TTT numbers: the family, its chunk size, and one record per TTT layer."""

    variant: str
    chunk_size: int
    layers: list[LayerReport] = field(default_factory=list)


class MalformedEntry(TypeError, ValueError):
    """A report entry that is not what this schema writes (a field of the wrong type, a status
    we never write, a layer record missing a field). A TypeError too, for callers that caught
    the TypeError a malformed entry used to raise."""


_STATUSES = ("ok", "failed", "skipped")


def _expect(entry: dict, key: str, kinds: tuple[type, ...], what: str) -> None:
    value = entry.get(key)
    if key in entry and not (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        raise MalformedEntry(f"{key} must be {what}, got {type(value).__name__}")


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
    # What made the output (model, fine-tune, step, fingerprints, settings that change outputs):
    # `report.provenance`. Kept as it was when an entry is carried into a later run's report.
    made_by: dict | None = None
    # The output's {"size", "mtime_ns", "ino"} when its SHA-256 was last known to hold: a resume
    # trusts the hash while these are unchanged instead of reading the file again (`output_matches`).
    output_stat: dict | None = None

    @classmethod
    def from_json(cls, entry: dict) -> FileResult:
        """Read back a report entry (unknown keys ignored, fields added since then defaulted).
        `MalformedEntry` says what is wrong with one that is not of this schema."""
        if not isinstance(entry, dict):
            raise MalformedEntry(f"an entry must be a JSON object, got {type(entry).__name__}")
        if not isinstance(entry.get("input"), str):
            raise MalformedEntry("input must be a path (a string)")
        if entry.get("status") not in _STATUSES:
            raise MalformedEntry(f"status must be one of {', '.join(_STATUSES)}, got {entry.get('status')!r}")
        for key in ("output", "reason", "transcript", "output_sha256"):
            _expect(entry, key, (str, type(None)), "a string or null")
        for key in ("duration_s", "wall_s"):
            _expect(entry, key, (int, float), "a number")
        for key in ("frames", "steps"):
            _expect(entry, key, (int,), "a whole number")
        _expect(entry, "from_earlier_run", (bool,), "true or false")
        for key in ("ttt", "made_by", "output_stat"):
            _expect(entry, key, (dict, type(None)), "an object or null")
        _expect(entry, "warnings", (list,), "a list")
        known = _FILE_FIELDS
        values = {k: v for k, v in entry.items() if k in known}
        ttt = values.get("ttt")
        if isinstance(ttt, dict):
            layers = ttt.get("layers", [])
            if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
                raise MalformedEntry("ttt.layers must be a list of objects")
            try:
                values["ttt"] = FileTTT(
                    variant=ttt.get("variant", "?"),
                    chunk_size=ttt.get("chunk_size", 0),
                    layers=[LayerReport.from_json(layer) for layer in layers],
                )
            except (TypeError, ValueError, AttributeError) as exc:
                raise MalformedEntry(f"ttt.layers: {exc}") from None
        if values.get("scores") is not None:
            if not isinstance(values["scores"], dict):
                raise MalformedEntry("scores must be an object")
            try:
                values["scores"] = ScoreSummary.from_json(values["scores"])
            except (TypeError, ValueError, AttributeError) as exc:
                raise MalformedEntry(f"scores: {exc}") from None
        return cls(**values)


_FILE_FIELDS = frozenset(f.name for f in fields(FileResult))


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
    and without `scores` outside `score` runs (additive: reports keep their old shape). Built
    field by field (`dataclasses.asdict` deep-copies: it was most of the cost of writing a large
    report)."""
    if result.ttt is not None and not isinstance(result.ttt, FileTTT):  # built by hand (a dict): as it is
        data = asdict(result)
        _drop_empty_timelines(data)
        if data.get("scores") is None:
            data.pop("scores", None)
        return data
    data = {name: getattr(result, name) for name in _FILE_ORDER}
    data["warnings"] = list(result.warnings)
    if result.scores is None:  # only `score` runs' entries carry scores
        del data["scores"]
    else:
        data["scores"] = result.scores.to_json()
    if result.ttt is not None:
        data["ttt"] = {
            "variant": result.ttt.variant,
            "chunk_size": result.ttt.chunk_size,
            "layers": [_layer_json(layer) for layer in result.ttt.layers],
        }
    return data


def _drop_empty_timelines(data: dict) -> None:
    for layer in (data.get("ttt") or {}).get("layers", []):
        if isinstance(layer, dict) and layer.get("timeline", ()) is None:
            del layer["timeline"]


_FILE_ORDER = tuple(f.name for f in fields(FileResult))
_LAYER_ORDER = tuple(f.name for f in fields(LayerReport))


def _layer_json(layer: LayerReport) -> dict:
    data = {name: getattr(layer, name) for name in _LAYER_ORDER}
    if layer.timeline is None:
        del data["timeline"]
    else:
        data["timeline"] = [dict(vars(record)) for record in layer.timeline]
    return data


def entry_text(result: FileResult) -> str:
    """A file's report entry as strict JSON text on one line: what the journal appends and the
    report joins, so each entry is serialised once however often the report is written."""
    data = file_json(result)
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:  # a non-finite number somewhere: null, as strict parsers need
        return json.dumps(strict_json(data), allow_nan=False)


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
    # What this run's outputs are made by (`report.provenance.describe_origin`): each entry this
    # run makes records it (with its batch size and device), and a rerun compares it with theirs.
    made_by: dict | None = None
    extra: dict = field(default_factory=dict)

    _ONLY_WHEN_SET = ("backend", "workers", "gpus_per_worker", "score", "made_by")

    @classmethod
    def from_json(cls, data: dict | None) -> RunSettings:
        if data is not None and not isinstance(data, dict):
            raise MalformedEntry(f"settings must be a JSON object, got {type(data).__name__}")
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
    # The last line of the report's journal this report holds (`report.journal`); None: no journal.
    journal_seq: int | None = None

    def all_files(self) -> list[FileResult]:
        return [*self.files, *self.earlier]

    def made_by_other(self) -> int:
        """Entries whose output another model or other output-changing settings made than the
        ones this report's settings name (entries of unknown origin are not counted)."""
        own = (self.settings.made_by or {}).get("id")
        if own is None:
            return 0
        return sum(1 for f in self.all_files() if f.made_by is not None and f.made_by.get("id") not in (None, own))

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
            "made_by_other": self.made_by_other(),
            **({"scores": pooled.to_json()} if (pooled := pool([f.scores for f in ok if f.scores])) else {}),
        }

    def _head(self) -> dict:
        return {"schema": REPORT_SCHEMA, "settings": strict_json(self.settings.to_json())}

    def _tail(self) -> dict:
        data: dict = {"totals": strict_json(self.totals())}
        if self.interrupted:
            data["interrupted"] = True
        if self.shard is not None:
            data["shard"] = {**self.shard, "done": len(self.files)}
        if self.journal_seq is not None:
            data["journal"] = {"seq": self.journal_seq}
        return data

    def to_json(self) -> dict:
        return {**self._head(), "files": [strict_json(file_json(f)) for f in self.all_files()], **self._tail()}

    def to_text(self, entries: tp.Sequence[str] | None = None) -> str:
        """The report as written: indented, but one line per file (`entry_text`; pass `entries`,
        one per `all_files()`, where they are already serialised). Parses to `to_json()`."""
        if entries is None:
            entries = [entry_text(f) for f in self.all_files()]
        head = json.dumps(self._head(), indent=2, allow_nan=False)[:-2]  # without the closing "\n}"
        tail = json.dumps(self._tail(), indent=2, allow_nan=False)[1:]  # without the opening "{"
        files = "[\n    " + ",\n    ".join(entries) + "\n  ]" if entries else "[]"
        return f'{head},\n  "files": {files},{tail}\n'

    def write(self, path: Path, entries: tp.Sequence[str] | None = None) -> None:
        from ..jobs.files import atomic_output

        text = self.to_text(entries)
        with atomic_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
