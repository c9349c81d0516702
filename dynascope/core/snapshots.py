"""Weights-only snapshots: `RUN_DIR/snapshots/step_XXXXXXXX.safetensors` and `manifest.jsonl`.

Plain torch and safetensors (no Lightning), so the offline runner reads what training wrote.
A snapshot holds the model weights after `step` optimizer updates (step 0 is the initialisation).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dynascope.core.errors import DynascopeError, first_line
from dynascope.core.io import atomic_path, read_jsonl, write_jsonl
from dynascope.core.runfiles import RunFiles


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(run_dir: str | Path) -> dict[int, dict]:
    """Manifest rows by step (a step written twice, e.g. after a resume, keeps its last row); a row without
    its step, file or sha256 is an error naming the manifest."""
    path = RunFiles(run_dir).manifest
    rows = read_jsonl(path, "snapshot manifest")
    for n, row in enumerate(rows, start=1):
        lacking = [k for k in ("step", "file", "sha256") if k not in row]
        if lacking or not isinstance(row["step"], int):
            raise DynascopeError(f"snapshot manifest {path} line {n} lacks {', '.join(lacking) or 'an integer step'}; "
                                 "restore the manifest from a copy of the run")
    return {r["step"]: r for r in rows}


def write_snapshot(run_dir: str | Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write weights atomically (temporary file, then rename), then the manifest row, also atomically."""
    path = RunFiles(run_dir).snapshot(step)
    rows = read_manifest(run_dir)  # read first: a bad manifest stops us before anything is written
    # copies: tied weights appear under two names sharing memory, which safetensors refuses
    tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()}
    finite = all(bool(t.isfinite().all()) for t in tensors.values())
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"step": str(step)})
        except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
            raise DynascopeError(f"snapshot {path} could not be written ({first_line(e)}); free space or make "
                                 "it writable, then resume with --ckpt_path last") from None
        rows[step] = {"step": step, "file": path.name, "sha256": sha256_file(tmp), **meta,
                      **({} if finite else {"nonfinite": True})}  # diverged weights: nothing measures them
    write_jsonl(RunFiles(run_dir).manifest, [rows[s] for s in sorted(rows)])
    return path


def load_snapshot(run_dir: str | Path, step: int, verify: bool = True,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load one snapshot, memory-mapped, onto `device`; raises DynascopeError naming the file if it is
    missing, corrupt or altered."""
    path = RunFiles(run_dir).snapshot(step)
    row = read_manifest(run_dir).get(step)
    if not path.exists():
        raise DynascopeError(f"snapshot {path} does not exist")
    if verify and row is not None and sha256_file(path) != row["sha256"]:
        raise DynascopeError(f"snapshot {path} does not match the sha256 in its manifest; the file is corrupt")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises several types for bad headers and truncation
        raise DynascopeError(f"snapshot {path} cannot be read ({e}); the file is corrupt") from None


def load_snapshot_tensor(run_dir: str | Path, step: int, name: str) -> torch.Tensor:
    """One tensor of a snapshot, read alone (on the CPU, not checked against the manifest)."""
    path = RunFiles(run_dir).snapshot(step)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except Exception as e:  # safetensors raises several types for bad headers, truncation and missing names
        raise DynascopeError(f"snapshot {path} cannot be read ({e}); the file is corrupt") from None
