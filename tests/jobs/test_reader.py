"""The block reader (moshi_ttt/jobs/reader.py): header checks before allocation, blocks equal to
the whole-file path, streamed resampling, channel choice, flat memory, and a header fuzz."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import sphn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import sweep
from moshi_ttt.errors import AudioError, AudioTooShortError
from moshi_ttt.jobs.audio import pick_channel, read_recording
from moshi_ttt.jobs.files import FRAME_SIZE, SAMPLE_RATE
from moshi_ttt.jobs.reader import (
    MAX_SAMPLE_RATE,
    SOUNDFILE,
    SPHN_WINDOWS,
    RecordingReader,
    _guarded,
    probe_duration,
    read_header,
)
from moshi_ttt.streaming.reference import split_frames

ROOT = Path(__file__).resolve().parents[2]


def wav_bytes(
    rate: int = SAMPLE_RATE,
    channels: int = 1,
    bits: int = 16,
    frames: int = 4800,
    data_len: int | None = None,
    block_align: int | None = None,
    tag: int = 1,
    seed: int = 0,
) -> bytes:
    """A WAV file written field by field, so any header field can hold any value."""
    width = max(bits // 8, 1)
    samples = np.random.default_rng(seed).integers(-20000, 20000, frames * max(channels, 1))
    data = samples.astype("<i2").tobytes() if width == 2 else bytes(frames * max(channels, 1) * width)
    align = channels * width if block_align is None else block_align
    fmt = struct.pack(
        "<HHIIHH", tag, channels & 0xFFFF, rate & 0xFFFFFFFF, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits & 0xFFFF
    )
    size = len(data) if data_len is None else data_len
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size & 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_wav(path: Path, **kwargs: object) -> Path:
    path.write_bytes(wav_bytes(**kwargs))  # type: ignore[arg-type]
    return path


def stereo(rate: int, seconds: float) -> np.ndarray:
    """Two different speakers, [T, 2]."""
    return np.stack([sweep(rate, seconds, 300, seed=1), sweep(rate, seconds, 520, amp=0.3, seed=2)], axis=1)


def read(path: Path, **kwargs: object) -> np.ndarray:
    with RecordingReader(path, **kwargs) as reader:  # type: ignore[arg-type]
        return reader.read_all()


def assert_one_line_naming(exc: BaseException, path: Path) -> None:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text


# -- header checks -------------------------------------------------------------------------------------


def test_rate_zero_wav_is_one_line_error_not_a_decoder_panic(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "rate0.wav", rate=0)
    # What sphn's decoder does with this header: a Rust panic, which is no Exception.
    with pytest.raises(BaseException) as panic:
        sphn.read(str(path))
    assert not isinstance(panic.value, Exception) and type(panic.value).__name__ == "PanicException"
    with pytest.raises(AudioError, match="sample rate of 0 Hz") as caught:
        RecordingReader(path)
    assert_one_line_naming(caught.value, path)
    assert probe_duration(path) is None


def test_decoder_panic_becomes_audio_error(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "rate0.wav", rate=0)
    with pytest.raises(AudioError) as caught:
        _guarded(path, sphn.FileReader, str(path))
    assert_one_line_naming(caught.value, path)
    assert "decoder failed" in str(caught.value)


def run_limited(code: str, limit_mb: int) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose address space is capped at `limit_mb` (RLIMIT_AS)."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit_mb} << 20, {limit_mb} << 20))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_huge_rate_is_refused_before_any_allocation(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "fast.wav", rate=2**31 - 1)
    code = f"""
        import sys
        from moshi_ttt.errors import AudioError
        from moshi_ttt.{{module}} import {{fn}}
        try:
            {{fn}}({str(path)!r})
        except AudioError as exc:
            print("refused:", exc)
        except MemoryError as exc:
            print("memory:", type(exc).__name__)
    """
    # The limit bites: the whole-file path resamples 1 s to 2^31-1 Hz... and dies there.
    old = run_limited(code.format(module="jobs.audio", fn="read_recording"), 1500)
    assert "memory: " in old.stdout, old.stdout + old.stderr
    new = run_limited(code.format(module="jobs.reader", fn="RecordingReader"), 1500)
    assert new.returncode == 0, new.stderr
    assert new.stdout.splitlines() == [
        f"refused: {path}: header declares a sample rate of {2**31 - 1} Hz, above "
        f"the {MAX_SAMPLE_RATE} Hz any recording uses"
    ]
    assert "Traceback" not in new.stderr


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(rate=1000), "below the 4000 Hz minimum"),
        (dict(rate=MAX_SAMPLE_RATE + 1), "above the 384000 Hz"),
        (dict(channels=0), "declares 0 channels"),
        (dict(channels=65, frames=100), "declares 65 channels"),
        (dict(channels=0xFFFF, frames=1), "declares 65535 channels"),
        (dict(block_align=0), "block size of 0"),
        (dict(bits=0), "0 bits per sample"),
        (dict(bits=4096), "4096 bits per sample"),
    ],
)
def test_absurd_wav_headers_are_refused(tmp_path: Path, fields: dict, reason: str) -> None:
    path = write_wav(tmp_path / "bad.wav", **fields)
    with pytest.raises(AudioError, match=reason) as caught:
        RecordingReader(path)
    assert_one_line_naming(caught.value, path)


def test_absurd_declared_length_is_refused(tmp_path: Path) -> None:
    """A FLAC header may declare up to 2^36 samples whatever the file holds."""
    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    data[21] |= 0x0F  # STREAMINFO's 36-bit total sample count, all ones
    data[22:26] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="hours of audio") as caught:
        RecordingReader(path)
    assert_one_line_naming(caught.value, path)


def test_wav_declaring_more_data_than_it_holds_reads_what_it_holds(tmp_path: Path) -> None:
    for name, data_len in [("trunc", 1 << 20), ("streamed", 0xFFFFFFFF), ("huge", 0x7FFFFFFF)]:
        path = write_wav(tmp_path / f"{name}.wav", frames=4800, data_len=data_len)
        assert read_header(path).frames == 4800
        assert probe_duration(path) == pytest.approx(0.2)
        assert np.array_equal(read(path), read_recording(path).pcm)


# -- blocks equal the whole-file path ----------------------------------------------------------------


@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_24"), ("wav", "PCM_U8")])
def test_24k_blocks_equal_whole_file_read_bit_for_bit(tmp_path: Path, ext: str, subtype: str) -> None:
    path = tmp_path / f"talk.{ext}"
    sf.write(path, stereo(SAMPLE_RATE, 3.1), SAMPLE_RATE, subtype=subtype)
    for channel in (None, 0, 1, "mix"):
        with RecordingReader(path, channel, block_seconds=0.3) as reader:
            blocks = list(reader.blocks())
            assert reader.header.decoder == SOUNDFILE
        assert len(blocks) > 5
        whole = read_recording(path, channel).pcm
        streamed = np.concatenate(blocks)
        assert streamed.dtype == np.float32 and streamed.tobytes() == whole.tobytes()


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_resampled_stream_equals_whole_file_soxr_with_exact_length(tmp_path: Path, rate: int) -> None:
    n = rate * 5 + 7  # odd: soxr alone gives a sample more than round(n * 24000 / rate) at 16 kHz
    path = tmp_path / "talk.wav"
    signal = sweep(rate, 5)[:n]
    signal = np.concatenate([signal, signal[: n - len(signal)]])
    sf.write(path, signal, rate, subtype="FLOAT")
    pcm = sf.read(path, dtype="float32")[0]
    length = round(n * SAMPLE_RATE / rate)
    whole = soxr.resample(pcm, rate, SAMPLE_RATE, quality="HQ")[:length]
    for seconds in (4.0, 0.37, 0.01):
        streamed = read(path, block_seconds=seconds)
        assert len(streamed) == length
        assert np.abs(streamed - whole).max() <= 1e-6
    # Near the old sphn path (its filter differs, and at 44.1 kHz it lags by a fraction of a
    # sample: see the module docstring), of the same length.
    old = read_recording(path).pcm
    assert len(old) == length and np.sqrt(np.mean((old - streamed) ** 2)) < 0.1 * np.sqrt(np.mean(old**2))


def test_resampler_pads_to_the_exact_length(tmp_path: Path) -> None:
    for rate, n in [(16_000, 1281), (44_100, 3529), (8_000, 641), (48_000, 3841), (22_050, 1767)]:
        path = tmp_path / f"{rate}.wav"
        sf.write(path, np.full(n, 0.1, np.float32), rate, subtype="FLOAT")
        assert len(read(path)) == round(n * SAMPLE_RATE / rate) == len(read_recording(path).pcm)


# -- channels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44_100])
def test_channel_choice_equals_pick_channel(tmp_path: Path, rate: int) -> None:
    from moshi_ttt.jobs.files import parse_channel

    pcm = np.concatenate([stereo(rate, 2.0), 0.3 * stereo(rate, 2.0)[:, ::-1]], axis=1)  # 4 channels
    path = tmp_path / "dialogue.wav"
    sf.write(path, pcm, rate, subtype="FLOAT")
    whole = sf.read(path, dtype="float32", always_2d=True)[0].T.copy()
    if rate == SAMPLE_RATE:  # moshi-finetune's dialogues: Moshi on the left, the user on the right
        assert np.array_equal(read(path, channel="left"), whole[0])
        assert np.array_equal(read(path, channel="right"), whole[1])
    for text in ("0", "1", "3", "left", "right", "mix"):
        channel = parse_channel(text)
        picked = pick_channel(whole, channel, path).pcm
        expect = (
            picked
            if rate == SAMPLE_RATE
            else soxr.resample(picked, rate, SAMPLE_RATE, quality="HQ")[: round(len(picked) * SAMPLE_RATE / rate)]
        )
        got = read(path, channel=text, block_seconds=0.5)  # the reader parses --channel itself
        assert len(got) == len(expect)
        assert np.abs(got - expect).max() <= (0 if rate == SAMPLE_RATE else 1e-6), text
    # All channels at once, for `score`: each channel as if picked alone.
    every = read(path, all_channels=True, block_seconds=0.5)
    assert every.shape[0] == 4
    assert np.abs(every[1] - read(path, channel=1)).max() <= 1e-6


def test_channels_differ_warning_at_end_as_pick_channel(tmp_path: Path) -> None:
    differ, same = tmp_path / "differ.wav", tmp_path / "same.wav"
    pcm = stereo(SAMPLE_RATE, 2.0)
    pcm[: SAMPLE_RATE // 4, 1] = pcm[: SAMPLE_RATE // 4, 0]  # the same for the first block only
    sf.write(differ, pcm, SAMPLE_RATE)
    sf.write(same, np.stack([pcm[:, 0], pcm[:, 0] * 0.9], axis=1), SAMPLE_RATE)
    for path, warned in [(differ, True), (same, False)]:
        with RecordingReader(path, block_seconds=0.25) as reader:
            blocks = reader.blocks()
            next(blocks)
            assert reader.warnings == []  # decided on the whole file, at its end
            list(blocks)
        assert reader.warnings == read_recording(path).warnings
        assert bool(reader.warnings) == warned
        assert read_recording(path, 0).warnings == [] and RecordingReader(path, 0).warnings == []


def test_missing_channel_is_refused_at_open(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "mono.wav")
    with pytest.raises(AudioError, match="--channel 1 needs at least 2"):
        RecordingReader(path, 1)


# -- frames, lengths, bad samples ----------------------------------------------------------------------


def test_frames_equal_split_frames(tmp_path: Path) -> None:
    path = tmp_path / "talk.wav"
    sf.write(path, sweep(SAMPLE_RATE, 1.01), SAMPLE_RATE)
    expect = split_frames(read_recording(path).pcm, FRAME_SIZE)
    with RecordingReader(path, block_seconds=0.13) as reader:
        frames = list(reader.frames())
    assert len(frames) == len(expect) == 12
    assert all(a.shape == (FRAME_SIZE,) and np.array_equal(a, b) for a, b in zip(frames, expect))
    with RecordingReader(path, all_channels=True, block_seconds=0.13) as reader:
        assert [f.shape for f in reader.frames()] == [(1, FRAME_SIZE)] * 12


def test_shorter_than_a_frame_is_skipped_before_anything_is_yielded(tmp_path: Path) -> None:
    short = write_wav(tmp_path / "short.wav", frames=FRAME_SIZE - 1)
    with pytest.raises(AudioTooShortError):
        next(RecordingReader(short, block_seconds=0.01).blocks())
    exact = write_wav(tmp_path / "exact.wav", frames=FRAME_SIZE)
    assert len(list(RecordingReader(exact, block_seconds=0.01).frames())) == 1


def test_nan_samples_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    pcm = sweep(SAMPLE_RATE, 1.0).astype(np.float32)
    pcm[20000] = np.nan
    sf.write(path, pcm, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read(path)


# -- formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, seconds", [(SAMPLE_RATE, 9.3), (44_100, 6.0), (16_000, 2.5)])
def test_mp3_windows_join_to_sphns_whole_file_decode(tmp_path: Path, rate: int, seconds: float) -> None:
    path = tmp_path / "talk.mp3"
    sf.write(path, stereo(rate, seconds) * 0.5, rate, format="MP3")
    whole = np.asarray(sphn.read(str(path))[0])
    with RecordingReader(path, all_channels=True, block_seconds=2) as reader:
        assert reader.header.decoder == SPHN_WINDOWS
        if rate == SAMPLE_RATE:
            assert reader.read_all().tobytes() == whole.tobytes()
        else:  # decoding is exact, then resampled per channel
            expect = soxr.resample(whole.T.copy(), rate, SAMPLE_RATE, quality="HQ").T
            got = reader.read_all()
            assert got.shape[1] == round(whole.shape[1] * SAMPLE_RATE / rate)
            assert np.abs(got - expect[:, : got.shape[1]]).max() <= 1e-6
    if rate == SAMPLE_RATE:
        assert read(path, block_seconds=3).tobytes() == read_recording(path).pcm.tobytes()


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_ogg_is_read_in_blocks_by_libsndfile(tmp_path: Path, subtype: str) -> None:
    path = tmp_path / "talk.ogg"
    rate = 48_000 if subtype == "OPUS" else SAMPLE_RATE
    sf.write(path, stereo(rate, 3.0), rate, format="OGG", subtype=subtype)
    header = read_header(path)
    assert header.decoder == SOUNDFILE and probe_duration(path) == pytest.approx(3.0, abs=0.05)
    whole = sf.read(path, dtype="float32", always_2d=True)[0].T
    got = read(path, channel=1, block_seconds=0.5)
    if rate == SAMPLE_RATE:
        assert got.tobytes() == whole[1].tobytes()
    else:
        assert np.abs(got - soxr.resample(whole[1], rate, SAMPLE_RATE, quality="HQ")[: len(got)]).max() <= 1e-6


def test_probe_duration_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "talk.flac"
    sf.write(path, sweep(16_000, 2.5), 16_000)
    assert probe_duration(path) == 2.5
    assert read_header(path).samples_24k == 60_000
    assert probe_duration(tmp_path / "missing.wav") is None
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    assert probe_duration(tmp_path / "junk.wav") is None


# -- memory ----------------------------------------------------------------------------------------


def write_long_wav(path: Path, rate: int, channels: int, seconds: int) -> Path:
    """`seconds` of 16-bit noise, written one second at a time (fast, and flat itself)."""
    second = np.random.default_rng(0).integers(-8000, 8000, rate * channels).astype("<i2").tobytes()
    with open(path, "wb") as f:
        head = wav_bytes(rate=rate, channels=channels, frames=0, data_len=len(second) * seconds)
        f.write(head[:4] + struct.pack("<I", len(head) - 8 + len(second) * seconds) + head[8:])
        for _ in range(seconds):
            f.write(second)
    return path


def peak_rss_mb(path: Path, channel: str) -> float:
    # VmHWM, the peak RSS of this process image (ru_maxrss would count the parent's, from fork).
    code = f"""
        import re
        from moshi_ttt.jobs.reader import RecordingReader
        with RecordingReader({str(path)!r}, {channel}) as reader:
            n = sum(len(frame) for frame in reader.frames())
        print(n, re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    frames, kib = done.stdout.split()
    assert int(frames) > 0
    return int(kib) / 1024


@pytest.mark.parametrize("rate, channels, channel", [(SAMPLE_RATE, 2, "'mix'"), (16_000, 1, "None")])
def test_memory_stays_flat_with_length(tmp_path: Path, rate: int, channels: int, channel: str) -> None:
    short = write_long_wav(tmp_path / "short.wav", rate, channels, 60)
    long = write_long_wav(tmp_path / "long.wav", rate, channels, 600)
    growth = peak_rss_mb(long, channel) - peak_rss_mb(short, channel)
    # The whole-file path peaks ~130 MB higher for 10 minutes of 24 kHz stereo (see the module docstring).
    assert growth < 20, f"peak RSS grew by {growth:.1f} MB from 1 to 10 minutes"


def test_block_memory_is_bounded_by_block_size(tmp_path: Path) -> None:
    path = write_long_wav(tmp_path / "talk.wav", SAMPLE_RATE, 2, 30)
    tracemalloc.start()
    try:
        with RecordingReader(path, "mix", block_seconds=1.0) as reader:
            for _ in reader.frames():
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # a block is 1 s of stereo float32 (192 kB) and its copies


# -- fuzz ----------------------------------------------------------------------------------------------

_FIELDS = {  # offset, struct format of the header fields a mutation may set
    "riff_size": (4, "<I"),
    "tag": (20, "<H"),
    "channels": (22, "<H"),
    "rate": (24, "<I"),
    "byte_rate": (28, "<I"),
    "block_align": (32, "<H"),
    "bits": (34, "<H"),
    "data_len": (40, "<I"),
}
_INTERESTING = [
    0,
    1,
    2,
    3,
    8,
    16,
    24,
    32,
    64,
    65,
    255,
    4000,
    3999,
    24000,
    44100,
    MAX_SAMPLE_RATE,
    MAX_SAMPLE_RATE + 1,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    2**31 - 1,
    2**31,
    2**32 - 1,
]
_BASE = wav_bytes(rate=16_000, channels=2, frames=6000)


def mutate(mutations: list[tuple[str, int]], pokes: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(_BASE)
    for name, value in mutations:
        offset, fmt = _FIELDS[name]
        struct.pack_into(fmt, data, offset, value & (2 ** (8 * struct.calcsize(fmt)) - 1))
    for offset, value in pokes:  # a few bytes of the header anything at all
        data[offset] = value
    return bytes(data if cut is None else data[:cut])


@settings(max_examples=100, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(sorted(_FIELDS)),
            st.one_of(st.sampled_from(_INTERESTING), st.sampled_from(_INTERESTING), st.integers(0, 2**32 - 1)),
        ),
        min_size=1,
        max_size=3,
    ),
    pokes=st.lists(st.tuples(st.integers(0, 43), st.integers(0, 255)), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, len(_BASE))),
)
@example(mutations=[("rate", 0)], pokes=[], cut=None)  # the headers that once panicked or blew up
@example(mutations=[("rate", 2**31 - 1)], pokes=[], cut=None)
@example(mutations=[("channels", 0)], pokes=[], cut=None)
@example(mutations=[("bits", 0), ("block_align", 0)], pokes=[], cut=None)
@example(mutations=[("data_len", 2**32 - 1)], pokes=[], cut=100)
def test_fuzzed_wav_headers_give_audio_or_one_line_audio_error(
    tmp_path: Path, mutations: list, pokes: list, cut: int | None
) -> None:
    """Header fields set to anything (rate, channels, bits, sizes...), bytes poked, files cut."""
    path = tmp_path / "fuzz.wav"
    path.write_bytes(mutate(mutations, pokes, cut))
    tracemalloc.start()
    try:
        try:
            with RecordingReader(path, all_channels=True, block_seconds=0.5) as reader:
                pcm = reader.read_all()
            assert pcm.dtype == np.float32 and pcm.shape[0] == reader.header.channels
            assert pcm.shape[1] == reader.header.samples_24k
        except AudioError as exc:
            assert_one_line_naming(exc, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
