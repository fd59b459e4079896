"""On a GPU: every TTT setup gives the same tokens, audio and TTT numbers with moshi's CUDA graphs
as without them (NO_CUDA_GRAPH=1), i.e. the host-driven commits really update what the captured
graphs read. Also times both.

    python bench/cuda_graphs.py [--dtype float32] [--seconds 6]

Writes tiny checkpoints (In-Place with a clip that fires on some chunks, a tight clip, TTT-MLP,
TTT-MLP with RoPE, In-Place with YaRN) and runs `moshi-ttt infer` on a folder of recordings in
a subprocess per setting, since moshi reads NO_CUDA_GRAPH when it is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = "import sys; sys.argv[0] = 'moshi-ttt'; from moshi_ttt_cli.app import main; main()"


def run(args: list[str], graphs: bool) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ)
    env.pop("NO_CUDA_GRAPH", None)
    if not graphs:
        env["NO_CUDA_GRAPH"] = "1"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def numbers(report: Path) -> list:
    data = json.loads(report.read_text())
    return [
        (
            Path(f["input"]).name,
            f["status"],
            f["steps"],
            f.get("transcript"),
            f.get("output_sha256"),
            [
                (
                    layer["layer"],
                    layer["updates"],
                    layer["clipped_updates"],
                    round(layer["drift"], 4),
                    [round(u["drift"], 4) for u in layer.get("timeline") or []],
                )
                for layer in (f["ttt"] or {}).get("layers", [])
            ],
        )
        for f in data["files"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--device", default="cuda", help="cpu only checks the script itself")
    parser.add_argument("--only", nargs="*", help="setups to run (default: all)")
    parser.add_argument("--timeline", action="store_true", help="record (and compare) the per-update timeline too")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moshi-ttt-graphs-"))
    recordings = root / "rec"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from moshi_ttt.tiny import write_sample_recordings as w; "
            f"w(sys.argv[1], durations=(1.6, 2.4, {args.seconds}))",
            str(recordings),
        ],
        check=True,
    )
    setups: dict[str, tuple[list[str], list[str]]] = {
        "inplace": (["--variant", "inplace"], []),
        "inplace-tight-clip": (["--variant", "inplace"], ["--delta-clip", "1e-5"]),
        "inplace-yarn": (["--variant", "inplace", "--yarn"], []),
        "ttt-mlp": (["--variant", "ttt-mlp"], []),
        "ttt-mlp-rope": (["--variant", "ttt-mlp"], []),
    }
    failures = 0
    for name, (make_args, infer_args) in setups.items():
        if args.only and name not in args.only:
            continue
        folder = root / name
        made = subprocess.run(
            [sys.executable, "-c", CLI, "make-tiny", str(folder), *make_args], capture_output=True, text=True
        )
        if made.returncode:
            print(f"{name}: make-tiny failed: {made.stderr.strip()[-300:]}")
            failures += 1
            continue
        variant = make_args[1]
        if name.endswith("-rope"):  # the same fine-tune, trained with RoPE on the inner Q/K
            training = next((folder / variant).rglob("training_config.json"))
            data = json.loads(training.read_text())
            data["ttt"]["use_rope"] = True
            training.write_text(json.dumps(data))
        results = {}
        for graphs in (True, False):
            out = root / f"out-{name}-{'graphs' if graphs else 'eager'}"
            seconds, done = run(
                [
                    "infer",
                    str(recordings),
                    str(out),
                    "--base",
                    str(folder / "base"),
                    "--checkpoint",
                    str(folder / variant),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--text",
                    "--quiet",
                    *(["--timeline"] if args.timeline else []),
                    *infer_args,
                ],
                graphs,
            )
            if done.returncode:
                print(f"{name} graphs={graphs}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
                failures += 1
                break
            results[graphs] = (seconds, numbers(out / "moshi-ttt-report.json"))
        if len(results) < 2:
            continue
        same = results[True][1] == results[False][1]
        failures += not same
        layers = results[True][1][-1][5]
        print(
            f"{name:20s} same with and without CUDA graphs: {same}; wall {results[True][0]:.1f} s (graphs) "
            f"vs {results[False][0]:.1f} s (eager); last file's layers (layer, updates, clipped, drift): {layers}"
        )
        if not same:
            for a, b in zip(results[True][1], results[False][1]):
                if a != b:
                    print("  graphs:", a, "\n  eager: ", b)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
