"""The Pythia-style checkpoint schedule, weights-only snapshots, and full resume checkpoints.

Snapshots (`RUN_DIR/snapshots/step_XXXXXXXX.safetensors` + `manifest.jsonl`) hold the model weights
after `step` optimizer updates (step 0 is the initialisation). They are what analyses read, online
and offline. Resume checkpoints (`RUN_DIR/checkpoints/`, Lightning's format with optimizer, loops,
RNG and callback state) are sparser and only serve `--ckpt_path last`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from dynascope.train.errors import DynascopeError
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class CheckpointSchedule:
    """Steps 0, 1, 2, 4, ..., up to `log_cap` (powers of two), then every `every` steps, plus the final step."""

    log_cap: int = 512
    every: int = 1000

    def is_due(self, step: int, max_steps: int | None = None) -> bool:
        if step == 0 or step == max_steps:
            return True
        if step <= self.log_cap and step & (step - 1) == 0:
            return True
        return step > self.log_cap and self.every > 0 and step % self.every == 0

    def steps(self, max_steps: int) -> list[int]:
        return [s for s in range(max_steps + 1) if self.is_due(s, max_steps)]


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


class Snapshots(L.Callback):
    """Writes a weights-only snapshot at every scheduled step, including step 0 before any update."""

    def __init__(self, log_cap: int = 512, every: int = 1000):
        self.schedule = CheckpointSchedule(log_cap, every)
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step - 1
        self._maybe_write(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._maybe_write(trainer, pl_module)

    def _maybe_write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.schedule.is_due(step, trainer.max_steps):
            return  # under gradient accumulation this hook fires once per micro-batch
        self._last_step = step
        # Collective under FSDP (gathers full weights), so every rank calls it; only rank 0 writes.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            meta = {"tokens_seen": pl_module.tokens_seen(step), "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "config_hash": pl_module.arch.hash()}
            write_snapshot(trainer.default_root_dir, step, weights, meta)


class ResumeCheckpoints(ModelCheckpoint):
    """Full Lightning checkpoints in RUN_DIR/checkpoints every `every_n_steps` steps, at the end of
    training, and on SIGTERM or SIGUSR1 (under SLURM, Lightning's own SIGUSR1 requeue handler wins)."""

    def __init__(self, every_n_steps: int = 1000):
        super().__init__(filename="step_{step:08d}", auto_insert_metric_name=False, every_n_train_steps=every_n_steps,
                         save_top_k=-1, save_last=True)
        self._signalled = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "_signalled", True))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._signalled or trainer.received_sigterm:
            self._signalled = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "snapshots" / "manifest.jsonl").exists():
        raise DynascopeError(f"{run_dir} is not a dynascope run directory (no snapshots/manifest.jsonl)")
    return run_dir
