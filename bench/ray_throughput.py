"""Files per hour through `run_batch`: a plain local run, and `--backend ray` with 1 and 2 local
workers, on the same files.

    .venv/bin/python bench/ray_throughput.py [--files 12] [--seconds 4] [--batch-size 1] [--workers 1 2]

Tiny In-Place checkpoint on CPU (written to a temp folder, offline), one torch thread per process.
Each configuration writes into a fresh OUT (nothing skipped). The Ray rows count everything a
user waits for once Ray is up (actors starting and loading the model, the files, the report); the
one-off `ray.init` is timed on its own line. Overhead = Ray wall time over the local run's. On a
2-core machine the driver shares the cores with the actors, so 2 workers cannot reach 2x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_ttt.backends.ray import require_ray  # noqa: E402
from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant  # noqa: E402
from moshi_ttt.events import SilentEvents  # noqa: E402
from moshi_ttt.options import RayOptions, RunOptions  # noqa: E402
from moshi_ttt.run import run_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs the local Ray instance gets")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-ray-bench-"))
    tiny = write_tiny_variant(root, "inplace")
    src = root / "in"
    write_sample_recordings(src, durations=[args.seconds] * args.files)
    audio_s = args.files * args.seconds

    def options(**extra) -> RunOptions:
        return RunOptions(
            base=str(tiny.base),
            checkpoint=str(tiny.finetune),
            device="cpu",
            threads=1,
            batch_size=args.batch_size,
            **extra,
        )

    def timed(name: str, folder: str, **extra) -> float:
        start = time.perf_counter()
        outcome = run_batch(src, root / folder, options(**extra), SilentEvents())
        wall = time.perf_counter() - start
        assert outcome.exit_code == 0, [(f.input, f.reason) for f in outcome.report.files]
        if "ray" in extra:  # the pool really had the workers this row is named after
            assert outcome.report.settings.workers == extra["ray"].workers, outcome.report.settings
        print(
            f"{name:16s} {wall:8.2f} s  {3600 * args.files / wall:10.0f} files/h  RTF {wall / audio_s:.3f}", flush=True
        )
        return wall

    print(
        f"{args.files} files x {args.seconds:.1f} s, batch size {args.batch_size}, tiny In-Place checkpoint, "
        f"CPU, {os.cpu_count()} cores"
    )
    timed("warm-up (local)", "warm-up")  # imports and first-load costs out of the comparison
    local = timed("local", "local")
    ray = require_ray()
    start = time.perf_counter()
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"NO_TORCH_COMPILE": "1"}},
    )
    print(f"{'ray.init':16s} {time.perf_counter() - start:8.2f} s  (once per driver)")
    try:
        for run, workers in enumerate(args.workers):
            wall = timed(
                f"ray, {workers} worker{'s' if workers > 1 else ''}",
                f"ray-{run}",
                backend="ray",
                ray=RayOptions(workers=workers),
            )
            print(f"{'':16s} overhead vs local: {wall / local:.2f}x", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
