"""Peak memory against recording length: outputs written as they are decoded vs joined at the end.

    .venv/bin/python bench/memory.py [--minutes 0.5 4]

For each length, two fresh processes stream one synthetic recording through the tiny In-Place
checkpoint: `run_batch` (the product: blocks to the output's temporary as decoded) and the
reference `StreamingRunner`, which keeps every decoded frame and joins them before writing.
Prints how much resident memory grew from the first tenth of the stream to its end (the join
and write included for the reference). The input recording itself is read whole before
streaming (24 kHz float32: 5.8 MB per minute), in both.
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
mode, base, finetune, recording, out = sys.argv[1:6]
samples = []  # resident MB at each tenth of the stream


def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def progress(done, total):
    if done % max(total // 10, 1) == 0:
        samples.append(rss_mb())


class Events(SilentEvents):
    def frames_done(self, index, done, total):
        progress(done, total)


if mode == "product":
    from moshi_ttt.options import RunOptions
    from moshi_ttt.run import run_batch
    run_batch(recording, out, RunOptions(base=base, checkpoint=finetune, device="cpu", batch_size=1), Events())
else:
    from moshi_ttt.jobs.audio import read_audio, write_audio
    from moshi_ttt.checkpoints.model import load_model
    from moshi_ttt.streaming.reference import StreamingRunner
    streamed = StreamingRunner(load_model(base, finetune)).run(read_audio(recording), progress=progress)
    write_audio(out, streamed.pcm)
    samples.append(rss_mb())  # the join and the write
print(json.dumps({"first": samples[0], "last": max(samples[1:])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[0.5, 4.0])
    args = parser.parse_args()
    from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant

    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-memory-"))
    paths = write_tiny_variant(root, "inplace")
    print("minutes  growth while streaming, MB: product  joined")
    for minutes in args.minutes:
        recording = write_sample_recordings(root / f"rec{minutes}", durations=(60 * minutes,))[0]
        row = []
        for mode in ("product", "joined"):
            out = root / f"{mode}-{minutes}.wav"
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(paths.base), str(paths.finetune), str(recording), str(out)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "NO_TORCH_COMPILE": "1"},
            )
            numbers = json.loads(done.stdout.strip().splitlines()[-1])
            row.append(numbers["last"] - numbers["first"])
        print(f"{minutes:7.1f}  {row[0]:34.1f}  {row[1]:6.1f}", flush=True)


if __name__ == "__main__":
    main()
