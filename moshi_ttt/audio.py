"""Reading recordings as Moshi wants them (24 kHz mono float32) and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import typing as tp
from pathlib import Path

import numpy as np
import sphn

from .errors import AudioError, AudioTooShortError

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # 80 ms at 24 kHz: one Mimi frame, one LMGen step
# What the readers (sphn's symphonia, then libsndfile) decode; used to find inputs in folders.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff",
                    ".aifc", ".caf", ".au", ".w64", ".wv")
PARTIAL_SUFFIX = ".partial"


def _reason(exc: Exception, path: Path) -> str:
    """sphn prefixes messages with the quoted path; keep only the cause."""
    text = str(exc).replace(f'"{path}": ', "").replace(str(path), "").strip(" :")
    if "no suitable format reader" in text or "Format not recognised" in text:
        return "not a recognised audio format"
    return f"cannot decode audio ({text.splitlines()[0] if text else type(exc).__name__})"


def read_audio(path: str | Path) -> np.ndarray:
    """Channel 0 of any file sphn or soundfile reads, resampled to 24 kHz, as float32 [T].

    sphn first, as moshi's own `run_inference` reads files, so outputs stay comparable; soundfile
    for formats only libsndfile knows. Files shorter than one frame raise `AudioTooShortError`.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError("no such file", path)
    if path.stat().st_size == 0:
        raise AudioError("empty file", path)
    try:
        pcm, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    except Exception as first:
        pcm = _read_with_soundfile(path, first)
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 2 or pcm.shape[0] == 0:
        raise AudioError("no audio channels", path)
    mono = np.ascontiguousarray(pcm[0])
    if not np.isfinite(mono).all():
        raise AudioError("audio holds NaN or infinite samples", path)
    if mono.shape[0] < FRAME_SIZE:
        raise AudioTooShortError(f"shorter than one 80 ms frame ({mono.shape[0]} samples at 24 kHz)", path)
    return mono


def _read_with_soundfile(path: Path, first: Exception) -> np.ndarray:
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception:
        raise AudioError(_reason(first, path), path) from None
    pcm = np.ascontiguousarray(data.T)
    if rate != SAMPLE_RATE and pcm.shape[1] > 0:
        pcm = sphn.resample(pcm, src_sample_rate=rate, dst_sample_rate=SAMPLE_RATE)
    return pcm


def partial_path(path: Path) -> Path:
    """Temporary name beside the final one: same folder (so the rename is atomic), never an input."""
    return path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> tp.Iterator[Path]:
    """Yield a temporary path to write; rename it to `path` only if the block completes.

    An interrupted or failed write leaves nothing under the final name, so a rerun can trust
    that every existing output is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV, as moshi writes its outputs, atomically."""
    with atomic_output(path) as tmp:
        sphn.write_wav(str(tmp), np.asarray(pcm, dtype=np.float32), sample_rate=sample_rate)


def write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
