"""Weights-only snapshots: `RUN_DIR/snapshots/step_XXXXXXXX.safetensors` and `manifest.jsonl`.

Plain torch and safetensors (no Lightning), so the offline runner reads what training wrote.
A snapshot holds the model weights after `step` optimizer updates (step 0 is the initialisation).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynascope.train.errors import DynascopeError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "snapshots" / f"step_{step:08d}.safetensors"


def read_manifest(run_dir: str | Path) -> dict[int, dict]:
    """Manifest rows by step (a step written twice, e.g. after a resume, keeps its last row)."""
    path = Path(run_dir) / "snapshots" / "manifest.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}


def write_snapshot(run_dir: str | Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write weights atomically (temporary file, then rename), then the manifest row, also atomically."""
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    row = {"step": step, "file": path.name, "sha256": sha256_file(tmp), **meta}
    os.replace(tmp, path)
    rows = read_manifest(run_dir)
    rows[step] = row
    atomic_write_text(path.parent / "manifest.jsonl", "".join(json.dumps(rows[s]) + "\n" for s in sorted(rows)))
    return path


def load_snapshot(run_dir: str | Path, step: int, verify: bool = True) -> dict[str, torch.Tensor]:
    """Load one snapshot; raises DynascopeError naming the file if it is missing, corrupt or altered."""
    path = snapshot_path(run_dir, step)
    row = read_manifest(run_dir).get(step)
    if not path.exists():
        raise DynascopeError(f"snapshot {path} does not exist")
    if verify and row is not None and sha256_file(path) != row["sha256"]:
        raise DynascopeError(f"snapshot {path} does not match the sha256 in its manifest; the file is corrupt")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad headers and truncation
        raise DynascopeError(f"snapshot {path} cannot be read ({e}); the file is corrupt") from None


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "snapshots" / "manifest.jsonl").exists():
        raise DynascopeError(f"{run_dir} is not a dynascope run directory (no snapshots/manifest.jsonl)")
    return run_dir
