"""`dynascope sweep`: one `dynascope fit` per combination of a grid of settings, here or as a Slurm array job.

    dynascope sweep --config configs/tiny-relu.yaml --grid "seed=1,2 model.arch.activation=relu,gelu" --out DIR
    dynascope sweep --config C --grid grid.yaml --out DIR --slurm [--sbatch="--gres=gpu:1 ..."] [fit arguments]

The grid is the cartesian product of its `KEY=V1,V2,...` entries, or of a YAML file mapping keys to lists
of values. A key is a `dynascope fit` option without its dashes (`model.arch.activation`,
`trainer.max_steps`); `seed` sets both of a run's seeds, `seed_everything` (initialisation) and
`data.seed` (batch windows). Each combination trains into DIR/<its values>, e.g. `seed=1,activation=relu`
(each key by its last part unless two keys share it), with the fit arguments given to every run.
DIR/sweep.tsv lists the runs, one line each: the run's wandb tags, then its own `dynascope fit`
arguments, tab-separated. Here the runs train one after another; with `--slurm` they are one array job
of slurm/train.sbatch, whose task i reads line i of that file (`DYNASCOPE_SWEEP` names it).

Every run starts with `--ckpt_path auto`, so the same sweep started again resumes its unfinished runs
and leaves finished ones as they are. wandb: the runs of a sweep share a group, the sweep directory's
name, and are tagged with their grid values (`seed=1`, `activation=relu`); they are passed as the
environment variables WANDB_RUN_GROUP and WANDB_TAGS, which wandb reads itself, so `fit` needs no
options for them.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynascope.core.errors import DynascopeError
from dynascope.core.io import atomic_write_text, ensure_writable, read_yaml
from dynascope.core.presets import slurm_template
from dynascope.core.settings import short_keys, value_text

MANIFEST = "sweep.tsv"
TEMPLATE = slurm_template("train.sbatch")
SEED_KEYS = ("seed_everything", "data.seed")  # what the grid key `seed` sets


def read_grid(text: str) -> dict[str, list]:
    """`--grid`: "KEY=V1,V2 KEY=V1,V2 ..." or a YAML file {KEY: [V1, V2], ...}."""
    if text.endswith((".yaml", ".yml")):
        grid = {k: v if isinstance(v, list) else [v] for k, v in read_yaml(text, "sweep grid").items()}
    else:
        grid = {}
        for entry in text.split():
            key, _, values = entry.partition("=")
            if not key or not values:
                raise DynascopeError(f"--grid entry {entry!r}: give KEY=V1,V2,..., e.g. seed=1,2")
            grid[key.removeprefix("--")] = values.split(",")
    if not grid or not all(grid.values()):
        raise DynascopeError(f"--grid {text!r}: give at least one key with at least one value")
    if "trainer.default_root_dir" in grid:
        raise DynascopeError("--grid: the sweep sets trainer.default_root_dir of each run; leave it out of the grid")
    return grid


def expand(grid: dict[str, list]) -> dict[str, dict[str, Any]]:
    """{run name: {key: value}} for every combination of the grid."""
    short = short_keys(list(grid))
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return {",".join(f"{short[k]}={value_text(v)}" for k, v in c.items()).replace("/", "_"): c for c in combos}


def run_arguments(values: dict[str, Any], run_dir: Path) -> list[str]:
    """A run's own `dynascope fit` arguments: its grid values and its directory."""
    args = [f"--{k}={value_text(v)}" for key, v in values.items() for k in (SEED_KEYS if key == "seed" else [key])]
    return [*args, f"--trainer.default_root_dir={run_dir}"]


def sbatch_command(config: str, manifest: Path, n_runs: int, fit_args: list[str],
                   sbatch_args: Sequence[str] = ()) -> list[str]:
    """The array job: task i of slurm/train.sbatch trains the run on line i of the manifest."""
    return ["sbatch", "--parsable", f"--array=0-{n_runs - 1}", f"--job-name=sweep-{manifest.parent.name}",
            f"--output={manifest.parent}/slurm-%A_%a.out", *sbatch_args, str(TEMPLATE), config, *fit_args]


def sweep(config: str, grid: dict[str, list], out_dir: str | Path, fit_args: list[str], slurm: bool = False,
          sbatch_args: Sequence[str] = ()) -> list[Path] | str:
    """Train every combination of `grid` into `out_dir`/<name>: here, one run after another (returns the run
    directories), or as one Slurm array job (returns its job id)."""
    if any(a.split("=")[0] == "--trainer.default_root_dir" for a in fit_args):
        raise DynascopeError("the sweep sets trainer.default_root_dir of each run (under --out); leave it out")
    out = ensure_writable(out_dir).resolve()
    runs = {name: run_arguments(values, out / name) for name, values in expand(grid).items()}
    manifest = out / MANIFEST
    atomic_write_text(manifest, "".join("\t".join([name, *args]) + "\n" for name, args in runs.items()))
    env = {**os.environ, "WANDB_RUN_GROUP": out.name}
    if slurm:  # the jobs run the sbatch caller's environment, this one's venv included
        env |= {"DYNASCOPE_SWEEP": str(manifest), "DYNASCOPE_VENV": os.environ.get("DYNASCOPE_VENV", sys.prefix)}
        submitted = subprocess.run(sbatch_command(config, manifest, len(runs), fit_args, sbatch_args),
                                   env=env, capture_output=True, text=True)
        if submitted.returncode != 0:
            raise DynascopeError(f"sbatch refused the sweep: {submitted.stderr.strip()}")
        return submitted.stdout.strip().split(";")[0]
    for i, (name, args) in enumerate(runs.items(), start=1):
        command = [sys.executable, "-m", "dynascope.cli", "fit", "--config", config, "--ckpt_path", "auto", *fit_args,
                   *args]
        print(f"dynascope sweep: run {i} of {len(runs)}: {shlex.join(['dynascope', *command[3:]])}", flush=True)
        done = subprocess.run(command, env=env | {"WANDB_TAGS": name})
        if done.returncode != 0:
            raise DynascopeError(f"sweep run {out / name} failed (exit {done.returncode}, output above); fix it and "
                                 "start the same sweep again: finished runs are kept, unfinished ones resume")
    return [out / name for name in runs]
