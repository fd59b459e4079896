"""The streaming runner is moshi's own loop, the CPU is set up on purpose, and the demo runs offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from typer.testing import CliRunner

from helpers import block_hub
from moshi_ttt.checkpoints.layouts import base_checkpoint_info
from moshi_ttt.checkpoints.model import load_model
from moshi_ttt.jobs.audio import read_audio
from moshi_ttt.jobs.files import FRAME_SIZE
from moshi_ttt.runtime import default_threads, resolve_dtype, set_threads
from moshi_ttt.streaming.reference import StreamingRunner
from moshi_ttt_cli.app import app


def moshi_reference(base: Path, recording: Path, seed: int) -> tuple[np.ndarray, list[int]]:
    """moshi.run_inference's InferenceState on the same checkpoint, batch 1, float32, CPU."""
    from moshi.run_inference import InferenceState, seed_all

    info = base_checkpoint_info(str(base))
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    tokenizer = info.get_text_tokenizer()
    pcm, _ = sphn.read(str(recording), sample_rate=mimi.sample_rate)
    in_pcms = torch.from_numpy(pcm)[None, 0:1]
    seed_all(seed)
    state = InferenceState(info, mimi, tokenizer, lm, 1, 1.0, "cpu", **info.lm_gen_config)
    with torch.no_grad():
        ((text, out_pcm),) = state.run(in_pcms)
    return out_pcm[0].numpy(), text.tolist()


@pytest.mark.parametrize("index", [0, 2])
def test_runner_output_is_identical_to_moshi_inference_state(tiny_inplace, recordings, index: int) -> None:
    recording = recordings[index]
    expected_pcm, expected_text = moshi_reference(tiny_inplace.base, recording, seed=4242)
    model = load_model(str(tiny_inplace.base), device="cpu", dtype=torch.float32)
    result = StreamingRunner(model, seed=4242).run(read_audio(recording))
    assert result.pcm.shape == expected_pcm.shape
    assert np.array_equal(result.pcm, expected_pcm)
    assert result.text_tokens == expected_text


def test_frames_steps_and_trailing_partial_frame(tiny_inplace, recordings) -> None:
    model = load_model(str(tiny_inplace.base))
    runner = StreamingRunner(model)
    pcm = read_audio(recordings[0])
    whole = len(pcm) // FRAME_SIZE
    result = runner.run(np.concatenate([pcm[: whole * FRAME_SIZE], pcm[: FRAME_SIZE // 2]]))
    assert result.frames == whole  # the trailing half frame is dropped, as moshi does
    assert result.steps == whole + 1  # the first frame is stepped twice
    delay = max(model.lm.delays)
    assert len(result.text_tokens) == result.steps - delay
    assert len(result.pcm) == (result.steps - delay) * FRAME_SIZE


def test_seed_is_applied_per_file(tiny_inplace, recordings) -> None:
    model = load_model(str(tiny_inplace.base))
    pcm = read_audio(recordings[1])
    a = StreamingRunner(model, seed=1).run(pcm)
    torch.rand(1000)  # whatever ran before must not matter
    b = StreamingRunner(model, seed=1).run(pcm)
    c = StreamingRunner(model, seed=2).run(pcm)
    assert a.pcm.tobytes() == b.pcm.tobytes()
    assert a.pcm.tobytes() != c.pcm.tobytes()


def test_importing_the_library_disables_torch_compile_on_cpu() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import os, moshi_ttt; from moshi.utils import compile as c; "
        "print(os.environ.get('NO_TORCH_COMPILE'), c.torch_compile_lazy(len) is len)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]


def test_thread_choice_is_deliberate_and_settable(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_threads(cpu) == 1  # 2 threads made small convs ~200x slower on 2 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert default_threads(cpu) == 8
    assert default_threads(torch.device("cuda")) == 1
    before = torch.get_num_threads()
    try:
        assert set_threads(3, cpu) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_demo_runs_offline(tmp_path: Path, monkeypatch) -> None:
    block_hub(monkeypatch)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    outputs = sorted((tmp_path / "outputs").glob("*.wav"))
    assert len(outputs) == 3
    report = json.loads((tmp_path / "outputs" / "moshi-ttt-report.json").read_text())
    assert report["totals"]["ok"] == 3
    assert all(f["ttt"]["variant"] == "inplace" and f["ttt"]["layers"] for f in report["files"])
    assert "TTT layers" in result.output and "real-time factor" in result.output


def test_help_and_argument_errors_import_no_torch() -> None:
    """`moshi-ttt --help`, `--version` and a bad argument answer without loading torch or moshi."""
    probe = (
        "import sys; from moshi_ttt_cli.app import app; "
        "sys.argv = ['moshi-ttt', *sys.argv[1:]]\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('EXIT', code, 'torch' in sys.modules, 'moshi' in sys.modules)"
    )
    for args, code in (
        (["--help"], 0),
        (["--version"], 0),
        (["infer", "--help"], 0),
        (["infer"], 2),
        (["make-tiny", "x", "--variant", "nope"], 2),
    ):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert out.stdout.splitlines()[-1] == f"EXIT {code} False False", (args, out.stdout, out.stderr)
    version = subprocess.run([sys.executable, "-c", probe, "--version"], capture_output=True, text=True)
    from moshi_ttt import __version__

    assert version.stdout.startswith(f"moshi-ttt {__version__}")
