"""`infer`'s options end to end on the tiny In-Place checkpoint: timed transcripts, stereo
dialogues and manifests, sampling controls, progress totals and --json, folder output formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rich.console import Console

from helpers import sweep
from helpers.cli import assert_no_traceback, infer, report_of
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.jobs.files import FRAME_SIZE, SAMPLE_RATE
from moshi_ttt.jobs.plan import Job
from moshi_ttt.options import RunOptions, Sampling
from moshi_ttt.report.schema import REPORT_NAME, FileResult
from moshi_ttt.run import run_batch
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt.streaming.transcripts import SRT_MAX_CHARS
from moshi_ttt_cli import render

FRAME_S = FRAME_SIZE / SAMPLE_RATE


@pytest.fixture(scope="module")
def model(tiny_inplace):
    return load_model(str(tiny_inplace.base), str(tiny_inplace.finetune), device="cpu", dtype=torch.float32)


# -- 3. timed transcripts ---------------------------------------------------------------------------


def expected_words(runner: StreamingRunner, streamed) -> list[tuple[str, float, float]]:
    """Words with times computed from the runner's step count and LMGen's delays: the first
    `max_delay` steps return nothing and the first frame is stepped twice, so the steps that
    returned tokens are the last len(tokens) ones, and the k-th of those is input frame k."""
    lm_gen = runner.lm_gen
    first_step = streamed.steps - len(streamed.text_tokens) + 1
    assert first_step == max(runner.model.lm.delays) + 1 == lm_gen.max_delay + 1
    assert streamed.steps == streamed.frames + 1 and len(streamed.text_tokens) * FRAME_SIZE == len(streamed.pcm)
    tokenizer, lm = runner.model.text_tokenizer, runner.model.lm
    words: list[list] = []
    for frame, token in enumerate(streamed.text_tokens):
        if token in (lm.text_padding_token_id, lm.end_of_text_padding_id) or tokenizer.is_control(token):
            continue
        piece = tokenizer.id_to_piece(token)
        if piece.startswith("\u2581") or not words:
            words.append([piece.lstrip("\u2581"), frame * FRAME_S, (frame + 1) * FRAME_S])
        else:
            words[-1][0] += piece
            words[-1][2] = (frame + 1) * FRAME_S
    return [(w, round(s, 3), round(e, 3)) for w, s, e in words if w]


def srt_seconds(stamp: str) -> float:
    hms, ms = stamp.split(",")
    h, m, s = map(int, hms.split(":"))
    return h * 3600 + m * 60 + s + int(ms) / 1000


def test_jsonl_and_srt_times_match_the_steps(model, tiny_inplace, recordings, tmp_path: Path) -> None:
    runner = StreamingRunner(model)
    streamed = runner.run(read_audio(recordings[2]))
    words = expected_words(runner, streamed)
    assert len(words) >= 3, "the tiny model should say something"
    for fmt in ("jsonl", "srt"):
        result = infer(tiny_inplace, recordings[2], tmp_path / fmt / "out.wav", "--text-format", fmt, "--quiet")
        assert result.exit_code == 0, result.output
        text = (tmp_path / fmt / f"out.{fmt}").read_text()
        if fmt == "jsonl":
            records = [json.loads(line) for line in text.splitlines()]
            assert [(r["text"], r["start"], r["end"]) for r in records] == words
        else:
            cues = [block.splitlines() for block in text.strip().split("\n\n")]
            assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
            assert " ".join(c[2] for c in cues).split() == [w for w, _, _ in words]
            spans = [tuple(map(srt_seconds, c[1].split(" --> "))) for c in cues]
            # Each cue runs from its first word's start to its last word's end, in order.
            assert spans[0][0] == words[0][1] and spans[-1][1] == words[-1][2]
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
            assert all(round(s / FRAME_S, 6).is_integer() for span in spans for s in span)
            # Readable lines: words grouped, each line short, a line broken only where it had to be
            # (the next word would not fit, a pause, or a sentence's end).
            lines = [c[2] for c in cues]
            assert len(lines) < len(words) and all(len(line) <= SRT_MAX_CHARS for line in lines)
            firsts = [line.split()[0] for line in lines[1:]]
            for line, first, (end, start) in zip(lines, firsts, zip([e for _, e in spans], [s for s, _ in spans[1:]])):
                assert len(line) + 1 + len(first) > SRT_MAX_CHARS or start - end > 1.0 or line.endswith(tuple(".?!"))


# -- 4. stereo dialogues and manifests --------------------------------------------------------------


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> Path:
    """A manifest listing one two-track dialogue (Moshi left, user right) and one stereo
    recording of a single scene (both channels alike), in a subfolder."""
    root = tmp_path_factory.mktemp("dialogue")
    (root / "dialogues").mkdir()
    left, right = sweep(SAMPLE_RATE, 1.2, 300, seed=11), sweep(SAMPLE_RATE, 1.2, 800, seed=12)
    sf.write(root / "dialogues" / "d.wav", np.stack([left, right], 1), SAMPLE_RATE, subtype="FLOAT")
    sf.write(root / "dialogues" / "same.wav", np.stack([left, left * 0.9], 1), SAMPLE_RATE, subtype="FLOAT")
    sf.write(root / "left.wav", left, SAMPLE_RATE, subtype="FLOAT")
    sf.write(root / "right.wav", right, SAMPLE_RATE, subtype="FLOAT")
    lines = [{"path": "dialogues/d.wav", "duration": 1.2}, {"path": "dialogues/same.wav", "duration": 1.2}]
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_manifest_run_takes_the_requested_channel(dialogue, tiny_inplace, tmp_path: Path) -> None:
    outputs = {}
    for channel in ("left", "right"):
        out = tmp_path / channel
        result = infer(tiny_inplace, dialogue / "data.jsonl", out, "--channel", channel, "--quiet")
        assert result.exit_code == 0, result.output
        # OUT mirrors the manifest's relative paths; the report describes the run.
        assert (out / "dialogues" / "d.wav").is_file() and (out / "dialogues" / "same.wav").is_file()
        assert report_of(out / REPORT_NAME)["settings"]["channel"] == {"left": 0, "right": 1}[channel]
        outputs[channel] = (out / "dialogues" / "d.wav").read_bytes()
    assert outputs["left"] != outputs["right"]
    # Each is exactly the run of that channel alone, as a mono file (at the manifest run's batch size).
    alone = tmp_path / "alone"
    batch_size = report_of(tmp_path / "right" / REPORT_NAME)["settings"]["batch_size"]
    assert (
        infer(
            tiny_inplace, dialogue / "right.wav", alone / "right.wav", "--quiet", "--batch-size", str(batch_size)
        ).exit_code
        == 0
    )
    assert (alone / "right.wav").read_bytes() == outputs["right"]


def test_default_channel_warns_once_on_a_dialogue(dialogue, tiny_inplace, tmp_path: Path) -> None:
    result = infer(tiny_inplace, dialogue / "data.jsonl", tmp_path / "out", "--glob", "*.wav")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "d.wav" in warned[0] and "--channel" in warned[0]
    files = {Path(f["input"]).name: f for f in report_of(tmp_path / "out" / REPORT_NAME)["files"]}
    assert files["d.wav"]["warnings"] and files["same.wav"]["warnings"] == []


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "line 2: not JSON"),
        ('{"duration": 1.0}', 'line 2: expected an object with a "path" string'),
        ('{"path": "../x.wav"}', "line 2: '../x.wav' is outside the manifest's folder"),
        ('{"path": "a.wav", "duration": "long"}', 'line 2: "duration" must be a number'),
    ],
)
def test_bad_manifest_line_is_one_line_naming_it(line, reason, tiny_inplace, tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_text('{"path": "a.wav"}\n' + line + "\n")
    result = infer(tiny_inplace, manifest, tmp_path / "out")
    assert_no_traceback(result)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert f"{manifest}: {reason}" in result.output


def test_bad_channel_is_refused_before_loading(tiny_inplace, recordings, tmp_path: Path, monkeypatch) -> None:
    from moshi_ttt_cli import app as app_module

    with monkeypatch.context() as patched:
        patched.setattr(app_module, "_load_model_stack", lambda *a, **k: pytest.fail("imported the model stack"))
        result = infer(tiny_inplace, recordings[0], tmp_path / "o.wav", "--channel", "middle")
    assert result.exit_code == 2 and result.output.startswith("error: --channel must be")
    with pytest.raises(MoshiTTTError, match="channel must be"):
        run_batch(recordings[0], tmp_path / "o.wav", RunOptions(base=str(tiny_inplace.base), channel=-1))
    result = infer(tiny_inplace, recordings[0], tmp_path / "o.wav", "--channel", "1")  # a mono file
    assert result.exit_code == 1 and "has 1 channel; --channel 1 needs at least 2" in result.output


# -- 5. sampling controls ---------------------------------------------------------------------------


def test_greedy_ignores_the_seed_and_temperature_matters(tiny_inplace, recordings, tmp_path: Path) -> None:
    def run(name: str, *args: object) -> bytes:
        result = infer(
            tiny_inplace,
            recordings[0],
            tmp_path / f"{name}.wav",
            "--quiet",
            "--report",
            tmp_path / f"{name}.json",
            *args,
        )
        assert result.exit_code == 0, result.output
        return (tmp_path / f"{name}.wav").read_bytes()

    assert run("greedy1", "--greedy", "--seed", "1") == run("greedy2", "--greedy", "--seed", "2")
    assert run("sampled1", "--seed", "1") != run("sampled2", "--seed", "2")
    assert run("hot", "--temp", "5", "--seed", "1") != run("sampled1b", "--seed", "1")
    settings = report_of(tmp_path / "hot.json")["settings"]
    assert settings["sampling_overrides"] == {"temp": 5.0} and settings["sampling"]["temp"] == 5.0
    assert report_of(tmp_path / "greedy1.json")["settings"]["sampling"]["use_sampling"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "0"], "--temp must be a positive number"),
        (["--temp-text", "nan"], "--temp-text must be a positive number"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-k-text", "-3"], "--top-k-text must be at least 1"),
    ],
)
def test_bad_sampling_values_exit_2_before_loading(
    args, message, tiny_inplace, recordings, tmp_path: Path, monkeypatch
) -> None:
    from moshi_ttt.checkpoints import model as model_module
    from moshi_ttt_cli import app as app_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    # The library refuses them before any model loads ...
    flags = dict(zip([a.lstrip("-").replace("-", "_") for a in args[::2]], args[1::2]))
    sampling = Sampling(**{k: (float if k.startswith("temp") else int)(v) for k, v in flags.items()})
    # ... naming the setting (the CLI names its flag).
    setting = "sampling." + args[0].lstrip("-").replace("-", "_")
    with pytest.raises(MoshiTTTError, match=message.replace(args[0], setting)):
        run_batch(recordings[0], tmp_path / "o.wav", RunOptions(base=str(tiny_inplace.base), sampling=sampling))
    # ... and the CLI before it even imports the model stack (seconds).
    monkeypatch.setattr(app_module, "_load_model_stack", lambda *a, **k: pytest.fail("imported the model stack"))
    result = infer(tiny_inplace, recordings[0], tmp_path / "o.wav", *args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: {message}")


# -- 6. progress and summaries ----------------------------------------------------------------------


class Recorder(SilentEvents):
    def __init__(self) -> None:
        self.durations: list = []

    def batch_started(self, durations: list) -> None:
        self.durations = durations


def test_audio_total_is_known_before_decoding(tiny_inplace, recordings, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for path in recordings:
        (src / path.name).write_bytes(path.read_bytes())
    (src / "z_unknown.m4a").write_bytes(b"not really audio")  # no header to read: unknown, allowed
    events = Recorder()
    options = RunOptions(
        base=str(tiny_inplace.base), checkpoint=str(tiny_inplace.finetune), device="cpu", pattern="*_0[01]_*"
    )
    run_batch(src, tmp_path / "out", options, events)
    expected = [sf.info(str(src / p.name)).duration for p in recordings[:2]]
    assert events.durations == pytest.approx(expected)
    # The bar gets that total up front, and files that stream nothing leave it.
    bar = render.RichEvents(Console(file=io.StringIO(), force_terminal=True), details=False)
    bar.batch_started([2.0, None, 3.0])
    assert bar.progress.tasks[1].total == 5.0
    bar.file_started(1, 3, Job(src / "x.wav", tmp_path / "x.wav"), 1.5)
    assert bar.progress.tasks[1].total == 6.5
    bar.file_finished(0, 3, FileResult("a", "b", "skipped", "exists"))
    assert bar.progress.tasks[1].total == 4.5


def test_json_prints_one_summary_line_and_skips_name_the_output(tiny_inplace, recordings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = infer(tiny_inplace, recordings[0], out / "a.wav", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["totals"]["files"] == 1 and summary["totals"]["ok"] == 1 and summary["exit_code"] == 0
    assert "1 file:" in result.stderr and "1 files" not in result.stderr
    again = infer(tiny_inplace, recordings[0], out / "a.wav")
    assert f"skipped {recordings[0]}: {out / 'a.wav'} exists (--overwrite redoes it)" in again.stdout


# -- 7. folder output formats -----------------------------------------------------------------------


def test_format_names_folder_outputs(tiny_inplace, recordings, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.wav").write_bytes(recordings[0].read_bytes())
    result = infer(tiny_inplace, src, tmp_path / "out", "--format", "flac", "--quiet")
    assert result.exit_code == 0, result.output
    info = sf.info(str(tmp_path / "out" / "a.flac"))
    assert info.format == "FLAC" and info.frames == sf.info(str(src / "a.wav")).frames // FRAME_SIZE * FRAME_SIZE
    clash = infer(tiny_inplace, recordings[0], tmp_path / "x.wav", "--format", "ogg")
    assert clash.exit_code == 2 and "--format ogg" in clash.output
