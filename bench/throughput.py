"""Files per hour with B recordings streamed at once (`BatchedRunner`), per TTT setup.

    .venv/bin/python bench/throughput.py [--files 8] [--seconds 4] [--batch-sizes 1 2 4 8]
        [--decode-chunks 1 16] [--setups plain inplace ttt-mlp] [--threads 1]

Tiny checkpoints on CPU (written to a temp folder, offline). Reports files per hour, the speed-up
over B=1 and the real-time factor per stream, for each batch size and Mimi decode chunk; for a
decode chunk above 1, the largest difference from frame-by-frame decoding in 16-bit steps (LSB)
and whether every token stayed the same. Timing goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt.checkpoints.model import load_model  # noqa: E402
from moshi_ttt.checkpoints.tiny import write_sample_recordings, write_tiny_variant  # noqa: E402
from moshi_ttt.jobs.audio import read_audio, to_pcm16  # noqa: E402
from moshi_ttt.jobs.files import SAMPLE_RATE
from moshi_ttt.streaming.batched import BatchedRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-chunks", type=int, nargs="+", default=[1])
    parser.add_argument("--setups", nargs="+", default=["plain", "inplace", "ttt-mlp"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-throughput-"))
    paths = {v: write_tiny_variant(root, v) for v in ("inplace", "ttt-mlp")}
    recordings = write_sample_recordings(root / "rec", durations=[args.seconds] * args.files)
    pcms = [(path.name, read_audio(path)) for path in recordings]
    audio_s = sum(len(pcm) for _, pcm in pcms) / SAMPLE_RATE
    setups = {
        "plain": (paths["inplace"].base, None),
        "inplace": (paths["inplace"].base, paths["inplace"].finetune),
        "ttt-mlp": (paths["ttt-mlp"].base, paths["ttt-mlp"].finetune),
    }
    print(f"{args.files} files x {args.seconds:.1f} s, {args.threads} thread(s), {args.device}, tiny checkpoints")
    print("setup     B  chunk  files/hour  speed-up  RTF/stream  max LSB  tokens")
    for name in args.setups:
        base, finetune = setups[name]
        model = load_model(str(base), None if finetune is None else str(finetune), device=args.device)
        first = None
        for batch_size in args.batch_sizes:
            reference = None
            for chunk in args.decode_chunks:
                runner = BatchedRunner(model, batch_size, decode_chunk=chunk)
                list(runner.run(pcms[:batch_size]))  # warm-up
                start = time.perf_counter()
                results = dict(runner.run(pcms))
                wall = time.perf_counter() - start
                per_hour = 3600 * args.files / wall
                first = first or per_hour
                reference = reference or results
                lsb = max(
                    int(abs(to_pcm16(results[k].pcm).astype(int) - to_pcm16(reference[k].pcm)).max(initial=0))
                    for k in results
                )
                same = all(results[k].text_tokens == reference[k].text_tokens for k in results)
                print(
                    f"{name:8s} {batch_size:2d}  {chunk:5d}  {per_hour:10.0f}  {per_hour / first:7.2f}x  "
                    f"{wall * min(batch_size, args.files) / audio_s:10.3f}  {lsb:7d}  {'same' if same else 'DIFFER'}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
