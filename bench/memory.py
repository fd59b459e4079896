"""Peak memory against recording length, for `infer` and `score` through `run_batch`.

    .venv/bin/python bench/memory.py [--minutes 1 60]

For each length and job, a fresh process streams one synthetic 24 kHz recording through the
tiny In-Place checkpoint (`--batch-size 1`) and reports its peak resident memory (VmHWM, the
model load included). Recordings are read in blocks as they stream (`jobs/reader.py`), outputs
written as they are produced (infer: audio blocks; score: one float32 array of `1 + dep_q`
values per frame, the only thing that grows), so the peak should barely move with the length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys
os.environ.setdefault("NO_TORCH_COMPILE", "1")
import torch
torch.set_num_threads(1)
from moshi_ttt.events import SilentEvents
from moshi_ttt.options import RunOptions, ScoreOptions
from moshi_ttt.run import run_batch
job, base, finetune, recording, out = sys.argv[1:6]
options = RunOptions(base=base, checkpoint=finetune, device="cpu", batch_size=1,
                     score=ScoreOptions() if job == "score" else None)
outcome = run_batch(recording, out, options, SilentEvents())
assert outcome.exit_code == 0, outcome.report.files
with open("/proc/self/status") as handle:
    peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
print(json.dumps({"peak_mb": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 60.0])
    args = parser.parse_args()
    from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant

    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-memory-"))
    paths = write_tiny_variant(root, "inplace")
    print("minutes  peak resident MB: infer   score")
    for minutes in args.minutes:
        recording = write_sample_recordings(root / f"rec{minutes}", durations=(60 * minutes,))[0]
        row = []
        for job, suffix in (("infer", ".wav"), ("score", ".nll.npy")):
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    job,
                    str(paths.base),
                    str(paths.finetune),
                    str(recording),
                    str(root / f"{job}-{minutes}{suffix}"),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "NO_TORCH_COMPILE": "1"},
            )
            if done.returncode:
                raise SystemExit(done.stderr)
            row.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])
        print(f"{minutes:7.1f}  {row[0]:22.1f}  {row[1]:6.1f}", flush=True)


if __name__ == "__main__":
    main()
