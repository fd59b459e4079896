"""Frames per second of `score` beside `infer` at the same batch sizes, on the same files.

    .venv/bin/python bench/score_throughput.py [--files 16] [--seconds 3] [--batch-sizes 1 4 8 16]
        [--setups plain inplace ttt-mlp] [--threads 1] [--device cpu]

Both go through `run_batch` (reading, streaming, writing, the report), each configuration into a
fresh OUT, after one warm-up run. Scoring decodes and samples nothing, so it should not be slower
than inference at the same B. Frames per second = LM steps of all files / wall time. Tiny
checkpoints (written to a temp folder, offline); timing goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant  # noqa: E402
from moshi_ttt.events import SilentEvents  # noqa: E402
from moshi_ttt.options import RunOptions, ScoreOptions  # noqa: E402
from moshi_ttt.run import run_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--setups", nargs="+", default=["plain", "inplace", "ttt-mlp"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-score-bench-"))
    paths = {v: write_tiny_variant(root, v) for v in ("inplace", "ttt-mlp")}
    src = root / "in"
    write_sample_recordings(src, durations=[args.seconds] * args.files)
    setups = {
        "plain": (paths["inplace"].base, None),
        "inplace": (paths["inplace"].base, paths["inplace"].finetune),
        "ttt-mlp": (paths["ttt-mlp"].base, paths["ttt-mlp"].finetune),
    }
    print(f"{args.files} files x {args.seconds:.1f} s, {args.threads} thread(s), {args.device}, tiny checkpoints")
    print("setup     B   infer frames/s   score frames/s   score/infer")
    run = 0
    for name in args.setups:
        base, finetune = setups[name]
        for batch_size in args.batch_sizes:
            rates = {}
            for kind in ("infer", "score"):
                options = RunOptions(
                    base=str(base),
                    checkpoint=None if finetune is None else str(finetune),
                    device=args.device,
                    threads=args.threads,
                    batch_size=batch_size,
                    score=ScoreOptions() if kind == "score" else None,
                )
                if run == 0:  # imports and first loads out of the comparison
                    run_batch(src, root / "warm-up", options, SilentEvents())
                run += 1
                start = time.perf_counter()
                outcome = run_batch(src, root / f"out-{run}", options, SilentEvents())
                wall = time.perf_counter() - start
                assert outcome.exit_code == 0, [(f.input, f.reason) for f in outcome.report.files]
                rates[kind] = sum(f.frames for f in outcome.report.files) / wall
            print(
                f"{name:8s} {batch_size:2d}  {rates['infer']:15.1f}  {rates['score']:15.1f}  "
                f"{rates['score'] / rates['infer']:10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
