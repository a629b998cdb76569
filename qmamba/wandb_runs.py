"""Read local W&B run folders, fully offline: name, group, job type, config, summary and history of each run.

wandb 0.31 writes no ``wandb-summary.json`` / ``config.yaml`` for offline runs and ships no Python reader for the
binary ``run-<id>.wandb`` log, so this module parses that file itself. The format, as checked on files written by
wandb 0.31 (wandb-core):

- a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` as little-endian uint16 (bytes ``e1 be``) and a version
  byte ``0``;
- then the LevelDB log format: 32 KiB blocks counted from byte 0 of the file (the first block holds the file header),
  each holding records with a 7-byte header ``crc: uint32 LE, length: uint16 LE, type: uint8`` (FULL=1, FIRST=2,
  MIDDLE=3, LAST=4) and ``length`` payload bytes. A record never crosses a block boundary: a longer payload is split
  into FIRST, MIDDLE..., LAST fragments, and when fewer than 7 bytes are left in a block the writer fills them with
  zeros;
- the checksum is NOT LevelDB's masked crc32c: it is plain zlib CRC-32 (IEEE) over the type byte followed by the
  payload, unmasked. It is checked for every record (``zlib.crc32`` is cheap);
- each reassembled payload is a serialized ``wandb.proto.wandb_internal_pb2.Record`` (``run``, ``config``,
  ``history``, ``summary``, ``metric``, ``exit``, ... in its ``record_type`` oneof). wandb-core writes, before each
  history row, a summary record holding the summary that row produces (including ``define_metric`` aggregates such
  as ``{"min": ...}``), and writes the ``exit`` record only from ``run.finish()`` (or the exit hook).

What counts as an error (:class:`RunReadError`) and what does not:

- no ``.wandb`` file, an empty one, or one whose header is not the W&B header: error;
- a corrupt record anywhere (bad checksum, bad type, a length that crosses its block, fragments out of order, a
  payload that is not a ``Record``, non-zero block padding): error naming the byte offset. The writer only appends
  whole byte ranges, so a killed process leaves a *short* file, never wrong bytes: a checksum mismatch is corruption
  even in the last record;
- a file that simply stops -- in a record header, in a payload, between the fragments of a record, or in a zero-filled
  tail (space the file system allocated but never got written) -- is a run that was cut off: the intact records before
  that point are read and ``finished`` is ``False``;
- no ``run`` record: error. Note that a run killed early (``kill -9``, an OOM kill, a SIGTERM without handler) in
  wandb 0.31 usually leaves ONLY the 7-byte header: wandb-core buffers its writes and a forced shutdown drops the
  buffer, so nothing of such a run can be read.

Typical use::

    runs, problems = find_runs("runs")          # the project dir, its wandb/ dir, or one run folder
    for run in runs:
        print(run.name, run.group, run.summary.get("eval/fp/perplexity"))
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_LEN = 32768
RECORD_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8})_(\d{6})-(.+)$")


class RunReadError(ValueError):
    """A run folder that cannot be read; the message names the folder and what is wrong with it."""


@dataclass
class RunRecord:
    """One W&B run as read from its local folder (or from the W&B API by :func:`fetch_api_runs`).

    ``config`` and ``summary`` are plain dicts of JSON-decoded values (nested dicts stay nested, as in
    ``wandb.Api().run(...).config``); wandb's internal keys are dropped (``_wandb`` from the config, every top-level
    ``_``-key from the summary). ``history`` holds one dict per logged row, with ``_step`` but without the other
    ``_``-keys (``_runtime``, ``_timestamp``). ``started`` is the start time in UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
    (microseconds, so that runs started in the same second still sort right; the folder name's local time, without
    ``Z``, only if the run record has no start time).
    ``finished`` says whether the run wrote its exit record; ``exit_code`` is that record's code (``None`` without it).
    """

    id: str
    name: str
    group: str
    job_type: str
    project: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    started: str = ""
    finished: bool = False
    exit_code: int | None = None


# --------------------------------------------------------------------------------------------------- the .wandb log


def _records(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for each complete record of a ``.wandb`` file, checksums checked.

    Stops quietly where the file is cut off; raises :class:`RunReadError` on corruption. ``offset`` is the byte offset
    of the record's header (of its FIRST fragment for a fragmented record).
    """

    def corrupt(offset: int, what: str) -> RunReadError:
        return RunReadError(f"{where}: corrupt record at byte offset {offset}: {what}")

    pos, size = len(FILE_HEADER), len(data)
    parts: list[bytes] = []
    start = -1  # offset of the FIRST fragment of the record being reassembled; -1 when none is
    while pos < size:
        block_left = BLOCK_LEN - pos % BLOCK_LEN
        if block_left < RECORD_HEADER_LEN:  # block trailer: zero padding
            if data[pos:pos + block_left].strip(b"\0"):
                raise corrupt(pos, f"non-zero padding in the last {block_left} bytes of a block")
            pos += block_left
            continue
        if pos + RECORD_HEADER_LEN > size:
            return  # cut off inside a record header
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:
            if data[pos:].strip(b"\0"):
                raise corrupt(pos, "zero-filled record header followed by more data")
            return  # a zero-filled tail: space allocated but never written
        if not FULL <= kind <= LAST:
            raise corrupt(pos, f"unknown record type {kind}")
        end = pos + RECORD_HEADER_LEN + length
        if length > block_left - RECORD_HEADER_LEN:
            raise corrupt(pos, f"length {length} runs past the end of its 32 KiB block")
        if end > size:
            return  # cut off inside a payload
        if zlib.crc32(data[pos + RECORD_HEADER_LEN - 1:end]) != crc:  # type byte + payload
            raise corrupt(pos, "checksum mismatch")
        payload = data[pos + RECORD_HEADER_LEN:end]
        if kind in (FULL, FIRST):
            if parts:
                raise corrupt(pos, f"a new record starts inside the fragmented record begun at byte offset {start}")
            if kind == FULL:
                yield pos, payload
            else:
                start, parts = pos, [payload]
        else:
            if not parts:
                raise corrupt(pos, f"{'MIDDLE' if kind == MIDDLE else 'LAST'} fragment without a FIRST fragment")
            parts.append(payload)
            if kind == LAST:
                yield start, b"".join(parts)
                parts = []
        pos = end
    # Ending with `parts` pending: cut off between the fragments of a record.


def _find_log(folder: Path) -> Path:
    logs = sorted(p for p in folder.glob("*.wandb") if p.is_file())
    if not logs:
        raise RunReadError(f"{folder}: no .wandb file in this run folder")
    if len(logs) > 1:
        m = RUN_FOLDER.match(folder.name)
        named = [p for p in logs if m and p.name == f"run-{m.group(3)}.wandb"]
        if len(named) != 1:
            raise RunReadError(f"{folder}: several .wandb files ({', '.join(p.name for p in logs)}), cannot tell which")
        return named[0]
    return logs[0]


# ------------------------------------------------------------------------------------------------ decoding records


def _path(item: Any) -> list[str]:
    """The key path of a config / summary / history item: ``nested_key`` when given, else ``[key]``."""
    return list(item.nested_key) or [item.key]


def _json(text: str) -> Any:
    """Decode a ``value_json`` (NaN / Infinity included); text that is not JSON is kept as the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _history_value(item: Any) -> Any:
    kind = item.WhichOneof("value")  # newer writers may use the typed fields instead of value_json
    if kind is None:
        return _json(item.value_json)
    if kind == "none":
        return None
    if kind == "json":
        return _json(item.json)
    return getattr(item, kind)


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[path[-1]] = value


def _remove(tree: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    tree.pop(path[-1], None)


def _apply(tree: dict[str, Any], record: Any) -> None:
    """Apply a ConfigRecord / SummaryRecord (``update`` items, then ``remove`` items) to ``tree``."""
    for item in record.update:
        _set(tree, _path(item), _json(item.value_json))
    for item in record.remove:
        _remove(tree, _path(item))


def _has_summary_option(metric: Any) -> bool:
    s = metric.summary
    return any((s.min, s.max, s.mean, s.best, s.last, s.none, s.first))


def _utc(seconds: int, nanos: int) -> str:
    when = datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=nanos // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _started_from_folder(folder: Path) -> str:
    """The folder name's timestamp (the writer's local time, so without the ``Z``), or ``""``."""
    m = RUN_FOLDER.match(folder.name)
    if not m:
        return ""
    d, t = m.group(1), m.group(2)
    return f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}"


def read_run(folder: str | Path) -> RunRecord:
    """Read one local run folder (``.../wandb/offline-run-<time>-<id>`` or ``run-<time>-<id>``).

    Also accepts the path of the ``.wandb`` file itself. Raises :class:`RunReadError` when the folder has no readable
    ``.wandb`` log, the log is corrupt, or it holds no run record; a log cut off at the end (killed process) is read
    up to the cut, with ``finished=False``. See the module docstring for the format and the exact rules.

    The summary is rebuilt the way W&B builds a run's summary: records are applied in the order written, summary
    updates set (or remove) keys and each history row sets its keys to the row's values, so an explicit summary
    update wins over history rows logged before it and loses to rows logged after it. Keys whose ``define_metric``
    asks for aggregates (``summary="min"`` etc.) are left to the summary records, which carry those aggregates.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".wandb":
        folder = folder.parent
    if not folder.is_dir():
        raise RunReadError(f"{folder}: not a run folder (no such directory)")
    log = _find_log(folder)
    try:
        data = log.read_bytes()
    except OSError as e:
        raise RunReadError(f"{folder}: cannot read {log.name}: {e.strerror or e}") from e
    if not data:
        raise RunReadError(f"{folder}: {log.name} is empty (0 bytes)")
    if data[:len(FILE_HEADER)] != FILE_HEADER:
        if data[:4] == FILE_HEADER[:4] and data[4:6] == FILE_HEADER[4:6] and len(data) >= len(FILE_HEADER):
            raise RunReadError(f"{folder}: {log.name} has .wandb format version {data[6]}, this reader knows 0")
        raise RunReadError(f"{folder}: {log.name} is not a W&B log (bad header {data[:len(FILE_HEADER)]!r}, "
                           f"expected {FILE_HEADER!r})")

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    where = str(folder)
    run: RunRecord | None = None
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    aggregated: list[str] = []  # names / globs of metrics whose summary is an aggregate, not the last value
    finished, exit_code = False, None
    for offset, payload in _records(data, where):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as e:
            raise RunReadError(f"{where}: corrupt record at byte offset {offset}: not a W&B Record ({e})") from e
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            if run is None:
                run = RunRecord(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                                project=r.project, path=folder)
                run.started = (_utc(r.start_time.seconds, r.start_time.nanos) if r.start_time.seconds
                               else _started_from_folder(folder))
            else:  # a later run record (the run was renamed, ...) updates what it sets
                for attr, value in (("name", r.display_name), ("group", r.run_group), ("job_type", r.job_type),
                                    ("project", r.project)):
                    if value:
                        setattr(run, attr, value)
            _apply(config, r.config)
            _apply(summary, r.summary)
        elif kind == "config":
            _apply(config, record.config)
        elif kind == "summary":
            _apply(summary, record.summary)
        elif kind == "metric":
            m = record.metric
            if _has_summary_option(m) and (m.name or m.glob_name):
                aggregated.append(m.name or m.glob_name)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                key, value = _path(item), _history_value(item)
                _set(row, key, value)
                if not any(fnmatchcase(k, pattern) for k in (key[0], ".".join(key)) for pattern in aggregated):
                    _set(summary, key, value)
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            history.append({k: v for k, v in row.items() if k == "_step" or not k.startswith("_")})
        elif kind == "exit":
            finished, exit_code = True, record.exit.exit_code
    if run is None:
        what = "holds only its header" if len(data) == len(FILE_HEADER) else "has no run record"
        raise RunReadError(f"{where}: {log.name} {what} (the run was probably killed before wandb wrote it)")
    config.pop("_wandb", None)
    run.config = config
    run.summary = {k: v for k, v in summary.items() if not k.startswith("_")}
    run.history = history
    run.finished, run.exit_code = finished, exit_code
    return run


# ------------------------------------------------------------------------------------------------------ many runs


def _run_folders(root: Path) -> Iterator[Path]:
    """Run folders at or under ``root``: not following symlinks (``latest-run``), not entering hidden dirs.

    ``root`` itself is a run folder when it is named like one, links to one (``latest-run``) or holds a ``.wandb`` file.
    """
    if RUN_FOLDER.match(root.name) or RUN_FOLDER.match(root.resolve().name) or any(root.glob("*.wandb")):
        yield root
        return
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        keep = []
        for name in dirnames:
            if RUN_FOLDER.match(name):
                if not os.path.islink(os.path.join(dirpath, name)):
                    yield Path(dirpath, name)
            elif not name.startswith("."):
                keep.append(name)
        dirnames[:] = keep


def find_runs(*roots: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Read every run folder (``offline-run-<time>-<id>``, ``run-<time>-<id>``) at or under the given roots.

    A root may be a project dir holding ``wandb/`` (searched at any depth), a ``wandb/`` dir, or one run folder.
    Returns the runs read, sorted by start time, and one line per problem: a root that does not exist or a run folder
    that cannot be read (the :class:`RunReadError` message). Finding no runs at all is not a problem.
    """
    runs: list[RunRecord] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            problems.append(f"{root}: no such file or directory")
            continue
        if not root.is_dir():
            problems.append(f"{root}: not a directory (expected a project dir, a wandb/ dir or a run folder)")
            continue
        for folder in _run_folders(root):
            key = folder.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                runs.append(read_run(folder))
            except RunReadError as e:
                problems.append(str(e))
    runs.sort(key=lambda r: (r.started, r.id))
    return runs, problems


def fetch_api_runs(path: str) -> list[RunRecord]:
    """The runs of ``"entity/project"`` (online) from ``wandb.Api().runs(path)``, as :class:`RunRecord` s.

    ``history`` stays empty (fetching it is one request per run: use ``wandb.Api().run(...).history()``), ``path`` is
    ``Path()``, ``started`` is the API's ``created_at`` and ``finished`` means the state ``"finished"``.
    """
    import wandb

    out = []
    for r in wandb.Api().runs(path):
        config = {k: v for k, v in dict(r.config).items() if k != "_wandb"}
        summary = {k: v for k, v in dict(r.summary_metrics).items() if not k.startswith("_")}
        out.append(RunRecord(id=str(r.id), name=r.name or "", group=getattr(r, "group", None) or "",
                             job_type=getattr(r, "job_type", None) or "", project=str(r.project or ""), path=Path(),
                             config=config, summary=summary, history=[],
                             started=str(getattr(r, "created_at", None) or ""),
                             finished=getattr(r, "state", "") == "finished"))
    return out
