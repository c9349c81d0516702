"""Atomic writes and JSON-lines reads for every file of a run directory.

A file is written to a temporary name beside it, flushed to the disk, given the mode the user's umask
gives new files, and renamed over the target, and the rename is flushed too: a reader, a killed process or
a power loss sees the old file or the new one, never half of either. Every read names the file, and the
line where there is one, when the content is bad.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dynascope.core.errors import DynascopeError


def file_mode() -> int:
    """The mode open() gives a new file under the process's umask (some writers, e.g. safetensors, use 0600)."""
    try:  # read without setting it: os.umask() alone would change it for every thread for a moment
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o077)
        os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle(path: str | Path) -> None:
    """Flush a written file to the disk and give it the umask's mode."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, file_mode())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; once the block has written it, it is flushed to the disk and
    renamed over `path` (the rename flushed too); removed when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        settle(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable(directory: str | Path) -> Path:
    """Create `directory` if needed and check that files can be written in it, before any work is done."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check"):
            pass
    except OSError as e:
        raise DynascopeError(f"{directory} is not writable ({e.strerror}); make it writable or write "
                             "elsewhere") from None
    return directory


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DynascopeError(f"{what} {path} is not valid JSON ({e}); restore or delete it") from None
    if not isinstance(value, dict):
        raise DynascopeError(f"{what} {path} holds {type(value).__name__}, not a JSON object; restore or delete it")
    return value


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML mapping; a missing file or bad YAML is an error naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DynascopeError(f"{what} {path} not found")
    try:
        value = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise DynascopeError(f"{what} {path}{line} is not valid YAML; fix it") from None
    if not isinstance(value, dict):
        raise DynascopeError(f"{what} {path} is not a YAML mapping of sections (model:, data:, ...)")
    return value


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """The JSON object on each non-empty line of `path` ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise DynascopeError(f"{what} {path} is not text; restore it or delete it") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DynascopeError(f"{what} {path} line {n} is not valid JSON ({e.msg}); "
                                 "fix or remove that line") from None
        if not isinstance(row, dict):
            raise DynascopeError(f"{what} {path} line {n} is not a JSON object; fix or remove that line")
        rows.append(row)
    return rows
