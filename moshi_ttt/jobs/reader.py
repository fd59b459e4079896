"""Reading a recording in blocks, at 24 kHz float32, with its header checked first.

`read_header` opens a file and reads only its header: a WAV's RIFF chunks (parsed here, so no
decoder ever sees a sample rate of 0, which makes sphn's decoder panic), then libsndfile's
`info`, and for formats only sphn reads, sphn's `FileReader` (which parses the header alone).
A sample rate outside 4 kHz..384 kHz, a channel count outside 1..64, or a declared length over a
week is refused with one `AudioError` line naming the file, before anything is allocated from
those numbers (a header saying 2^31-1 Hz once made the resampler allocate 8 GiB). Every call
into sphn is guarded: a Rust panic (`pyo3_runtime.PanicException`, a BaseException) becomes an
`AudioError` too. (Rust still prints the panic message on stderr; the error is one line.)

`RecordingReader` then yields the recording in blocks (`blocks()`, or full frames with
`frames()`), memory flat whatever the file's length, with the decoder `infer` used before:

- libsndfile, block by block (`SoundFile.read(frames)`), for PCM (8 to 32 bits, u-law, A-law) and
  float WAV/FLAC/AIFF/CAF/...: for these libsndfile's samples are bit for bit sphn's (tested),
  so the whole-file path's bytes are kept while reading in blocks.
- MP3: sphn (symphonia), as before, in windows of whole seconds each decoded from one second
  earlier (`FileReader.decode` seeks and resets the decoder; after a second of pre-roll the
  decoder's state has converged). The windows join to exactly `sphn.read`'s samples (tested:
  16, 24, 44.1 and 48 kHz, mono and stereo). libsndfile decodes MP3 differently (it trims the
  encoder delay: 1536 fewer samples), so it is used only where sphn cannot open the file.
- Everything else libsndfile reads (Ogg Vorbis and Opus, ADPCM WAV, ...): libsndfile in blocks.
  Opus was libsndfile's before too (sphn does not read it). Vorbis was sphn's: symphonia's
  Vorbis seek drops 512 samples, so its windows cannot be joined, and libsndfile's Vorbis
  differs from symphonia's (symphonia keeps up to a block of padding at the end, e.g. 720128
  instead of 720000 samples, and samples differ: max 0.35 on white noise at 48 kHz, ~1e-7 on
  a tone).
- Formats only sphn reads (M4A/AAC, ...) are still decoded whole (`FileReader.decode_all`,
  sphn's own reader), then handed out in blocks: memory grows with the length there.

A decode error in the middle of a file fails it there: blocks already handed out cannot be
taken back (the whole-file path retried the whole file with libsndfile when sphn failed; here
libsndfile is tried first except for MP3, so this only changes MP3 files symphonia chokes on
halfway).

Channels: `channel` as `audio.pick_channel` (an index, or "mix" = float32 mean over channels,
the same per-sample arithmetic), or `all_channels=True` for [C, T] blocks (`score`: channel 0 is
Moshi, channel 1 the user). The "channels differ strongly" warning (`audio.channels_differ`) is
decided at end of file from running per-channel sums of squares (float64), i.e. on the whole
recording as before; only the summation order differs (blocks), so a file exactly at the
threshold might tip the other way. `warnings` is complete once the stream is exhausted.

Resampling to 24 kHz streams through python-soxr's `ResampleStream` (HQ), all channels at once.
The output is held back so it never runs past `round(n_so_far * 24000 / rate)`, and at end of
file is trimmed or zero-padded to exactly `round(n * 24000 / rate)` samples (as
`audio.resample`; soxr itself may give one more sample, e.g. 16 kHz with n odd). A 24 kHz input
is not resampled: its blocks are the file's samples, bit for bit the whole-file path's.

Measured (numpy 2.2.6, soxr 1.1.0, sphn 0.2.1; `python -m moshi_ttt.jobs.reader --measure`, a
60 s mono chirp at 0.4 plus noise at 0.02, RMS 0.28):
- streamed vs whole-file `soxr.resample` (HQ): max abs difference 0 (bit-identical) at 16 kHz
  and at 44.1 kHz, with 4 s blocks and with 1000-sample blocks (the tests allow 1e-6);
- vs the old sphn path (`audio.resample`), same length: 16 kHz max abs 0.016, RMS 0.0029;
  44.1 kHz max abs 0.195, RMS 0.072. On pure tones (300 Hz and 3 kHz at 0.4) against the exact
  24 kHz samples, soxr errs by at most 2.1e-7 at both rates; sphn by 4.2e-7 at 16 kHz but by
  8.5e-3 (300 Hz) and 8.5e-2 (3 kHz) at 44.1 kHz: its output lags by a constant ~11 us (0.27 of
  a 24 kHz sample) there, which the old integer delay compensation cannot remove. So the
  differences at 44.1 kHz are mostly sphn's lag, the rest filter shape near Nyquist.

Memory (peak RSS, VmHWM, of a process reading the file frame by frame, 4 s blocks): 24 kHz
stereo PCM16 WAV, `mix`: 34.3 MB for 1 min and 34.3 MB for 60 min (the old whole-file path:
51 MB and 1348 MB); 44.1 kHz stereo, resampled: 40.0 MB and 39.9 MB (old: 80 MB and 3057 MB);
44.1 kHz stereo MP3 (sphn windows): 42.4 MB for 1 min and for 10 min.
"""

from __future__ import annotations

import math
import struct
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AudioError, AudioTooShortError, MoshiTTTError
from .audio import CHANNELS_DIFFER, SILENCE_RMS, _reason
from .files import FRAME_SIZE, MIN_SAMPLE_RATE, MIX, SAMPLE_RATE, parse_channel

# Above any rate audio is recorded at (DXD is 352.8 kHz): a larger number is a broken header.
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
# A declared length over a week is a broken header (or a file this tool cannot finish anyway).
MAX_DURATION_S = 7 * 24 * 3600
BLOCK_SECONDS = 4.0
# One read holds at most this many samples (all channels together): 4 MiB of float32.
MAX_BLOCK_SAMPLES = 1 << 20
# MP3 windows decoded through sphn start this many seconds early (decoder state converges).
PREROLL_SECONDS = 1
# libsndfile subtypes whose samples equal sphn's bit for bit (tested in WAV, FLAC, AIFF, CAF).
SAME_AS_SPHN = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"})
# The ways a file is decoded (see the module docstring).
SOUNDFILE, SPHN_WINDOWS, SPHN_WHOLE = "soundfile", "sphn-windows", "sphn-whole"
_WAV_PCM_TAGS = (1, 3, 0xFFFE)  # PCM, IEEE float, extensible
_MAX_CHUNKS = 10_000


@dataclass(frozen=True)
class Header:
    """What a file's header declares, checked (see `read_header`)."""

    path: Path
    sample_rate: int
    channels: int
    frames: int | None  # at the file's own rate; None where the header does not say
    format: str  # e.g. "WAV/PCM_16", "MP3/MPEG_LAYER_III"
    decoder: str  # SOUNDFILE, SPHN_WINDOWS or SPHN_WHOLE

    @property
    def duration_s(self) -> float | None:
        return None if self.frames is None else self.frames / self.sample_rate

    @property
    def samples_24k(self) -> int | None:
        """Samples the reader will yield (as declared; the file's content decides)."""
        return None if self.frames is None else round(self.frames * SAMPLE_RATE / self.sample_rate)


# -- guarded decoder calls ---------------------------------------------------------------------------


def _is_panic(exc: BaseException) -> bool:
    return type(exc).__name__ == "PanicException"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_T = tp.TypeVar("_T")


def _guarded(path: Path, fn: tp.Callable[..., _T], *args: tp.Any) -> _T:
    """`fn(*args)` with any decoder failure, Rust panics included, as one-line `AudioError`."""
    try:
        return fn(*args)
    except MoshiTTTError:
        raise
    except MemoryError:
        raise AudioError("too large to decode in memory", path) from None
    except Exception as exc:
        raise AudioError(_reason(exc, path), path) from None
    except BaseException as exc:  # pyo3's PanicException is not an Exception
        if not _is_panic(exc):
            raise
        raise AudioError(f"the decoder failed on this file ({_first_line(exc)})", path) from None


# -- header ------------------------------------------------------------------------------------------


def _check(path: Path, rate: int | float | None, channels: int | None, frames: int | float | None) -> None:
    """Refuse numbers no recording has, before anything is sized from them."""
    if rate is not None:
        if not rate > 0:
            raise AudioError(f"header declares a sample rate of {rate} Hz", path)
        if rate < MIN_SAMPLE_RATE:
            raise AudioError(
                f"sample rate {rate} Hz is below the {MIN_SAMPLE_RATE} Hz minimum: too low to hold "
                "speech, and resampling it to 24 kHz would only multiply the work",
                path,
            )
        if rate > MAX_SAMPLE_RATE:
            raise AudioError(
                f"header declares a sample rate of {rate} Hz, above the {MAX_SAMPLE_RATE} Hz any recording uses", path
            )
    if channels is not None and not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"header declares {channels} channels (1 to {MAX_CHANNELS} are read)", path)
    if frames is not None and rate:
        if frames < 0 or not math.isfinite(frames):
            raise AudioError(f"header declares a length of {frames} samples", path)
        if frames / rate > MAX_DURATION_S:
            raise AudioError(
                f"header declares {frames / rate / 3600:.0f} hours of audio, more than the "
                f"{MAX_DURATION_S // 3600} hours a recording is read for",
                path,
            )


def _check_wav_header(path: Path, size: int) -> None:
    """If `path` is a RIFF/RIFX/RF64 WAVE file, check its fmt chunk, read chunk header by chunk
    header (a few bytes each): refuse a WAVE file without one, or with one no decoder should see
    (sphn panics on a sample rate of 0). Its data size needs no check: libsndfile reads what the
    file holds whatever the header says (a streamed WAV says 0xFFFFFFFF)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX", b"RF64", b"BW64"):
            return
        order = ">" if head[:4] == b"RIFX" else "<"
        fmt: tuple[int, ...] | None = None
        pos = 12
        for _ in range(_MAX_CHUNKS):
            if pos + 8 > size:
                break
            f.seek(pos)
            chunk, length = struct.unpack(order + "4sI", f.read(8))
            if chunk == b"fmt ":
                body = f.read(min(length, 16))
                if len(body) < 14:
                    raise AudioError("WAV header is truncated (fmt chunk)", path)
                # WAVEFORMAT (14 bytes) has no bits per sample: None, not checked.
                fmt = (
                    *struct.unpack(order + "HHIIH", body[:14]),
                    struct.unpack(order + "H", body[14:16])[0] if len(body) == 16 else None,
                )
                break
            pos += 8 + length + (length & 1)
    if fmt is None:
        raise AudioError("WAV file without a fmt chunk", path)
    tag, channels, rate, _, block_align, bits = fmt
    _check(path, rate, channels, None)
    if block_align == 0:
        raise AudioError("WAV header declares a block size of 0 bytes", path)
    if bits is not None and (bits > 64 or (bits == 0 and tag in _WAV_PCM_TAGS)):
        raise AudioError(f"WAV header declares {bits} bits per sample", path)


def _open_sphn(path: Path) -> tp.Any:
    import sphn

    reader = _guarded(path, sphn.FileReader, str(path))
    rate, channels = _guarded(path, lambda: (int(reader.sample_rate), int(reader.channels)))
    _check(path, rate, channels, None)
    duration = _guarded(path, lambda: float(reader.duration_sec))
    _check(path, rate, channels, duration * rate)
    return reader


def _sphn_frames(reader: tp.Any) -> int:
    return int(round(float(reader.duration_sec) * int(reader.sample_rate)))


def read_header(path: str | Path) -> Header:
    """`path`'s header, checked (see the module docstring), and which decoder will read it.
    Raises `AudioError` (one line, naming the file) for a file that cannot or must not be read.
    Reads no samples (for MP3 libsndfile may scan frame headers to count them)."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioError("no such file", path)
    size = path.stat().st_size
    if size == 0:
        raise AudioError("empty file", path)
    _check_wav_header(path, size)
    try:
        info = soundfile.info(str(path))
    except Exception:
        info = None
    if info is not None:
        _check(path, info.samplerate, info.channels, info.frames)
        fmt = f"{info.format}/{info.subtype}"
        if info.subtype not in SAME_AS_SPHN and info.format == "MP3":
            try:
                reader = _open_sphn(path)
            except AudioError:
                pass  # libsndfile reads it where sphn cannot
            else:
                return Header(
                    path, int(reader.sample_rate), int(reader.channels), _sphn_frames(reader), fmt, SPHN_WINDOWS
                )
        return Header(path, int(info.samplerate), int(info.channels), int(info.frames), fmt, SOUNDFILE)
    reader = _open_sphn(path)
    return Header(
        path,
        int(reader.sample_rate),
        int(reader.channels),
        _sphn_frames(reader),
        path.suffix.lstrip(".").upper() or "?",
        SPHN_WHOLE,
    )


def probe_duration(path: str | Path) -> float | None:
    """Seconds of audio in `path` from its header alone (no decoding); None where the header
    does not say or the file will be refused (the run reports that file when it reaches it)."""
    try:
        return read_header(path).duration_s
    except MoshiTTTError:
        return None


# -- decoding at the file's rate ---------------------------------------------------------------------


def _soundfile_blocks(path: Path, handle: tp.Any, frames: int) -> tp.Iterator[np.ndarray]:
    while True:
        data = _guarded(path, handle.read, frames, "float32", True)
        if not len(data):
            return
        yield np.ascontiguousarray(data.T)
        if len(data) < frames:
            return


def _sphn_windows(path: Path, reader: tp.Any, seconds: int) -> tp.Iterator[np.ndarray]:
    """Whole-second windows, each decoded from PREROLL_SECONDS earlier (at whole seconds a time
    is an exact sample index), joined to exactly the file's `decode_all`."""
    rate = int(reader.sample_rate)
    start = 0
    while True:
        begin = max(0, start - PREROLL_SECONDS)
        data = _guarded(path, reader.decode, float(begin), float(start + seconds - begin))
        data = np.ascontiguousarray(np.asarray(data, dtype=np.float32)[:, (start - begin) * rate :])
        if data.shape[1]:
            yield data
        if data.shape[1] < seconds * rate:
            return
        start += seconds


def _sphn_whole(path: Path, reader: tp.Any, frames: int) -> tp.Iterator[np.ndarray]:
    pcm = np.asarray(_guarded(path, reader.decode_all), dtype=np.float32)
    for begin in range(0, pcm.shape[1], frames):
        yield np.ascontiguousarray(pcm[:, begin : begin + frames])


# -- resampling --------------------------------------------------------------------------------------


class _To24k:
    """[C, T] blocks at `rate` to [C, T'] blocks at 24 kHz, exactly `round(n * 24000 / rate)`
    samples in all (see the module docstring)."""

    def __init__(self, rate: int, channels: int):
        self.rate, self.channels = rate, channels
        self.inputs = 0
        self.emitted = 0
        self._held = np.zeros((channels, 0), dtype=np.float32)
        self._stream = None
        if rate != SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, channels, dtype="float32", quality="HQ")

    def _run(self, block: np.ndarray, last: bool) -> np.ndarray:
        assert self._stream is not None
        if self.channels == 1:
            return self._stream.resample_chunk(block[0], last=last)[None]
        return np.ascontiguousarray(self._stream.resample_chunk(np.ascontiguousarray(block.T), last=last).T)

    def push(self, block: np.ndarray) -> np.ndarray:
        self.inputs += block.shape[1]
        if self._stream is None:
            self.emitted += block.shape[1]
            return block
        out = self._run(block, last=False)
        if self._held.shape[1]:
            out = np.concatenate([self._held, out], axis=1)
        room = max(0, round(self.inputs * SAMPLE_RATE / self.rate) - self.emitted)
        out, self._held = out[:, :room], out[:, room:]
        self.emitted += out.shape[1]
        return out

    def finish(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros((self.channels, 0), dtype=np.float32)
        tail = self._run(np.zeros((self.channels, 0), dtype=np.float32), last=True)
        out = np.concatenate([self._held, tail], axis=1)
        need = round(self.inputs * SAMPLE_RATE / self.rate) - self.emitted
        out = out[:, :need] if out.shape[1] >= need else np.pad(out, ((0, 0), (0, need - out.shape[1])))
        self._held = out[:, :0]
        self.emitted += out.shape[1]
        return np.ascontiguousarray(out, dtype=np.float32)


# -- the reader --------------------------------------------------------------------------------------


class _ChannelSums:
    """Running sums for `audio.channels_differ`: per channel k > 0, the energy of channel 0, of
    channel k and of their difference (float64, as `audio._rms`)."""

    def __init__(self, channels: int):
        self.n = 0
        self.sums = np.zeros((max(channels - 1, 0), 3), dtype=np.float64)

    def add(self, block: np.ndarray) -> None:
        first = block[0]
        e0 = float(np.sum(np.square(first, dtype=np.float64)))
        for k, other in enumerate(block[1:]):
            self.sums[k] += (
                e0,
                float(np.sum(np.square(other, dtype=np.float64))),
                float(np.sum(np.square(first - other, dtype=np.float64))),
            )
        self.n += block.shape[1]

    def differ(self) -> bool:
        if not self.n:
            return False
        for e0, ek, ed in self.sums:
            loudest = max(math.sqrt(e0 / self.n), math.sqrt(ek / self.n))
            if loudest > SILENCE_RMS and math.sqrt(ed / self.n) >= CHANNELS_DIFFER * loudest:
                return True
        return False


class RecordingReader:
    """One recording at 24 kHz float32, read in blocks; see the module docstring.

    `channel`: an index, "left", "right" or "mix" (see `audio.parse_channel`; None: channel 0,
    with a warning at end of file when the channels differ strongly, as `audio.pick_channel`);
    `all_channels=True` yields every channel
    ([C, T] blocks) instead. Opening reads and checks the header (`AudioError`); reading may
    raise `AudioError` (a decode error, NaN/Inf samples) or, before anything is yielded,
    `AudioTooShortError` (less than one 80 ms frame). Read once; close it (or use `with`).
    """

    def __init__(
        self,
        path: str | Path,
        channel: int | str | None = None,
        *,
        all_channels: bool = False,
        block_seconds: float = BLOCK_SECONDS,
    ):
        if all_channels and channel is not None:
            raise ValueError("all_channels reads every channel: pass no channel")
        if not block_seconds > 0:
            raise ValueError(f"block_seconds must be positive, got {block_seconds}")
        self.path = Path(path)
        self.channel = channel = parse_channel(channel)
        self.all_channels = all_channels
        self.header = read_header(self.path)
        self.warnings: list[str] = []  # complete once the stream is exhausted
        self.samples = 0  # 24 kHz samples yielded so far (per channel)
        count = self.header.channels
        if channel is not None and channel != MIX:
            index = int(channel)
            if index >= count:
                raise AudioError(
                    f"has {count} channel{'s' if count != 1 else ''}; --channel {channel} needs at least {index + 1}",
                    self.path,
                )
        self._sums = _ChannelSums(count) if channel is None and not all_channels and count > 1 else None
        rate = self.header.sample_rate
        self._block_frames = max(1, min(int(block_seconds * rate), MAX_BLOCK_SAMPLES // count))
        self._window_seconds = max(1, min(int(round(block_seconds)), MAX_BLOCK_SAMPLES // (rate * count)))
        self._handle: tp.Any = None
        self._sphn: tp.Any = None
        self._started = False
        try:
            if self.header.decoder == SOUNDFILE:
                import soundfile

                self._handle = _guarded(self.path, soundfile.SoundFile, str(self.path))
                opened = (self._handle.samplerate, self._handle.channels)
            else:
                self._sphn = _open_sphn(self.path)
                opened = (int(self._sphn.sample_rate), int(self._sphn.channels))
            if opened != (rate, count):  # replaced since its header was read
                raise AudioError("changed while it was opened", self.path)
        except BaseException:
            self.close()
            raise

    @property
    def channels(self) -> int:
        """Channels in each yielded block: the file's with `all_channels`, else 1."""
        return self.header.channels if self.all_channels else 1

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        handle, self._handle, self._sphn = self._handle, None, None
        if handle is not None:
            handle.close()

    def _native(self) -> tp.Iterator[np.ndarray]:
        if self._handle is not None:
            return _soundfile_blocks(self.path, self._handle, self._block_frames)
        if self.header.decoder == SPHN_WINDOWS:
            return _sphn_windows(self.path, self._sphn, self._window_seconds)
        return _sphn_whole(self.path, self._sphn, self._block_frames)

    def _pick(self, block: np.ndarray) -> np.ndarray:
        if self.all_channels:
            return block
        if self.channel == MIX:
            return block.mean(axis=0, dtype=np.float32)[None]  # as pick_channel, per sample
        return block[0 if self.channel is None else int(self.channel)][None]

    def _blocks(self) -> tp.Iterator[np.ndarray]:
        """[C, T] 24 kHz blocks (C = `self.channels`), checked, before the first-frame gate."""
        if self._started:
            raise RuntimeError("a RecordingReader is read once")
        self._started = True
        if self._handle is None and self._sphn is None:
            raise RuntimeError("the RecordingReader is closed")
        resampler = _To24k(self.header.sample_rate, self.channels)
        try:
            for block in self._native():
                if block.shape[0] != self.header.channels:
                    raise AudioError("changed while it was read", self.path)
                picked = self._pick(block)
                if not np.isfinite(picked).all():
                    raise AudioError("audio holds NaN or infinite samples", self.path)
                if self._sums is not None:
                    self._sums.add(block)
                out = resampler.push(picked)
                if out.shape[1]:
                    yield out
            out = resampler.finish()
            if out.shape[1]:
                yield out
        finally:
            self.close()
        if self._sums is not None and self._sums.differ():
            self.warnings.append(
                f"its {self.header.channels} channels differ strongly and channel 0 was taken by "
                "default; choose with --channel N|left|right|mix"
            )

    def blocks(self) -> tp.Iterator[np.ndarray]:
        """The recording at 24 kHz float32 in blocks of about `block_seconds`: [T] (one channel)
        or [C, T] (`all_channels`). Nothing is yielded before a full frame is there: a recording
        shorter than one frame raises `AudioTooShortError` instead."""
        gate: list[np.ndarray] = []
        buffered = 0
        for block in self._blocks():
            if gate is not None:
                gate.append(block)
                buffered += block.shape[1]
                if buffered < FRAME_SIZE:
                    continue
                block = gate[0] if len(gate) == 1 else np.concatenate(gate, axis=1)
                gate = None  # type: ignore[assignment]
            self.samples += block.shape[1]
            yield block if self.all_channels else block[0]
        if gate is not None:
            raise AudioTooShortError(f"shorter than one 80 ms frame ({buffered} samples at 24 kHz)", self.path)

    def frames(self, frame_size: int = FRAME_SIZE) -> tp.Iterator[np.ndarray]:
        """Full frames of `frame_size` samples ([frame_size], or [C, frame_size] with
        `all_channels`); a trailing partial frame is dropped, as `runner.split_frames`."""
        carry: np.ndarray | None = None
        for block in self.blocks():
            if carry is not None and carry.shape[-1]:
                block = np.concatenate([carry, block], axis=-1)
            whole = block.shape[-1] - block.shape[-1] % frame_size
            for begin in range(0, whole, frame_size):
                yield block[..., begin : begin + frame_size]
            carry = block[..., whole:]

    def read_all(self) -> np.ndarray:
        """The whole recording at once ([T], or [C, T] with `all_channels`)."""
        parts = list(self.blocks())
        return np.concatenate(parts, axis=-1)


def _measure() -> None:  # pragma: no cover - the figures in the module docstring
    import soxr

    from .audio import resample

    for rate in (16_000, 44_100):
        n = rate * 60
        t = np.arange(n) / rate
        x = (
            0.4 * np.sin(2 * np.pi * 300 * t * (1 + 0.3 * (t % 5))) + np.random.default_rng(0).normal(0, 0.02, n)
        ).astype(np.float32)
        length = round(n * SAMPLE_RATE / rate)
        whole = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")[:length]
        for block in (int(rate * BLOCK_SECONDS), 1000):
            stage = _To24k(rate, 1)
            parts = [stage.push(x[None, i : i + block]) for i in range(0, n, block)] + [stage.finish()]
            streamed = np.concatenate(parts, axis=1)[0]
            print(
                f"{rate} Hz, blocks of {block}: streamed {len(streamed)} samples (want {length}), max |streamed - "
                f"whole soxr| = {np.abs(streamed - whole).max():.3g}"
            )
        old = resample(x, rate)
        diff = streamed - old
        print(
            f"{rate} Hz: vs sphn (audio.resample, {len(old)} samples): max abs {np.abs(diff).max():.3g}, "
            f"rms {np.sqrt(np.mean(diff.astype(np.float64) ** 2)):.3g} (signal rms "
            f"{np.sqrt(np.mean(old.astype(np.float64) ** 2)):.3g})"
        )
        for freq in (300.0, 3000.0):  # against the exact tone at 24 kHz, away from the ends
            tone = (0.4 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)
            exact = 0.4 * np.sin(2 * np.pi * freq * np.arange(length) / SAMPLE_RATE)
            stage = _To24k(rate, 1)
            ours = np.concatenate([stage.push(tone[None]), stage.finish()], axis=1)[0]
            inner = slice(SAMPLE_RATE, length - SAMPLE_RATE)
            print(
                f"{rate} Hz, {freq:.0f} Hz tone at 0.4: max error soxr stream {np.abs(ours - exact)[inner].max():.2g}, "
                f"sphn {np.abs(resample(tone, rate) - exact)[inner].max():.2g}"
            )


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:] == ["--measure"]:
        _measure()
