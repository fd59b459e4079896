"""The report's journal: finished files appended one line each, so recording a file costs the same
whether the run has 10 files or 100,000.

A run keeps its report (`moshi-ttt-report.json`, or a shard's part) and, beside it, a journal
(`moshi-ttt-report.json.journal`): JSON lines, a header and then one line per finished file,

    {"schema": "moshi-ttt.journal/1", "seq": 0}
    {"seq": 1, "entry": {...the file's report entry...}}
    {"seq": 2, "entry": {...}}

Each finished file is one `write()` of one line in append mode, so a process killed at any
moment (kill -9, out-of-memory killer) loses at most the files still streaming: what `write()`
returned is in the kernel and survives the process. The line is flushed to the disk (fdatasync)
at most once a second and whenever the report is compacted: a power cut or kernel crash may lose
the last second of lines, and then those files are found again by a rerun (their outputs exist)
or redone (their outputs were lost with them); outputs themselves are never synced either.

The run rewrites the JSON report whole (*compaction*) now and then (see `driver.BatchRunner`)
and at its end; the report records the last journal line it holds (`"journal": {"seq": S}`), so
only lines with a higher `seq` are newer than it, whatever order a crash left the two files in.
After a compaction the journal is replaced by a bare header carrying `S` (atomically), so it
stays short and the sequence keeps rising across runs.

Readers (`shards.read_report_file`: a resume, `report merge`) apply the newer lines over the
report's entries, by input: the report and its journal together are always complete. A journal
line cut short (a disk that filled up mid-write, a crash mid-line) is ignored; a journal that is
not ours is refused, never replaced. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoshiTTTError

JOURNAL_SCHEMA = "moshi-ttt.journal/1"
JOURNAL_SUFFIX = ".journal"
# Lines reach the disk (fdatasync) at most this often; every line reaches the kernel at once.
SYNC_EVERY_S = 1.0
_HEADER_START = b'{"schema": "' + JOURNAL_SCHEMA.encode() + b'"'


def journal_path(report: Path) -> Path:
    """The journal of `report`: beside it, its name plus `.journal` (no output, transcript or
    report part is ever named so)."""
    return report.with_name(report.name + JOURNAL_SUFFIX)


def _header(seq: int) -> bytes:
    return _HEADER_START + b', "seq": ' + str(seq).encode() + b"}\n"


@dataclass
class JournalLines:
    """What a journal holds beyond a given line: its entries in the order they were appended."""

    entries: list[dict]
    last_seq: int  # the highest seq in the file (header included)
    mtime_ns: int
    seqs: list[int] = field(default_factory=list)  # each entry's seq

    def after(self, seq: int) -> list[dict]:
        """The entries newer than a report holding every line up to `seq`."""
        return [entry for line, entry in zip(self.seqs, self.entries, strict=True) if line > seq]


def read_journal(report: Path, after: int = 0) -> JournalLines | None:
    """The entries of `report`'s journal with a seq above `after` (None if there is no journal).
    Raises `MoshiTTTError` naming the file when it is not a moshi-ttt journal."""
    path = journal_path(report)
    try:
        raw = path.read_bytes()
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MoshiTTTError(f"cannot read: {exc.strerror or exc}", path) from None
    lines = raw.split(b"\n")
    complete = lines[:-1]  # the last piece follows the last newline: empty, or a line cut short
    if not complete:
        if _HEADER_START.startswith(raw[: len(_HEADER_START)]):
            return JournalLines([], 0, mtime_ns)  # created, its header cut short: nothing in it yet
        raise MoshiTTTError("exists and is not a moshi-ttt journal; refusing to replace it", path)
    header = _parse(complete[0])
    if header is None or header.get("schema") != JOURNAL_SCHEMA or not _is_seq(header.get("seq")):
        raise MoshiTTTError("exists and is not a moshi-ttt journal; refusing to replace it", path)
    last = header["seq"]
    entries, seqs = [], []
    for number, line in enumerate(complete[1:], start=2):
        record = _parse(line)
        if record is None or not _is_seq(record.get("seq")) or not isinstance(record.get("entry"), dict):
            raise MoshiTTTError(f"malformed journal line {number}; move the journal away to go on", path)
        last = max(last, record["seq"])
        if record["seq"] > after:
            entries.append(record["entry"])
            seqs.append(record["seq"])
    return JournalLines(entries, last, mtime_ns, seqs)


def _parse(line: bytes) -> dict | None:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _is_seq(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def report_seq(data: dict) -> int:
    """The last journal line a report's JSON holds (0: none, or a report older than journals)."""
    info = data.get("journal")
    seq = info.get("seq") if isinstance(info, dict) else None
    return seq if _is_seq(seq) else 0


def fold(data: dict, entries: list[dict]) -> dict:
    """`data` (a report's JSON) with journal `entries` applied in order: an entry replaces the
    report's entry of the same input, or is added after the others."""
    if not entries:
        return data
    files = list(data["files"])
    where = {f.get("input"): i for i, f in enumerate(files) if isinstance(f, dict)}
    for entry in entries:
        key = entry.get("input")
        if key in where:
            files[where[key]] = entry
        else:
            where[key] = len(files)
            files.append(entry)
    return {**data, "files": files}


class Journal:
    """The appending end of a report's journal, for the run that holds the report's lock.

    `append(text)` writes one line (`text` is the entry's JSON, `schema.entry_text`) and returns
    its seq; `compacted(seq)` is called once the report holding every line up to `seq` is on
    disk, and replaces the journal by a bare header. `close()` syncs what is left."""

    def __init__(self, report: Path, sync_every_s: float = SYNC_EVERY_S):
        self.report = Path(report)
        self.path = journal_path(self.report)
        self.sync_every_s = sync_every_s
        self._fd: int | None = None
        self._last_sync = 0.0
        self._unsynced = False
        self.seq = 0  # the last seq written (or found)

    def open(self, report_seq: int | None = None) -> Journal:
        """Open for appending after what is there (refusing a file that is not ours). Lines of an
        earlier run that its report does not hold stay until this run's first compaction.
        `report_seq`: the report's `journal.seq` where the caller read it (else it is read here
        when there is no journal to continue: the numbers must keep rising past the report's)."""
        found = read_journal(self.report)
        seq = found.last_seq if found is not None else 0
        if found is None or (found.last_seq == 0 and not found.entries):
            seq = max(seq, self._report_seq() if report_seq is None else report_seq)
            self._replace(seq)
        self.seq = seq
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._cut_torn_tail()
        return self

    def _report_seq(self) -> int:
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            data = json.loads(self.report.read_bytes())
            if isinstance(data, dict):
                return report_seq(data)
        return 0

    def _cut_torn_tail(self) -> None:
        """A line cut short by a crash would swallow the next one: drop it before appending."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        while True:
            block = os.pread(self._fd, size - start, start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                os.ftruncate(self._fd, start + cut + 1)
                return
            if start == 0:
                os.ftruncate(self._fd, 0)
                os.write(self._fd, _header(self.seq))
                return
            start = max(0, start - (1 << 20))

    def append(self, text: str) -> int:
        """Append one finished file's entry; returns its seq. A write cut short (disk full) is
        undone and raised as OSError: the journal never keeps half a line."""
        assert self._fd is not None, "open() first"
        seq = self.seq + 1
        line = f'{{"seq": {seq}, "entry": {text}}}\n'.encode()
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "No space left on device")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self.seq = seq
        self._unsynced = True
        now = time.monotonic()
        if now - self._last_sync >= self.sync_every_s:
            self.sync()
        return seq

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fdatasync(self._fd)
            self._unsynced = False
            self._last_sync = time.monotonic()

    def compacted(self, seq: int) -> None:
        """The report on disk holds every line up to `seq`: start the journal again from there."""
        if self._fd is None or seq != self.seq:
            return  # lines were appended since: they stay until the next compaction
        self._replace(seq)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._unsynced = False

    def _replace(self, seq: int) -> None:
        reset_journal(self.report, seq)

    def close(self, remove: bool = False) -> None:
        """Stop appending. `remove`: the report on disk holds every line (it was just compacted),
        so the journal goes: a finished run leaves its report alone."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = None
        if remove:
            remove_journal(self.report)


def reset_journal(report: Path, seq: int) -> None:
    """Replace `report`'s journal by a bare one carrying `seq` (the last line the report on disk
    holds), atomically: a crash leaves the old journal, whose lines up to `seq` are ignored."""
    from ..jobs.files import atomic_output  # a temporary a killed run leaves is cleaned up as any

    with atomic_output(journal_path(Path(report))) as tmp:
        tmp.write_bytes(_header(seq))


def remove_journal(report: Path) -> None:
    """Remove `report`'s journal once the report on disk holds all its lines."""
    with contextlib.suppress(FileNotFoundError):
        journal_path(Path(report)).unlink()
