"""`moshi-ttt score` end to end on the tiny checkpoints: the per-frame NLL it writes is the
cross-entropy `LMModel.forward` gives on the same codes (a stereo file longer than the context),
TTT against plain Moshi, learning rate 0, alignments, mono policies, batching, resume, the report
and its table, and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import edit_json
from helpers.cli import assert_no_traceback, cli_run
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.report.schema import SCORES_REPORT_NAME
from moshi_ttt.streaming.scoring import forward_nll

FRAME = 1920
RATE = 24_000


def noise(seconds: float, seed: int, levels: tuple[float, ...]) -> np.ndarray:
    """[n, C] float32 noise, one level per channel (so the channels encode differently)."""
    gen = np.random.default_rng(seed)
    n = int(seconds * RATE)
    return (gen.standard_normal((n, len(levels))) * np.array(levels)).astype(np.float32)


def write(path: Path, pcm: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, pcm, RATE, subtype="FLOAT")  # float WAV: read back bit for bit
    return path


def score(tiny, *args: object, checkpoint: bool = True):
    extra = ["--checkpoint", str(tiny.finetune)] if checkpoint else []
    return cli_run(["score", *map(str, args), "--base", str(tiny.base), *extra, "--device", "cpu"])


def reference_codes(model, pcm: np.ndarray, text: np.ndarray) -> torch.Tensor:
    """[1, K, T] codes of a stereo recording as the definition lays them out: Mimi's streaming
    frame-by-frame codes of channel 0 (Moshi) and channel 1 (the user), encoded as one streaming
    batch of two rows (the score runner's Mimi shape at --batch-size 1)."""
    mimi, lm = model.mimi, model.lm
    frames = pcm.shape[0] // FRAME
    rows = []
    with torch.no_grad(), mimi.streaming(2):
        for t in range(frames):
            chunk = torch.from_numpy(np.ascontiguousarray(pcm[t * FRAME : (t + 1) * FRAME].T))[:, None]  # [2, 1, F]
            rows.append(mimi.encode(chunk)[:, :, 0])
    codes = torch.stack(rows, dim=2)  # [2, Q, T]
    user = codes[1, : lm.n_q - lm.dep_q]
    return torch.cat([torch.from_numpy(text)[None], codes[0, : lm.dep_q], user], dim=0)[None]


@pytest.fixture(scope="module")
def stereo(tmp_path_factory) -> Path:
    """20 s of two-channel noise: 250 frames, past the tiny model's 200-frame context."""
    return write(tmp_path_factory.mktemp("stereo") / "talk" / "long.wav", noise(20.0, seed=1, levels=(0.3, 0.05)))


def test_nll_is_lmmodel_forward_cross_entropy_past_the_context(tiny_inplace, stereo, tmp_path) -> None:
    out = tmp_path / "out"
    result = score(tiny_inplace, stereo.parent.parent, out, "--batch-size", "1", "--bucket-seconds", "4")
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    got = np.load(out / "talk" / "long.nll.npy")
    model = load_model(str(tiny_inplace.base), str(tiny_inplace.finetune))
    lm = model.lm
    assert lm.context < got.shape[1] == 250 and got.dtype == np.float32 and got.shape[0] == 1 + lm.dep_q
    pad = np.full(250, lm.text_padding_token_id)
    expected = forward_nll(lm, reference_codes(model, sf.read(stereo, dtype="float32")[0], pad), score_text=False)
    np.testing.assert_allclose(got, expected[0].numpy(), atol=1e-5)
    assert np.isnan(got[0]).all()  # no alignment: text is context, not scored
    delayed = [k for k in range(1, 1 + lm.dep_q) if lm.delays[k] > 0]
    assert all(np.isnan(got[k, -1]) for k in delayed) and not np.isnan(got[1:, :-2]).any()

    report = json.loads((out / SCORES_REPORT_NAME).read_text())
    entry = report["files"][0]
    scores = entry["scores"]
    audio = got[1:][~np.isnan(got[1:])]
    assert scores["count"]["audio"] == audio.size and "text" not in scores["count"]
    assert scores["nll"]["audio"] == pytest.approx(float(audio.astype(np.float64).mean()), rel=1e-6)
    assert scores["perplexity"]["audio"] == pytest.approx(math.exp(scores["nll"]["audio"]))
    assert [b["start_s"] for b in scores["buckets"]] == [0, 4, 8, 12, 16]
    assert report["totals"]["scores"]["nll"]["audio"] == pytest.approx(scores["nll"]["audio"])
    settings = report["settings"]["score"]
    assert settings["user_stream"] == "silence" and settings["context_s"] == pytest.approx(lm.context * 0.08)
    assert settings["first_codebook_weight"] == {"value": 1.0, "source": "moshi-finetune's default"}
    assert entry["ttt"]["layers"] and all(layer["updates"] > 0 for layer in entry["ttt"]["layers"])
    # The table marks where the attention window ends.
    assert f"attention window ends at {lm.context * 0.08:g} s" in result.stdout


def test_ttt_changes_the_scores_and_learning_rate_0_is_plain_moshi(tiny_inplace, stereo, tmp_path) -> None:
    root = stereo.parent.parent
    runs = {}
    for name, args, checkpoint in (("ttt", [], True), ("frozen", ["--no-ttt"], True), ("plain", [], False)):
        result = score(tiny_inplace, root, tmp_path / name, "--batch-size", "1", *args, checkpoint=checkpoint)
        assert result.exit_code == 0, result.output
        runs[name] = np.load(tmp_path / name / "talk" / "long.nll.npy")
    assert not np.allclose(runs["ttt"], runs["frozen"], equal_nan=True)
    zero = tmp_path / "lr0"
    import shutil

    shutil.copytree(tiny_inplace.finetune, zero)
    (config,) = zero.rglob("consolidated/config.json")
    edit_json(config, lambda c: c["ttt_config"].update(learning_rate=0.0))
    result = cli_run(
        [
            "score",
            str(root),
            str(tmp_path / "z"),
            "--base",
            str(tiny_inplace.base),
            "--checkpoint",
            str(zero),
            "--device",
            "cpu",
            "--batch-size",
            "1",
        ]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "z" / "talk" / "long.nll.npy"), runs["plain"], atol=1e-5)


def test_an_alignment_file_makes_text_scored(tiny_inplace, tmp_path) -> None:
    src = tmp_path / "in"
    recording = write(src / "a.wav", noise(3.0, seed=2, levels=(0.3,)))
    words = [
        ["hello", [0.2, 0.5], "SPEAKER_MAIN"],
        ["world", [0.9, 1.3], "SPEAKER_MAIN"],
        ["other", [1.5, 1.9], "SPEAKER_OTHER"],
    ]
    recording.with_suffix(".json").write_text(json.dumps({"alignments": words}))
    write(src / "b.wav", noise(3.0, seed=3, levels=(0.3,)))  # no alignment: text not scored
    result = score(tiny_inplace, src, tmp_path / "out", "--user-stream", "copy")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / SCORES_REPORT_NAME).read_text())
    by_name = {Path(f["input"]).name: f for f in report["files"]}
    assert by_name["a.wav"]["scores"]["count"]["text"] > 0 and "text" in by_name["a.wav"]["scores"]["nll"]
    assert "text" not in by_name["b.wav"]["scores"]["count"]
    assert report["settings"]["score"]["user_stream"] == "copy"
    text = np.load(tmp_path / "out" / "a.nll.npy")[0]
    assert not np.isnan(text[:-1]).all()
    assert by_name["a.wav"]["scores"]["weighted_loss"]["loss"] is not None


def test_mono_policies_give_different_scores_and_neighbours_change_nothing(tiny_inplace, tmp_path) -> None:
    src = tmp_path / "in"
    for index, seconds in enumerate((1.2, 2.0, 0.6, 1.6)):
        write(src / f"f{index}.wav", noise(seconds, seed=10 + index, levels=(0.3,)))
    arrays = {}
    for policy in ("silence", "none"):
        result = score(tiny_inplace, src, tmp_path / policy, "--user-stream", policy, "--batch-size", "3")
        assert result.exit_code == 0, result.output
        arrays[policy] = {p.name: np.load(p) for p in (tmp_path / policy).glob("*.npy")}
    assert not np.allclose(arrays["silence"]["f1.nll.npy"], arrays["none"]["f1.nll.npy"], equal_nan=True)
    # f1 alone at the same batch size: what it scored beside three others.
    alone = tmp_path / "alone"
    result = score(tiny_inplace, src / "f1.wav", alone / "f1.nll.npy", "--user-stream", "none", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(alone / "f1.nll.npy"), arrays["none"]["f1.nll.npy"], atol=1e-5)


def test_rerun_skips_scored_files_and_plot_compares_two_reports(tiny_inplace, stereo, tmp_path) -> None:
    root = stereo.parent.parent
    for name, args in (("ttt", []), ("plain", ["--no-ttt"])):
        result = score(tiny_inplace, root, tmp_path / name, "--bucket-seconds", "4", *args)
        assert result.exit_code == 0, result.output
    again = score(tiny_inplace, root, tmp_path / "ttt", "--bucket-seconds", "4")
    assert again.exit_code == 0
    entry = json.loads((tmp_path / "ttt" / SCORES_REPORT_NAME).read_text())["files"][0]
    assert entry["status"] == "skipped" and entry["from_earlier_run"] and entry["scores"]["count"]["audio"] > 0
    png = tmp_path / "nll.png"
    result = cli_run(
        [
            "plot",
            str(tmp_path / "ttt" / SCORES_REPORT_NAME),
            "--compare",
            str(tmp_path / "plain" / SCORES_REPORT_NAME),
            "-o",
            str(png),
        ]
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shards_of_a_score_run_merge_into_one_scores_report(tiny_inplace, tmp_path) -> None:
    src = tmp_path / "in"
    for index in range(4):
        write(src / f"f{index}.wav", noise(0.8, seed=20 + index, levels=(0.3,)))
    whole = score(tiny_inplace, src, tmp_path / "whole", "--batch-size", "1")
    assert whole.exit_code == 0, whole.output
    for shard in ("0/2", "1/2"):
        result = score(tiny_inplace, src, tmp_path / "out", "--shard", shard, "--batch-size", "1")
        assert result.exit_code == 0, result.output
    merged = cli_run(["report", "merge", str(tmp_path / "out")])
    assert merged.exit_code == 0, merged.output
    report = json.loads((tmp_path / "out" / SCORES_REPORT_NAME).read_text())
    expected = json.loads((tmp_path / "whole" / SCORES_REPORT_NAME).read_text())
    assert report["totals"]["scores"]["count"] == expected["totals"]["scores"]["count"]
    assert report["totals"]["scores"]["nll"]["audio"] == pytest.approx(expected["totals"]["scores"]["nll"]["audio"])


def test_a_rerun_with_other_score_settings_does_not_pass_old_arrays_off_as_new(tiny_inplace, tmp_path) -> None:
    src = tmp_path / "in"
    write(src / "a.wav", noise(0.8, seed=30, levels=(0.3,)))
    assert score(tiny_inplace, src, tmp_path / "out", "--user-stream", "silence").exit_code == 0
    again = score(tiny_inplace, src, tmp_path / "out", "--user-stream", "none")
    assert again.exit_code == 0, again.output
    report = json.loads((tmp_path / "out" / SCORES_REPORT_NAME).read_text())
    entry = report["files"][0]
    assert report["totals"]["made_by_other"] == 1 and entry["made_by"]["score"]["user_stream"] == "silence"
    assert "--redo-other" in entry["reason"]
