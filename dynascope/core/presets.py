"""The presets and Slurm job templates that ship in the package (`configs/` and `slurm/` of the source tree),
so that an installed wheel finds them: `--config tiny-relu` names a preset."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def preset_names() -> list[str]:
    shipped = files("dynascope.configs").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in shipped if p.name.endswith(".yaml"))


def preset(config: str) -> str:
    """A `--config` value as a path: a file that exists as given, else the shipped preset of that name
    (`tiny-relu` or `tiny-relu.yaml`), else the value unchanged (for the caller's own error)."""
    if Path(config).exists():
        return config
    shipped = files("dynascope.configs") / Path(config).name
    for candidate in (shipped, files("dynascope.configs") / f"{Path(config).name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return config


def slurm_template(name: str) -> Path:
    """A shipped Slurm job template: train.sbatch, analyze.sbatch, zoom.sbatch."""
    return Path(str(files("dynascope.slurm") / name))
