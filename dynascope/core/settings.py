"""Settings of a resolved `dynascope fit` config: flattened, the ones that shape a run's trajectory, and how
runs are named by the settings in which they differ."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from dynascope.core.errors import DynascopeError

# Settings that shape the trajectory; trainer.max_steps only where it is the cosine schedule's length.
TRAJECTORY = ("seed_everything", "model", "data", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
              "trainer.gradient_clip_algorithm", "trainer.precision", "trainer.devices", "trainer.num_nodes")
NOT_TRAJECTORY = ("model.compile", "data.cache_dir")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"model": {"arch": {"activation": "relu"}}} -> {"model.arch.activation": ...}."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def trajectory(config: dict) -> dict[str, Any]:
    """The settings of a resolved fit config (or a run's config.yaml) that shape the trajectory, flattened."""
    flat = flatten(config)
    chosen = {k: v for k, v in flat.items() if k.startswith(TRAJECTORY) and not k.startswith(NOT_TRAJECTORY)}
    if flat.get("model.decay_steps") is None:
        chosen["trainer.max_steps"] = flat.get("trainer.max_steps")
    return chosen


def measured(config: dict) -> dict[str, Any]:
    """The settings of a resolved fit config (or a run's config.yaml) that say what is measured: the analyses,
    their options and the probe set, flattened (a resume must keep them, or the record would mix two kinds of
    measurement under one name)."""
    return {k: v for k, v in flatten(config).items()
            if k.startswith(("dynamics.analyses", "dynamics.options", "dynamics.probe_"))}


def trajectory_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(trajectory(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def value_text(value: Any) -> str:
    """A setting's value as the command line takes it (and as run names show it)."""
    return value if isinstance(value, str) else json.dumps(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last part (`model.arch.activation` -> `activation`), unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: part if last.count(part) == 1 else k for k, part in zip(keys, last, strict=True)}


def check_named_options(options: dict[str, dict], registry: dict[str, Callable], option: str, what: str,
                        fixed: int) -> None:
    """`options` maps names of `registry` (analyses, outputs) to keyword arguments of their constructors, which
    take `fixed` arguments first: every name is registered and takes each option given for it."""
    unknown = sorted(set(options) - set(registry))
    if unknown:
        raise DynascopeError(f"{option} names unknown {what} {unknown}; registered: {', '.join(registry)}")
    for name, kwargs in options.items():
        if not isinstance(kwargs, dict):
            raise DynascopeError(f"{option}.{name}={kwargs!r}: give a mapping of option names to values")
        accepted = list(inspect.signature(registry[name]).parameters)[fixed:]
        bad = sorted(set(kwargs) - set(accepted))
        if bad:
            raise DynascopeError(f"{option}.{name}: unknown option(s) {bad}; {name} takes {accepted}")
