"""Reads the history rows of an offline wandb run file (`run-*.wandb`), so tests can check what was logged.

The file is a 7-byte header followed by a LevelDB-style log: 32 KiB blocks of records, each with a
7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) around a
serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def _parse(data: bytes) -> list:
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(pending)
            out.append(r)
    return out


def records(path: Path, timeout: float = 60.0) -> list:
    """The run file's records once wandb has written all of them: wandb-core writes the file in its own
    process, after `finish()` has returned. Waits for the exit record, or for the file to stop growing
    for 3 s (a run killed before it could finish)."""
    start = changed = time.monotonic()
    size = -1
    while True:
        data = Path(path).read_bytes()
        parsed = _parse(data)
        if len(data) != size:
            size, changed = len(data), time.monotonic()
        now = time.monotonic()
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or now - changed > 3 or now - start > timeout:
            return parsed
        time.sleep(0.2)


def history(path: Path) -> list[dict]:
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def _updates(path: Path, kind: str) -> dict:
    """The last value of every top-level key of the run's `kind` records (summary or config)."""
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == kind:
            for i in getattr(r, kind).update:
                out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out


def summary(path: Path) -> dict:
    return _updates(path, "summary")


def config(path: Path) -> dict:
    """The run config's top-level entries, as the last update left them."""
    return _updates(path, "config")


def run_info(path: Path) -> pb.RunRecord:
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")


def metric_definitions(path: Path) -> dict[str, pb.MetricRecord]:
    """define_metric calls by metric name (or glob)."""
    return {r.metric.name or r.metric.glob_name: r.metric for r in records(path)
            if r.WhichOneof("record_type") == "metric"}
