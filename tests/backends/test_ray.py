"""`--backend ray`: a local Ray instance with a pool of 2 actors gives what a local run gives
(outputs byte for byte, the same report entries in the same order), bad files are failed rows,
and a worker process killed mid-run is restarted and every good output still ends complete.

Ray is started once for the module (2 CPUs, no dashboard); each actor runs one torch thread.
"""
# ruff: noqa: E402  (Ray is imported first: the module is skipped without it)

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf

ray = pytest.importorskip("ray")

from helpers import comparable, files_under, partials, write_corpus
from helpers.cli import assert_no_traceback, infer
from moshi_ttt.checkpoints.tiny import write_sample_recordings
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.events import SilentEvents
from moshi_ttt.jobs.files import FRAME_SIZE
from moshi_ttt.options import RayOptions, RunOptions
from moshi_ttt.report.schema import REPORT_NAME
from moshi_ttt.run import run_batch


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module: starting one costs seconds."""
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"NO_TORCH_COMPILE": "1"}}
    )
    yield
    ray.shutdown()


def options(tiny, **kwargs) -> RunOptions:
    return RunOptions(
        base=str(tiny.base), checkpoint=str(tiny.finetune), device="cpu", threads=1, text=True, batch_size=1, **kwargs
    )


def on_ray(tiny, **ray_kwargs) -> RunOptions:
    return options(tiny, backend="ray", ray=RayOptions(**{"workers": 2, **ray_kwargs}))


def report_of(path: Path) -> dict:
    return json.loads(path.read_text())


def actor_pids() -> list[int]:
    """Processes of our Ray Data actors (Ray titles them after the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::") and b"FileActor" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    src = tmp_path_factory.mktemp("corpus") / "in"
    return src, write_corpus(src)


def test_two_ray_workers_write_what_a_local_run_writes(tiny_inplace, corpus, tmp_path) -> None:
    src, expected = corpus
    local = run_batch(src, tmp_path / "local", options(tiny_inplace))
    assert local.exit_code == 1  # the bad file failed
    # Through the CLI, on the module's Ray instance (joined, so left running).
    result = infer(
        tiny_inplace,
        src,
        tmp_path / "ray",
        "--text",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--backend",
        "ray",
        "--workers",
        "2",
    )
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "bad/text.wav" in result.stderr and ray.is_initialized()
    assert files_under(tmp_path / "ray") == files_under(tmp_path / "local")
    for rel in files_under(tmp_path / "local"):
        if rel != REPORT_NAME:
            assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    ours, theirs = report_of(tmp_path / "ray" / REPORT_NAME), report_of(tmp_path / "local" / REPORT_NAME)
    relocate = lambda e: {
        k: v.replace(str(tmp_path / "ray"), str(tmp_path / "local"))
        if isinstance(v, str)  # noqa: E731
        else v
        for k, v in comparable(e).items()
    }
    assert [relocate(e) for e in ours["files"]] == [comparable(e) for e in theirs["files"]]  # plan order too
    assert {Path(e["input"]).relative_to(src).as_posix(): e["status"] for e in ours["files"]} == expected
    assert ours["settings"]["backend"] == "ray" and ours["settings"]["workers"] == 2
    # The model's own description came from the actors.
    assert {k: v for k, v in ours["settings"].items() if k not in ("backend", "workers", "gpus_per_worker")} == theirs[
        "settings"
    ]
    assert partials(tmp_path / "ray") == []


N_KILL = 5


def test_a_worker_killed_mid_run_is_restarted_and_every_output_is_complete(tiny_inplace, tmp_path) -> None:
    src = tmp_path / "in"
    write_sample_recordings(src, seed=5, durations=[2.5] * N_KILL)

    class KillOne(SilentEvents):
        """Kills an actor's process when the first file is reported (the others still stream),
        and notes which actor processes exist as later files finish."""

        killed: int | None = None
        after: set[int] = set()

        def file_finished(self, index, total, result):
            if self.killed is None:
                busy = actor_pids()
                assert len(busy) == 2, busy
                self.before = set(busy)
                self.killed = busy[-1]
                os.kill(self.killed, signal.SIGKILL)
            else:
                self.after |= set(actor_pids())

    events = KillOne()
    outcome = run_batch(src, tmp_path / "out", on_ray(tiny_inplace, files_per_task=1), events)
    assert events.killed is not None
    assert events.after - events.before, "the killed actor was restarted"
    assert outcome.exit_code == 0, [(f.input, f.reason) for f in outcome.report.files]
    report = report_of(tmp_path / "out" / REPORT_NAME)
    assert [f["status"] for f in report["files"]] == ["ok"] * N_KILL
    for source in sorted(src.glob("*.wav")):
        output = tmp_path / "out" / source.name
        assert sf.info(str(output)).frames == sf.info(str(source)).frames // FRAME_SIZE * FRAME_SIZE
    assert partials(tmp_path / "out") == []  # the dead actor's temporary is gone too


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "2"], "--workers only apply with --backend ray"),
        (
            ["--ray-address", "auto", "--gpus-per-worker", "1"],
            "--ray-address, --gpus-per-worker only apply with --backend ray",
        ),
        (["--backend", "ray", "--workers", "0"], "--workers must be at least 1"),
        (["--backend", "ray", "--gpus-per-worker", "1"], "--gpus-per-worker with --device cpu"),
    ],
)
def test_ray_options_are_checked_before_anything_loads(args, message, tiny_inplace, corpus, tmp_path) -> None:
    result = infer(tiny_inplace, corpus[0], tmp_path / "out", *args)
    assert_no_traceback(result)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_it_is_one_line(tiny_inplace, corpus, tmp_path, monkeypatch) -> None:
    import sys

    from moshi_ttt.backends.ray import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(MoshiTTTError, match=r"install 'moshi-ttt\[ray\]'"):
        require_ray()
    result = infer(tiny_inplace, corpus[0], tmp_path / "out", "--backend", "ray")
    assert_no_traceback(result)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --backend ray needs Ray: pip install 'moshi-ttt[ray]'"


def test_score_on_ray_writes_what_a_local_score_writes(tiny_inplace, corpus, tmp_path) -> None:
    """`score` is a job kind of the same worker: on Ray actors it gives the local run's arrays."""
    from moshi_ttt.options import ScoreOptions
    from moshi_ttt.report.schema import SCORES_REPORT_NAME

    src, _ = corpus
    scoring = replace(options(tiny_inplace), text=False, score=ScoreOptions())
    local = run_batch(src, tmp_path / "local", scoring, SilentEvents())
    remote = run_batch(
        src, tmp_path / "ray", replace(scoring, backend="ray", ray=RayOptions(workers=2)), SilentEvents()
    )
    assert local.exit_code == remote.exit_code == 1  # the bad file failed in both
    arrays = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.nll.npy"))
    assert arrays and arrays == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.nll.npy"))
    for rel in arrays:
        assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    ours = report_of(tmp_path / "ray" / SCORES_REPORT_NAME)
    assert ours["settings"]["score"]["user_stream"] == "silence" and ours["settings"]["backend"] == "ray"
    assert ours["totals"]["scores"] == report_of(tmp_path / "local" / SCORES_REPORT_NAME)["totals"]["scores"]
