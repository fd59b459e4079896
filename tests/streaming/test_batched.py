"""Several recordings at once: B slots through one model, each file's tokens, audio and
TTT numbers as the single-file runner gives them, whatever runs beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import partials
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.checkpoints.tiny import write_sample_recordings
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.audio import read_audio, to_pcm16
from moshi_ttt.options import RunOptions, Sampling
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt.run import run_batch
from moshi_ttt.streaming.batched import BatchedRunner
from moshi_ttt.streaming.reference import StreamingRunner


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, np.ndarray]:
    """Five lengths: one chunk or more, one shorter than a TTT chunk (7 steps < 8), one shorter
    than a frame (nothing to stream)."""
    paths = write_sample_recordings(tmp_path_factory.mktemp("batched"), seed=3, durations=(1.6, 2.4, 3.0, 0.5, 1.0))
    pcms = {path.name: read_audio(path) for path in paths}
    pcms["short.wav"] = pcms[paths[0].name][:1000]
    return pcms


@pytest.fixture(scope="module", params=["inplace", "ttt-mlp"])
def model(request, tiny_inplace, tiny_ttt_mlp):
    paths = tiny_inplace if request.param == "inplace" else tiny_ttt_mlp
    return load_model(str(paths.base), str(paths.finetune))


def alone(model, pcms: dict[str, np.ndarray], greedy: bool = False) -> dict:
    runner = StreamingRunner(model)
    runner.lm_gen.use_sampling = not greedy
    return {name: runner.run(pcm) for name, pcm in pcms.items()}


def batched(
    model, pcms: dict[str, np.ndarray], batch_size: int, greedy: bool = False, counter_noise: bool = False
) -> dict:
    runner = BatchedRunner(model, batch_size, counter_noise=counter_noise)
    runner.lm_gen.use_sampling = not greedy
    results = dict(runner.run(pcms.items()))
    assert sorted(results) == sorted(pcms)
    return results


def test_one_slot_is_the_single_file_runner_bit_for_bit(model, files) -> None:
    """Sampled (not greedy): the per-stream generator draws what moshi's global one draws."""
    expected, got = alone(model, files), batched(model, files, 1)
    for name in files:
        assert got[name].text_tokens == expected[name].text_tokens, name
        assert got[name].text_steps == expected[name].text_steps, name  # timed transcripts line up
        assert got[name].pcm.tobytes() == expected[name].pcm.tobytes(), name
        assert (got[name].frames, got[name].steps) == (expected[name].frames, expected[name].steps)
        assert got[name].ttt_layers == expected[name].ttt_layers, name


def test_three_slots_give_every_file_its_single_file_result(model, files) -> None:
    """At B=3 the LM's matmuls run with 3 rows, which BLAS sums in another order than 1 row: the
    activations differ by ~1e-7. On this random tiny model that is enough to flip near-tie argmax
    picks of audio codes late in a file (and, sampled, one text token in one file), so text tokens
    are compared greedy and the TTT numbers to rounding; exact equality holds at a fixed batch
    size whatever the neighbours (next test)."""
    expected, got = alone(model, files, greedy=True), batched(model, files, 3, greedy=True)
    assert got["short.wav"].frames == 0 and got["short.wav"].text_tokens == []
    for name in files:
        want, have = expected[name], got[name]
        assert have.text_tokens == want.text_tokens, name
        assert len(have.pcm) == len(want.pcm), name
        assert (have.frames, have.steps) == (want.frames, want.steps), name
        for mine, theirs in zip(have.ttt_layers, want.ttt_layers, strict=True):
            assert (mine.tokens, mine.updates, mine.clipped_updates, mine.pending_tokens) == (
                theirs.tokens,
                theirs.updates,
                theirs.clipped_updates,
                theirs.pending_tokens,
            )
            assert mine.drift == pytest.approx(theirs.drift, rel=1e-2)
    assert len({tuple(r.text_tokens) for r in got.values() if r.text_tokens}) > 1  # files differ


@pytest.mark.parametrize("counter_noise", [False, True])
def test_a_file_does_not_depend_on_its_neighbours(model, files, counter_noise: bool) -> None:
    """Same batch size, other files beside it, another slot, sampled (with torch generators, and
    with the graph-safe counter noise used on GPU): the same tokens and audio bit for bit; the
    TTT numbers to rounding (streams whose chunks fill at the same step commit in one batched
    update, summed in another order)."""
    names = sorted(files)
    target = names[1]
    first = batched(model, {n: files[n] for n in (target, names[0], names[2])}, 3, counter_noise=counter_noise)[target]
    second = batched(
        model, {n: files[n] for n in (names[3], names[4], target, names[0])}, 3, counter_noise=counter_noise
    )[target]
    assert first.text_tokens == second.text_tokens
    assert first.pcm.tobytes() == second.pcm.tobytes()
    for mine, theirs in zip(first.ttt_layers, second.ttt_layers, strict=True):
        assert (mine.tokens, mine.updates, mine.clipped_updates) == (
            theirs.tokens,
            theirs.updates,
            theirs.clipped_updates,
        )
        assert mine.drift == pytest.approx(theirs.drift, rel=1e-6)


# -- whole runs: reports, failures and outputs at B=3 as at B=1 ------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five inputs of different lengths: three of one chunk or more, one of 6 steps (shorter than
    a TTT chunk of 8), and one that fails to decode."""
    src = tmp_path_factory.mktemp("batched_run")
    write_sample_recordings(src, seed=5, durations=(1.6, 2.4, 3.0, 0.4))
    (src / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    return src


def run_folder(paths, folder: Path, out: Path, batch_size: int, events=None) -> dict:
    options = RunOptions(
        base=str(paths.base),
        checkpoint=str(paths.finetune),
        batch_size=batch_size,
        sampling=Sampling(greedy=True),
        text=True,
    )
    outcome = run_batch(folder, out, options, events)
    assert outcome.exit_code == 1  # the broken file
    return json.loads((out / REPORT_NAME).read_text())


@pytest.mark.parametrize("family", ["inplace", "ttt-mlp"])
def test_a_folder_at_three_slots_reports_and_writes_what_one_slot_does(
    family, tiny_inplace, tiny_ttt_mlp, folder, tmp_path
) -> None:
    """Greedy, for the reason given in the runner test above: tokens equal, audio within one
    16-bit step, TTT counts equal and drift to rounding; failures and order exactly as at B=1."""
    paths = tiny_inplace if family == "inplace" else tiny_ttt_mlp
    one = run_folder(paths, folder, tmp_path / "one", 1)
    three = run_folder(paths, folder, tmp_path / "three", 3)
    assert (one["settings"]["batch_size"], three["settings"]["batch_size"]) == (1, 3)
    assert [f["input"] for f in three["files"]] == [f["input"] for f in one["files"]]  # plan order
    statuses = {Path(f["input"]).name: f["status"] for f in three["files"]}
    assert statuses == {"broken.wav": "failed", **{n: "ok" for n in statuses if n != "broken.wav"}}
    short = next(f for f in three["files"] if f["frames"] == 5)  # 0.4 s: 5 frames, 6 steps < chunk 8
    assert all(layer["updates"] == 1 and layer["pending_tokens"] == 0 for layer in short["ttt"]["layers"])
    for mine, theirs in zip(three["files"], one["files"]):
        assert (mine["status"], mine["reason"], mine["frames"], mine["steps"], mine["transcript"]) == (
            theirs["status"],
            theirs["reason"],
            theirs["frames"],
            theirs["steps"],
            theirs["transcript"],
        )
        if mine["status"] != "ok":
            assert mine["output"] is None
            continue
        a, _ = sf.read(mine["output"], dtype="int16")
        b, _ = sf.read(theirs["output"], dtype="int16")
        assert len(a) == len(b) and np.abs(a.astype(int) - b.astype(int)).max() <= 1, mine["input"]
        assert (
            Path(mine["output"]).with_suffix(".txt").read_text()
            == Path(theirs["output"]).with_suffix(".txt").read_text()
        )
        for x, y in zip(mine["ttt"]["layers"], theirs["ttt"]["layers"], strict=True):
            counts = ("layer", "tokens", "updates", "clipped_updates", "pending_tokens")
            assert [x[c] for c in counts] == [y[c] for c in counts]
            assert x["drift"] == pytest.approx(y["drift"], rel=1e-2)
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


class WatchPartials(SilentEvents):
    """Looks at the output's temporary while the file streams."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sizes: list[int] = []

    def frames_done(self, index, done, total):
        self.sizes.append(sum(p.stat().st_size for p in partials(self.folder) if p.name.startswith(".sample_02")))


def test_output_is_written_while_the_file_streams(tiny_inplace, folder, tmp_path) -> None:
    """Flat memory: the decoded audio goes to the output's temporary as it is produced, not
    joined at the end. The 3 s file's temporary grows through the stream."""
    events = WatchPartials(tmp_path / "out")
    run_folder(tiny_inplace, folder, tmp_path / "out", 1, events)
    growth = [b - a for a, b in zip(events.sizes, events.sizes[1:]) if b > a]
    assert len(growth) >= 2 and max(events.sizes) > 44 + 2 * 16 * 1920


def test_chunked_decode_changes_no_token_and_audio_by_at_most_one_step(model, files) -> None:
    """Sampled, B=3: decoding 16 frames per Mimi call (slots joining mid-chunk decode shorter
    first chunks) gives the tokens of frame-by-frame decoding and audio within one 16-bit step."""
    framewise = dict(BatchedRunner(model, 3).run(files.items()))
    chunked = dict(BatchedRunner(model, 3, decode_chunk=16).run(files.items()))
    for name in files:
        assert chunked[name].text_tokens == framewise[name].text_tokens, name
        a, b = to_pcm16(chunked[name].pcm).astype(int), to_pcm16(framewise[name].pcm).astype(int)
        assert len(a) == len(b) and np.abs(a - b).max(initial=0) <= 1, name
    assert any(chunked[n].pcm.tobytes() != framewise[n].pcm.tobytes() for n in files)  # it did decode in chunks
