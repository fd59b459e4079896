"""Plans are checked before anything runs: every input gets its own output (one naming rule, the
same for folders and manifests, or a refusal naming both inputs), an output name the filesystem
cannot hold fails that file alone, and a manifest is parsed defensively whatever its bytes.

Black-box through the CLI where a case is about what a run does; the naming rule and the
manifest reader are also fuzzed with hypothesis (bounded, so CI stays fast).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import files_under, sweep
from helpers.cli import assert_no_traceback, infer, one_error_line, report_of
from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.jobs.files import SAMPLE_RATE
from moshi_ttt.jobs.manifest import MAX_LINE_BYTES, read_manifest
from moshi_ttt.jobs.plan import TEMPORARY_OVERHEAD, output_names, plan_jobs
from moshi_ttt.report.schema import REPORT_NAME

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def trio(recordings, tmp_path: Path) -> Path:
    """`x.wav`, `x.flac` and `x.wav.flac`: three recordings whose plain output names collide."""
    folder = tmp_path / "trio"
    folder.mkdir()
    shutil.copy(recordings[0], folder / "x.wav")
    for name, source in (("x.flac", recordings[1]), ("x.wav.flac", recordings[2])):
        data, rate = sf.read(source)
        sf.write(folder / name, data, rate)
    return folder


# -- 1. two inputs, one output: one rule for every kind of input ----------------------------------------


TRIO_OUTPUTS = {"x.wav": "x.wav", "x.flac": "x.flac.wav", "x.wav.flac": "x.wav.wav"}


def check_trio(out: Path, trio: Path) -> None:
    """Each recording has its own output, named by the rule, and the report lists each once."""
    files = report_of(out / REPORT_NAME)["files"]
    assert sorted((Path(f["input"]).name, Path(f["output"]).name, f["status"]) for f in files) == sorted(
        (name, output, "ok") for name, output in TRIO_OUTPUTS.items()
    )
    assert sorted(p for p in files_under(out) if p.endswith(".wav")) == sorted(TRIO_OUTPUTS.values())
    # Three distinct recordings, three distinct outputs: nothing written twice, nothing lost.
    assert len({(out / name).read_bytes() for name in TRIO_OUTPUTS.values()}) == 3


def test_a_folder_whose_names_collide_keeps_every_recording(tiny_inplace, trio, tmp_path: Path) -> None:
    result = infer(tiny_inplace, trio, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    check_trio(tmp_path / "out", trio)


def test_a_manifest_whose_names_collide_keeps_every_recording_and_lists_a_duplicate_once(
    tiny_inplace, trio, tmp_path: Path
) -> None:
    # Today the order of these lines decides which recording loses its output.
    lines = ["x.wav.flac", "x.flac", "x.wav", "./x.wav", "sub/../x.flac"]
    (trio / "data.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in lines))
    result = infer(tiny_inplace, trio / "data.jsonl", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    check_trio(tmp_path / "out", trio)


def test_names_left_colliding_are_refused_naming_both(tiny_inplace, trio, recordings, tmp_path: Path) -> None:
    shutil.copy(recordings[0], trio / "x.flac.wav")  # x.flac's full name is taken by a recording
    result = infer(tiny_inplace, trio, tmp_path / "out")
    line = one_error_line(result)
    assert "'x.flac' and 'x.flac.wav' would both be written to 'x.flac.wav'" in line
    assert not (tmp_path / "out").exists()


def test_an_output_named_as_another_outputs_folder_takes_its_full_name(tmp_path: Path) -> None:
    names = output_names([Path("a.wav/b.wav"), Path("a.flac"), Path("c/d.wav"), Path("c.wav")], ".wav")
    assert [n.as_posix() for n in names] == ["a.wav/b.wav", "a.flac.wav", "c/d.wav", "c.wav"]
    with pytest.raises(MoshiTTTError, match="'a.flac.wav/x.wav' and 'a.flac' would both be written to 'a.flac.wav'"):
        output_names([Path("a.wav/b.wav"), Path("a.flac"), Path("a.flac.wav/x.wav")], ".wav")


def test_the_rule_is_the_same_whatever_the_order_and_the_selection() -> None:
    rels = [Path(p) for p in ("b/x.flac", "b/x.wav", "b/x.WAV.ogg", "c.mp3", "d.wav", "d.ogg")]
    names = output_names(rels, ".wav")
    assert [n.as_posix() for n in names] == [
        "b/x.flac.wav",
        "b/x.wav",
        "b/x.WAV.wav",
        "c.wav",
        "d.wav",
        "d.ogg.wav",
    ]
    assert output_names(rels[::-1], ".wav") == names[::-1]
    assert [n.as_posix() for n in output_names([Path("x.flac"), Path("X.ogg")], ".wav")] == [
        "x.flac.wav",
        "X.ogg.wav",
    ]  # one name on case-insensitive filesystems: both take their full names


# -- 2. output names the filesystem cannot hold ---------------------------------------------------------


def test_an_output_name_too_long_fails_that_file_and_reruns_keep_the_others(
    tiny_inplace, recordings, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(recordings[0], src / "a.wav")
    # Its own name fits (251 bytes), its output's (.flac) does not leave room for the temporary.
    long = src / ("n" * 247 + ".wav")
    shutil.copy(recordings[1], long)
    out = tmp_path / "out"
    for run in range(2):
        result = infer(tiny_inplace, src, out, "--format", "flac", "--quiet")
        assert_no_traceback(result)
        assert result.exit_code == 1, result.output  # a file failed: said, not dropped
        files = {Path(f["input"]).name: f for f in report_of(out / REPORT_NAME)["files"]}
        assert files["a.wav"]["status"] == ("ok" if run == 0 else "skipped")
        assert files["a.wav"]["output_sha256"] is not None  # the rerun keeps what the first run recorded
        failed = files[long.name]
        assert failed["status"] == "failed" and "name is 252 bytes long" in failed["reason"]
        assert f"at most {255 - TEMPORARY_OVERHEAD}" in failed["reason"]
    assert files_under(out) == ["a.flac", REPORT_NAME]


def test_a_single_output_name_too_long_is_refused_before_loading(tiny_inplace, recordings, tmp_path: Path) -> None:
    line = one_error_line(infer(tiny_inplace, recordings[0], tmp_path / ("o" * 240 + ".wav")))
    assert "name is 244 bytes long" in line
    assert files_under(tmp_path) == []


# -- 3. manifests parsed defensively ------------------------------------------------------------------

HOSTILE_LINES = {
    "nul_escaped": (b'{"path": "a\\u0000b.wav"}', 'line 2: the "path" holds a NUL character'),
    "nul_raw": (b'{"path": "a\x00b.wav"}', "line 2: not JSON"),
    "lone_surrogate": (b'{"path": "a\\ud800.wav"}', 'line 2: the "path" holds a lone surrogate'),
    "not_utf8": (b'{"path": "\xff.wav"}', "line 2: not UTF-8 (byte 0xff at column 11)"),
    "deep_nesting": (b"[" * 100_000, "line 2: JSON nested too deeply"),
    "huge_path": (b'{"path": "' + b"a" * 10_000_000 + b'.wav"}', f"line 2: longer than {MAX_LINE_BYTES >> 20} MiB"),
    "long_path": (b'{"path": "' + b"a/" * 3000 + b'x.wav"}', 'line 2: the "path" is 6005 bytes long'),
    "long_name": (b'{"path": "' + b"a" * 300 + b'.wav"}', 'line 2: the "path" has a name of 304 bytes'),
    "huge_integer": (b'{"path": "a.wav", "duration": ' + b"9" * 5000 + b"}", "line 2: not JSON we can read"),
    "not_an_object": (b'["a.wav"]', 'line 2: expected an object with a "path" string'),
    "path_not_a_string": (b'{"path": ["a.wav"]}', 'line 2: expected an object with a "path" string'),
    "duration_nested": (b'{"path": "a.wav", "duration": ' + b"[" * 900 + b"]" * 900 + b"}", '"duration" must be'),
    "the_folder_itself": (b'{"path": "sub/.."}', "line 2: 'sub/..' names the manifest's folder"),
}


@pytest.mark.parametrize("case", list(HOSTILE_LINES))
def test_a_hostile_manifest_line_is_one_line_naming_the_manifest_and_line(case, tiny_inplace, tmp_path: Path) -> None:
    line, reason = HOSTILE_LINES[case]
    manifest = tmp_path / "data.jsonl"
    manifest.write_bytes(b'{"path": "a.wav"}\n' + line + b"\n")
    message = one_error_line(infer(tiny_inplace, manifest, tmp_path / "out"))
    assert message.startswith(f"error: {manifest}: ") and reason in message, message
    assert len(message) < 400  # one readable line, whatever the line held
    assert not (tmp_path / "out").exists()


# -- 4. fuzzing: one line or a clean plan, whatever the manifest holds -----------------------------------


def check_plan_or_one_line(manifest: Path, out: Path) -> None:
    try:
        jobs = plan_jobs(manifest, out)
    except MoshiTTTError as exc:
        text = str(exc)
        assert "\n" not in text and len(text) < 600, text
        assert text.startswith(f"{manifest}: ")
        return
    outputs = [job.output for job in jobs]
    assert len(set(outputs)) == len(outputs)  # every recording its own output
    assert len({job.input for job in jobs}) == len(jobs)  # each recording once
    folders = {parent for output in outputs for parent in output.parents}
    assert not folders.intersection(outputs)  # no output is another's folder
    assert all(out in output.parents and manifest.parent in job.input.parents for job, output in zip(jobs, outputs))


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_any_bytes_make_one_line_or_a_clean_plan(tmp_path: Path, data: bytes) -> None:
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_bytes(data)
    check_plan_or_one_line(manifest, tmp_path / "out")


NAME_PARTS = st.sampled_from(["x", "X", "a", ".", "..", "x.wav", "x.flac", "wav", "a.b", "", " ", "é", "\\"])
PATHS = st.lists(NAME_PARTS, min_size=1, max_size=4).map(lambda parts: "/".join(parts))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), PATHS)
RECORDS = st.one_of(
    st.fixed_dictionaries({"path": PATHS}, optional={"duration": VALUES, "extra": VALUES}),
    st.dictionaries(st.sampled_from(["path", "duration"]), VALUES, max_size=2),
    VALUES,
)


@FUZZ
@given(st.lists(st.one_of(RECORDS.map(json.dumps), st.sampled_from(["", " ", "{", "]"])), max_size=12))
def test_fuzz_manifest_records_make_one_line_or_a_clean_plan(tmp_path: Path, lines: list[str]) -> None:
    """Paths built from names that collide (x.wav, x.flac, x, X, ., ..): the plan keeps every
    recording apart or refuses naming them."""
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_plan_or_one_line(manifest, tmp_path / "out")


def test_fuzz_memory_stays_bounded_on_a_line_without_end(tmp_path: Path) -> None:
    """A manifest of one endless line (here 64 MiB of '[') is refused after reading one line's worth."""
    import tracemalloc

    manifest = tmp_path / "endless.jsonl"
    with open(manifest, "wb") as handle:
        for _ in range(64):
            handle.write(b"[" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(MoshiTTTError, match="line 1: longer than"):
            read_manifest(manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_BYTES


def test_a_manifest_with_a_bom_and_blank_lines_plans_its_recordings(tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"path": "a.wav", "duration": 1.5}\n\n  \n{"path": "b/c.flac"}\n')
    jobs = plan_jobs(manifest, tmp_path / "out")
    assert [(j.output.relative_to(tmp_path / "out").as_posix(), j.duration_hint) for j in jobs] == [
        ("a.wav", 1.5),
        ("b/c.wav", None),
    ]


def test_a_manifest_recording_is_streamed_once_whatever_the_spelling(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", sweep(SAMPLE_RATE, 0.5), SAMPLE_RATE)
    lines = [{"path": "a.wav", "duration": 0.5}, {"path": "./a.wav"}, {"path": "x/../a.wav", "duration": 9}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    jobs = plan_jobs(tmp_path / "data.jsonl", tmp_path / "out")
    assert [(j.input.name, j.duration_hint) for j in jobs] == [("a.wav", 0.5)]
