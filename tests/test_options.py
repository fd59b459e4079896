"""`RunOptions`: one frozen object, validated once, every check and implication in `validate()`,
errors naming the setting (the CLI names its flag), no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from moshi_ttt.options import OptionError, RayOptions, RunOptions, Sampling, ScoreOptions


def test_validate_gives_the_canonical_form_and_is_idempotent() -> None:
    options = RunOptions(channel="left", batch_size="8", text_format="srt", delta_clip="0", shard="1/4")
    valid = options.validate()
    assert (valid.channel, valid.batch_size, valid.text, valid.delta_clip) == (0, 8, True, "none")
    assert (valid.shard.index, valid.shard.count) == (1, 4)
    assert valid.validate() == valid  # a worker may validate what its driver validated
    assert valid.ttt_overrides() == {"delta_clip": None, "delta_clip_origin": "--delta-clip"}
    assert RunOptions().validate().ttt_overrides() == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        valid.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "options, setting",
    [
        (RunOptions(seed=-1), "seed"),
        (RunOptions(seed=2**32), "seed"),
        (RunOptions(threads=0), "threads"),
        (RunOptions(threads=100_000), "threads"),
        (RunOptions(batch_size="lots"), "batch_size"),
        (RunOptions(decode_chunk=0), "decode_chunk"),
        (RunOptions(channel="middle"), "channel"),
        (RunOptions(text_format="doc"), "text_format"),
        (RunOptions(audio_format="mp4"), "audio_format"),
        (RunOptions(device="tpu"), "device"),
        (RunOptions(delta_clip="-1"), "delta_clip"),
        (RunOptions(shard="4/4"), "shard"),
        (RunOptions(sampling=Sampling(temp=0.0)), "sampling.temp"),
        (RunOptions(sampling=Sampling(top_k=0)), "sampling.top_k"),
        (RunOptions(ray=RayOptions(workers=2)), "ray.workers"),  # only with backend ray
        (RunOptions(backend="ray", ray=RayOptions(workers=0)), "ray.workers"),
        (RunOptions(backend="ray", device="cpu", ray=RayOptions(gpus_per_worker=1)), "ray.gpus_per_worker"),
        (RunOptions(score=ScoreOptions(user_stream="echo")), "score.user_stream"),
        (RunOptions(score=ScoreOptions(bucket_seconds=0)), "score.bucket_seconds"),
        (RunOptions(score=ScoreOptions(), text=True), "text"),  # scoring writes no transcript
        (RunOptions(score=ScoreOptions(), sampling=Sampling(greedy=True)), "sampling"),  # nor samples
        (RunOptions(score=ScoreOptions(), decode_chunk=4), "decode_chunk"),
    ],
)
def test_every_bad_setting_is_refused_naming_it(options: RunOptions, setting: str) -> None:
    with pytest.raises(OptionError) as error:
        options.validate()
    assert error.value.setting == setting and str(error.value).startswith(setting)


def test_ray_settings_given_without_ray_are_named_together() -> None:
    with pytest.raises(OptionError) as error:
        RunOptions(ray=RayOptions(address="auto", gpus_per_worker=1)).validate()
    assert error.value.setting == "ray.address, ray.gpus_per_worker"


def test_options_and_the_api_load_no_torch() -> None:
    code = (
        "import sys, moshi_ttt; from moshi_ttt import RunOptions, run_batch; "
        "RunOptions(batch_size='4').validate(); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
