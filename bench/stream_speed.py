"""Streaming speed on tiny checkpoints: ms per LMGen step and real-time factor, per TTT variant.

    .venv/bin/python bench/stream_speed.py [--seconds 10] [--threads 1]

Writes tiny checkpoints to a temp folder (offline) and streams a synthetic recording through
plain Moshi, In-Place TTT and TTT-MLP. Timing goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.checkpoints.model import load_model  # noqa: E402
from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant  # noqa: E402
from moshi_ttt.jobs.audio import read_audio  # noqa: E402
from moshi_ttt.jobs.files import SAMPLE_RATE
from moshi_ttt.streaming.reference import StreamingRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-bench-"))
    paths = {v: write_tiny_variant(root, v) for v in ("inplace", "ttt-mlp")}
    recording = write_sample_recordings(root / "rec", durations=(args.seconds,))[0]
    pcm = read_audio(recording)
    audio_s = len(pcm) / SAMPLE_RATE
    setups = {
        "plain": (paths["inplace"].base, None),
        "inplace": (paths["inplace"].base, paths["inplace"].finetune),
        "ttt-mlp": (paths["ttt-mlp"].base, paths["ttt-mlp"].finetune),
    }
    print(f"{audio_s:.1f} s of audio, {args.threads} thread(s), best of {args.repeats}")
    for name, (base, finetune) in setups.items():
        runner = StreamingRunner(load_model(str(base), None if finetune is None else str(finetune)))
        runner.run(pcm[:SAMPLE_RATE])  # warm-up
        best = min(_timed(runner, pcm) for _ in range(args.repeats))
        steps = len(pcm) // 1920 + 1
        print(f"{name:8s} {1000 * best / steps:6.2f} ms/step  real-time factor {best / audio_s:.3f}")


def _timed(runner: StreamingRunner, pcm: np.ndarray) -> float:
    start = time.perf_counter()
    runner.run(pcm)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
