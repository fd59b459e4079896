"""Audio in and out as Moshi wants it (24 kHz mono float32): channel picking and outputs written
block by block (`AudioWriter`). Runs read recordings in blocks (`reader.py`); `read_recording`
and `read_audio` here read a file whole, with sphn's resampler: the path runs used before, kept as
the reference the block reader is tested against (a 24 kHz input must give its very bytes) and
for whole-file uses (the reference streaming loop, tests, benches)."""

from __future__ import annotations

import contextlib
import functools
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sphn

from ..errors import AudioError, AudioTooShortError
from .files import FRAME_SIZE, MIN_SAMPLE_RATE, MIX, SAMPLE_RATE, AtomicFile, output_format


def _reason(exc: Exception, path: Path) -> str:
    """sphn prefixes messages with the quoted path; keep only the cause."""
    text = str(exc).replace(f'"{path}": ', "").replace(str(path), "").strip(" :")
    if "no suitable format reader" in text or "Format not recognised" in text:
        return "not a recognised audio format"
    return f"cannot decode audio ({text.splitlines()[0] if text else type(exc).__name__})"


# Channels "differ strongly" when their difference holds at least this share of the louder one's
# RMS (two speakers on two tracks); a stereo recording of one scene stays far below.
CHANNELS_DIFFER = 0.5
SILENCE_RMS = 1e-4


@dataclass
class Recording:
    pcm: np.ndarray  # 24 kHz mono float32 [T]
    warnings: list[str] = field(default_factory=list)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def channels_differ(pcm: np.ndarray) -> bool:
    """Whether some channel of `pcm` [C, T] differs strongly from channel 0 (see CHANNELS_DIFFER)."""
    first = pcm[0]
    for other in pcm[1:]:
        loudest = max(_rms(first), _rms(other))
        if loudest > SILENCE_RMS and _rms(first - other) >= CHANNELS_DIFFER * loudest:
            return True
    return False


def pick_channel(pcm: np.ndarray, channel: int | str | None, path: Path) -> Recording:
    """The mono signal `channel` names from `pcm` [C, T]; by default channel 0, with a warning
    when the channels differ strongly (a two-track dialogue: pass --channel)."""
    count = pcm.shape[0]
    if channel == MIX:
        return Recording(np.ascontiguousarray(pcm.mean(axis=0, dtype=np.float32)))
    index = 0 if channel is None else int(channel)
    if index >= count:
        raise AudioError(
            f"has {count} channel{'s' if count != 1 else ''}; --channel {channel} needs at least {index + 1}", path
        )
    warnings = []
    if channel is None and count > 1 and channels_differ(pcm):
        warnings.append(
            f"its {count} channels differ strongly and channel 0 was taken by default; "
            "choose with --channel N|left|right|mix"
        )
    return Recording(np.ascontiguousarray(pcm[index]), warnings)


def read_audio(path: str | Path, channel: int | str | None = None) -> np.ndarray:
    """`read_recording`'s samples (its warnings dropped)."""
    return read_recording(path, channel).pcm


def read_recording(path: str | Path, channel: int | str | None = None) -> Recording:
    """One channel (see `pick_channel`) of any file sphn or soundfile reads, resampled to 24 kHz,
    as float32 [T].

    sphn first, as moshi's own `run_inference` reads files, so outputs stay comparable; soundfile
    for formats only libsndfile knows. Files shorter than one frame raise `AudioTooShortError`.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError("no such file", path)
    if path.stat().st_size == 0:
        raise AudioError("empty file", path)
    try:
        # At the file's own rate: the rate is checked before any resampling work is done.
        pcm, rate = sphn.read(str(path))
    except Exception as first:
        pcm, rate = _read_with_soundfile(path, first)
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 2 or pcm.shape[0] == 0:
        raise AudioError("no audio channels", path)
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {rate} Hz is below the {MIN_SAMPLE_RATE} Hz minimum: too low to hold "
            "speech, and resampling it to 24 kHz would only multiply the work",
            path,
        )
    recording = pick_channel(pcm, channel, path)
    mono = recording.pcm
    if not np.isfinite(mono).all():
        raise AudioError("audio holds NaN or infinite samples", path)
    if rate != SAMPLE_RATE:
        mono = resample(mono, rate)
    if mono.shape[0] < FRAME_SIZE:
        raise AudioTooShortError(f"shorter than one 80 ms frame ({mono.shape[0]} samples at 24 kHz)", path)
    recording.pcm = mono
    return recording


def _read_with_soundfile(path: Path, first: Exception) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception:
        raise AudioError(_reason(first, path), path) from None
    return np.ascontiguousarray(data.T), int(rate)


@functools.cache
def _resampler_delay(rate: int) -> int:
    """Output samples sphn's resampler puts before the signal (16 kHz -> 24 kHz: 768), measured
    on an impulse so it holds for whatever resampler the installed sphn uses."""
    impulse = np.zeros((1, rate), dtype=np.float32)
    impulse[0, 0] = 1.0
    return int(np.argmax(np.abs(sphn.resample(impulse, src_sample_rate=rate, dst_sample_rate=SAMPLE_RATE)[0])))


def resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Mono `pcm` at `rate` to 24 kHz: exactly `round(n * 24000 / rate)` samples, time-aligned.

    sphn's resampler delays the signal and works in blocks (8 kHz, 100 samples: 3072 out instead
    of 300), so the delay is cut from the front and the input is padded with silence so its
    tail comes out.
    """
    length = round(len(pcm) * SAMPLE_RATE / rate)
    delay = _resampler_delay(rate)
    tail = np.zeros(int(np.ceil((delay + 64) * rate / SAMPLE_RATE)) + 64, dtype=np.float32)
    out = sphn.resample(np.concatenate([pcm, tail])[None], src_sample_rate=rate, dst_sample_rate=SAMPLE_RATE)[0]
    out = np.asarray(out[delay : delay + length], dtype=np.float32)
    return np.pad(out, (0, length - len(out))) if len(out) < length else out


def to_pcm16(pcm: np.ndarray) -> np.ndarray:
    """Float samples to 16-bit as sphn's WAV writer (hence moshi) converts them: clipped to
    [-1, 1], scaled by 32767 and truncated toward zero; NaN becomes 0."""
    clipped = np.clip(np.nan_to_num(np.asarray(pcm, dtype=np.float32), nan=0.0), -1.0, 1.0)
    return (clipped * np.float32(32767)).astype(np.int16)


class AudioWriter:
    """An output written block by block as it is produced, so memory stays flat however long the
    recording, and renamed into place only by `commit()` (see `AtomicFile`).

    WAV is 16-bit PCM with the very bytes `sphn.write_wav` gives for the whole signal (header
    from the standard library's `wave`, samples through `to_pcm16`); other formats go through
    libsndfile, which encodes a stream block by block as it does a whole file.
    """

    def __init__(self, path: str | Path, sample_rate: int = SAMPLE_RATE):
        fmt = output_format(Path(path))
        self.samples = 0
        self._file = AtomicFile(path)
        try:
            if fmt[0] == "WAV":
                import wave

                self._wav: tp.Any = wave.open(str(self._file.tmp), "wb")
                self._wav.setnchannels(1)
                self._wav.setsampwidth(2)
                self._wav.setframerate(sample_rate)
                self._sound: tp.Any = None
            else:
                import soundfile

                self._wav = None
                self._sound = soundfile.SoundFile(
                    str(self._file.tmp), "w", samplerate=sample_rate, channels=1, format=fmt[0], subtype=fmt[1]
                )
        except BaseException:
            self._file.abort()
            raise

    @property
    def path(self) -> Path:
        return self._file.path

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if self._wav is not None:
            self._wav.writeframesraw(to_pcm16(block).astype("<i2").tobytes())
        else:  # libsndfile clips floats itself, but a NaN stops its encoders
            self._sound.write(np.nan_to_num(block, nan=0.0))
        self.samples += len(block)

    def _close(self) -> None:
        handle, self._wav, self._sound = self._wav or self._sound, None, None
        if handle is not None:
            handle.close()  # wave patches the header's sizes here

    def commit(self) -> None:
        """Finish the file and rename it to its final name."""
        try:
            self._close()
            self._file.commit()
        finally:
            self._file.abort()

    def abort(self) -> None:
        """Drop what was written; nothing appears under the final name."""
        with contextlib.suppress(Exception):
            self._close()
        self._file.abort()


def write_audio(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a whole signal in the format `path`'s extension names (see `OUTPUT_FORMATS`), atomically."""
    writer = AudioWriter(path, sample_rate)
    try:
        writer.write(pcm)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
