"""Reports, journals and shard parts from anywhere (a crash, an older version, a hand edit, a
hostile file): whatever their bytes, reading them (a resume, `report merge`, `plot`) gives a
clean result or one `MoshiTTTError` line naming the file, never a traceback of another kind.
Bounded with hypothesis so CI stays fast."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moshi_ttt.errors import MoshiTTTError
from moshi_ttt.report.history import EarlierResults
from moshi_ttt.report.plot import read_report
from moshi_ttt.report.schema import REPORT_NAME, REPORT_SCHEMA
from moshi_ttt.report.shards import merge_reports, read_report_file

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)
FIELDS = ["input", "output", "status", "reason", "duration_s", "frames", "steps", "wall_s", "ttt", "transcript",
          "output_sha256", "from_earlier_run", "warnings", "scores", "made_by", "output_stat"]  # fmt: skip
# Entries that look like ours, each field of any type: what a malformed report really holds.
entries = st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS))
reports = st.fixed_dictionaries(
    {"schema": st.just(REPORT_SCHEMA), "files": st.lists(st.one_of(entries, values), max_size=4)},
    optional={"settings": values, "totals": values, "shard": values, "journal": values},
)


def read_everything(folder: Path) -> None:
    """What a resume, a merge and a plot do with the folder's report."""
    report = folder / REPORT_NAME
    found = read_report_file(report)
    EarlierResults(found).for_output(folder / "a.wav")
    read_report(report)
    merge_reports(report, lock_folder=folder)


def only_one_line_errors(folder: Path) -> None:
    try:
        read_everything(folder)
    except MoshiTTTError as exc:
        assert "\n" not in str(exc) and str(exc).strip()


@FUZZ
@given(data=reports)
@example(
    data={"schema": REPORT_SCHEMA, "files": [{"input": "a", "output": None, "status": "ok", "scores": {"frames": "x"}}]}
)
@example(
    data={
        "schema": REPORT_SCHEMA,
        "files": [{"input": "a", "output": None, "status": "ok", "scores": {"buckets": [1]}}],
    }
)
def test_any_report_shaped_json_is_read_or_refused_in_one_line(tmp_path_factory, data) -> None:
    folder = tmp_path_factory.mktemp("r")
    (folder / "a.wav").write_bytes(b"RIFF")
    (folder / REPORT_NAME).write_text(json.dumps(data, allow_nan=True))
    only_one_line_errors(folder)


@FUZZ
@given(raw=st.binary(max_size=300), journal=st.binary(max_size=300))
def test_any_bytes_as_report_and_journal_are_read_or_refused_in_one_line(tmp_path_factory, raw, journal) -> None:
    folder = tmp_path_factory.mktemp("b")
    (folder / REPORT_NAME).write_bytes(raw)
    (folder / f"{REPORT_NAME}.journal").write_bytes(journal)
    only_one_line_errors(folder)


@FUZZ
@given(part=reports)
def test_any_shard_part_given_to_merge_is_merged_or_refused_in_one_line(tmp_path_factory, part) -> None:
    folder = tmp_path_factory.mktemp("s")
    (folder / "moshi-ttt-report.shard-0-of-2.json").write_text(json.dumps(part, allow_nan=True))
    try:
        merge_reports(folder / REPORT_NAME, lock_folder=folder)
    except MoshiTTTError as exc:
        assert "\n" not in str(exc)
