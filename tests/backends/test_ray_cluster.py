"""`--ray-address` and `--workers` reach Ray: a run joins a cluster started with `ray start --head`
(on loopback, started and stopped here) instead of starting its own, and runs the number of
actors asked for, not the default (2 on a 2-core machine), with `-q` keeping Ray's own log lines
off the console."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from helpers import write_corpus  # noqa: E402
from helpers.cli import cli_command  # noqa: E402
from moshi_ttt.report.schema import REPORT_NAME  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# What the cluster knows, read from its control store (no dashboard needed): every job's driver
# pid and every actor's class and job.
CLUSTER_STATE = """
import json, logging, ray
from ray._private import state
ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR)
print(json.dumps({"jobs": [{"id": j["JobID"], "pid": j["DriverPid"]} for j in state.jobs()],
                  "actors": [{"cls": a["ActorClassName"], "job": a["JobID"]} for a in state.actors().values()]}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on loopback, as `ray start --head` makes it for users."""
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--num-cpus",
            "2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert started.returncode == 0, started.stderr
    yield env
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_ray_address_auto_joins_the_cluster_and_runs_the_workers_asked_for(cluster, tiny_inplace, tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_corpus(src)
    argv = cli_command(
        tiny_inplace,
        src,
        out,
        "--backend",
        "ray",
        "--ray-address",
        "auto",
        "--workers",
        "1",
        "--threads",
        "1",
        "--batch-size",
        "1",
        "--quiet",
    )
    run = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**cluster, "NO_TORCH_COMPILE": "1"}
    )
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 1, stderr  # the corpus holds one bad file
    # -q: our one line for the bad file, nothing of Ray's (its C++ core and loggers included).
    assert stdout == "" and len(stderr.splitlines()) == 1 and "bad/text.wav" in stderr, stderr
    settings = json.loads((out / REPORT_NAME).read_text())["settings"]
    assert (settings["backend"], settings["workers"]) == ("ray", 1)

    state = subprocess.run(
        [sys.executable, "-c", CLUSTER_STATE], capture_output=True, text=True, timeout=120, env=cluster
    )
    assert state.returncode == 0, state.stderr  # the cluster outlived the run: joined, not started
    known = json.loads(state.stdout.strip().splitlines()[-1])
    ours = [job["id"] for job in known["jobs"] if job["pid"] == run.pid]
    assert len(ours) == 1, known["jobs"]  # the run's driver was a job of this cluster
    pool = [actor for actor in known["actors"] if actor["job"] == ours[0] and "FileActor" in actor["cls"]]
    assert len(pool) == 1, known["actors"]  # one model copy, as asked (the default here is 2)
