"""What made an output: the model (base and fine-tune, by a fingerprint of their files) and the
settings that change what a run writes. Every report entry a run makes records it (`made_by`),
so a rerun with another model, or a merge of parts made by different ones, can tell.

`made_by` is one JSON object:

- compared (`COMPARED`: two outputs were made alike when these are equal; `id` hashes them):
  `base_fingerprint`, `finetune_fingerprint`, `seed` (null when sampling is greedy: it cannot
  matter then), `ttt` (TTT layers adapting: false for `--no-ttt`, null without TTT layers),
  `delta_clip` (In-Place's effective bound), `sampling` (the `LMGen` settings: the checkpoint's
  `lm_gen_config` with the run's overrides), `channel`, `dtype`;
- recorded, not compared: `base`, `checkpoint` (as given: a moved checkpoint is the same model),
  `step`, and, for each entry, `device` (cpu / cuda), `batch_size` and `decode_chunk`. These move
  outputs by rounding only (see README: a fixed batch size, decode chunks); they are kept so a
  file can be reproduced exactly, but a resume on another machine or with the batch size `auto`
  picked for the files left must not call every earlier output foreign.

A Ray run with `--dtype auto` records `auto` (its actors choose); pass `--dtype` to compare Ray
and local runs. No torch here: the fingerprints are computed before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import struct
import typing as tp
from pathlib import Path

FINGERPRINT_VERSION = b"moshi-ttt.fingerprint/1\0"
COMPARED = (
    "score",  # `score` runs only (absent from `infer`'s made_by, so their ids are unchanged)
    "base_fingerprint",
    "finetune_fingerprint",
    "seed",
    "ttt",
    "delta_clip",
    "sampling",
    "channel",
    "dtype",
)
SAMPLE_BYTES = 4096  # read at the start, middle and end of every tensor
WHOLE_FILE_BYTES = 1 << 20  # smaller files (configs, tokenizers, tiny weights) are hashed whole
SPREAD_BLOCKS = 64  # other large files: this many blocks spread evenly over the file
MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header


def fingerprint(path: Path | str) -> str:
    """A short fingerprint of a weights file's content, cheap enough to take on every run.

    Hashing a 15 GB base in full would cost ~10 s per run (and per shard, per Ray actor), and a
    file's size and mtime do not tell checkpoints apart (every step of a training run has the same
    tensors, hence the same header and size; a copy changes the mtime of identical weights). So
    this hashes what tells weights apart and nothing else, a few MB at most:

    - safetensors: the header (every tensor's name, dtype, shape and offsets), the file size, and
      up to 4 KiB at the start, middle and end of every tensor's bytes. Training changes every
      trained tensor throughout, so two checkpoints of one run differ in these samples; a copy of
      a checkpoint (any mtime, any folder) has the same fingerprint.
    - other files: the whole file up to 1 MiB, else its size and 64 blocks spread over it.

    Not noticed: an edit confined to bytes no sample covers (e.g. one weight changed by hand in
    the middle of a large tensor). `--overwrite` redoes everything whatever made it.
    """
    path = Path(path)
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        digest.update(struct.pack("<Q", size))
        tensors = _safetensors_ranges(handle, size)
        if tensors is not None:
            header, ranges = tensors
            digest.update(b"safetensors\0" + header)
            for start, end in ranges:
                for offset, length in _samples(start, end):
                    handle.seek(offset)
                    digest.update(handle.read(length))
        elif size <= WHOLE_FILE_BYTES:
            handle.seek(0)
            digest.update(handle.read())
        else:
            step = max(SAMPLE_BYTES, size // SPREAD_BLOCKS)
            for offset in [*range(0, size - SAMPLE_BYTES, step), size - SAMPLE_BYTES]:
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def _safetensors_ranges(handle: tp.BinaryIO, size: int) -> tuple[bytes, list[tuple[int, int]]] | None:
    """The header of a safetensors file and each tensor's byte range in the file, or None when
    the file is not one (then it is fingerprinted as any file)."""
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        return None
    length = struct.unpack("<Q", prefix)[0]
    if not 2 <= length <= min(MAX_HEADER, size - 8):
        return None
    header = handle.read(length)
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    ranges = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None
        start, end = 8 + length + offsets[0], 8 + length + offsets[1]
        if not 8 + length <= start <= end <= size:
            return None
        ranges.append((start, end))
    return header, sorted(ranges)


def _samples(start: int, end: int) -> list[tuple[int, int]]:
    """Start, middle and end of [start, end), at most SAMPLE_BYTES each (all of it if small)."""
    if end - start <= 3 * SAMPLE_BYTES:
        return [(start, end - start)]
    middle = start + (end - start) // 2 - SAMPLE_BYTES // 2
    return [(start, SAMPLE_BYTES), (middle, SAMPLE_BYTES), (end - SAMPLE_BYTES, SAMPLE_BYTES)]


def fingerprint_files(paths: tp.Iterable[Path | str | None], extra: tp.Any = None) -> str:
    """One fingerprint for a set of files (each by `fingerprint`, whatever folder they are in;
    absent ones by their name alone, e.g. a hub file not downloaded) and a JSON-able `extra`."""
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    for path in paths:
        if path is None:
            continue
        local = Path(path)
        part = fingerprint(local) if local.is_file() else f"absent:{local.name}"
        digest.update(part.encode() + b"\0")
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def origin_id(made_by: dict) -> str:
    """The hash of the compared part of `made_by`: equal ids, outputs made alike."""
    compared = {key: made_by.get(key) for key in COMPARED if key != "score" or "score" in made_by}
    return hashlib.sha256(json.dumps(compared, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_origin(
    *,
    base: str,
    base_fingerprint: str,
    checkpoint: str | None,
    finetune_fingerprint: str | None,
    step: int | None,
    seed: int,
    greedy: bool,
    ttt: bool | None,
    delta_clip: float | None,
    sampling: dict,
    channel: int | str | None,
    dtype: str,
    score: dict | None = None,
) -> dict:
    """A run's `made_by` (see the module docstring), with its `id`. `score`: a `score` run's
    settings that change its arrays or entries (its user/text streams, buckets, loss weights);
    scoring samples nothing, so its seed and sampling are not part of what made it."""
    made_by = {
        "base": base,
        "checkpoint": checkpoint,
        "step": step,
        "base_fingerprint": base_fingerprint,
        "finetune_fingerprint": finetune_fingerprint,
        "seed": None if greedy or score is not None else seed,
        "ttt": ttt,
        "delta_clip": delta_clip,
        "sampling": None if score is not None else sampling,
        "channel": None if score is not None else 0 if channel is None else channel,
        "dtype": dtype,
    }
    if score is not None:  # absent for `infer`: its ids stay what they were
        made_by["score"] = score
    return {"id": origin_id(made_by), **made_by}


def same_origin(a: dict | None, b: dict | None) -> bool:
    """Whether two `made_by` say the outputs were made alike; unknown (None) matches anything."""
    if a is None or b is None:
        return True
    return a.get("id") == b.get("id")


LABELS = {
    "base_fingerprint": "base weights",
    "finetune_fingerprint": "fine-tune weights",
    "seed": "seed",
    "ttt": "TTT",
    "delta_clip": "delta clip",
    "sampling": "sampling",
    "channel": "channel",
    "dtype": "dtype",
    "score": "score settings",
}


def difference(theirs: dict, ours: dict) -> str:
    """What differs between an earlier output's `made_by` and this run's, in a few words:
    `step 100 (now 200), fine-tune weights`."""
    said = []
    if theirs.get("step") != ours.get("step") and (theirs.get("step") is not None or ours.get("step") is not None):
        said.append(f"step {theirs.get('step')} (now {ours.get('step')})")
    for key in COMPARED:
        if theirs.get(key) == ours.get(key):
            continue
        if key.endswith("_fingerprint") or key == "sampling":
            said.append(LABELS[key])
        elif key == "ttt":
            said.append(f"TTT {_on_off(theirs.get(key))} (now {_on_off(ours.get(key))})")
        else:
            said.append(f"{LABELS[key]} {theirs.get(key)} (now {ours.get(key)})")
    return ", ".join(said) or "another version of moshi-ttt"


def _on_off(value: tp.Any) -> str:
    return "none" if value is None else "on" if value else "off"


def entry_origin(made_by: dict | None, settings: tp.Any) -> dict | None:
    """What an entry of this run records: the run's `made_by` plus what moves outputs by rounding
    only (device class, batch size, decode chunk), as the report's settings know them now."""
    if made_by is None:
        return None
    device = getattr(settings, "device", None)
    return {
        **made_by,
        "device": None if device is None else str(device).split(":")[0],
        "batch_size": getattr(settings, "batch_size", None),
        "decode_chunk": getattr(settings, "decode_chunk", None),
    }
