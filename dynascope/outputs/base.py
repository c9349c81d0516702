"""The output floor's interface: a `Sink` takes a run's records, and a `Destination` says whose they are.

Every output of a run (metrics.jsonl, metrics.csv, metrics.parquet, summary.json, tables/, the wandb run)
is a `Sink`: it receives metrics rows, summary events and tables by step, as upserts (writing a step again
leaves one value per key), is told when a resumed run rewinds to a step, and is finalized once at the end
(with the run's pictures, for the sinks that show them). A sink registers itself by its `name`; adding an
output is a new module with one `Sink` subclass, imported in `dynascope/outputs/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dynascope.core.records import Table
from dynascope.core.runfiles import RecordFiles, RunFiles
from dynascope.core.settings import check_named_options

SINKS: dict[str, type[Sink]] = {}


@dataclass
class Destination:
    """Where a recorder writes and what its records describe: the directory of its files (a run directory, its
    `analysis/`, or an `analyze --hf` output directory), the run they belong to (if any), and what names and
    groups the run elsewhere (its resolved config, a display name, a group, tags and the kind of job)."""

    files: RecordFiles
    run: RunFiles | None = None
    config: dict | None = None
    name: str = ""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


class Sink:
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SINKS[cls.name] = cls

    def __init__(self, destination: Destination):
        self.destination = destination

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        """One row of values at `step` (`label`, where present, names the checkpoint)."""

    def log_summary(self, summary: dict[str, float | None]) -> None:
        """Summary events as they stand now (merged into what is there)."""

    def log_table(self, key: str, table: Table, step: int) -> None:
        """Table `key` at `step` (replacing that step's entry)."""

    def rewind(self, step: int) -> None:
        """A resumed run continues from `step`: what was recorded after it will be recorded again."""

    def finalize(self, pictures: dict[str, Path] | None = None, failed: bool = False) -> None:
        """The end of the record (once): `pictures` names the run's PNGs and its report page by what they
        show; `failed` when the command that recorded ended in an error."""


def check_outputs(outputs: dict[str, dict]) -> None:
    """Every sink named in `outputs` is registered and takes each option given for it."""
    check_named_options(outputs, SINKS, "--outputs", "outputs", fixed=1)  # after the destination


def open_sinks(destination: Destination, outputs: dict[str, dict]) -> list[Sink]:
    """The sinks named in `outputs` ({name: options}), in that order, writing for `destination`."""
    check_outputs(outputs)
    return [SINKS[name](destination, **options) for name, options in outputs.items()]
