"""The Pythia-style checkpoint schedule: which steps get a snapshot and an analysis."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointSchedule:
    """Steps 0, 1, 2, 4, ..., up to `log_cap` (powers of two), then every `every` steps, plus the final step; or,
    given `at` (a zoom's dense steps), exactly those steps and the final one."""

    log_cap: int = 512
    every: int = 1000
    at: tuple[int, ...] | None = None

    def is_due(self, step: int, max_steps: int | None = None) -> bool:
        if step == max_steps:
            return True
        if self.at is not None:
            return step in self.at
        if step == 0 or (step <= self.log_cap and step & (step - 1) == 0):
            return True
        return step > self.log_cap and self.every > 0 and step % self.every == 0

    def log_spaced(self, step: int) -> bool:
        """Whether `step` is in the log-spaced part (0, 1, 2, 4, ..., log_cap)."""
        return self.at is None and (step == 0 or (step <= self.log_cap and step & (step - 1) == 0))

    def steps(self, max_steps: int) -> list[int]:
        return [s for s in range(max_steps + 1) if self.is_due(s, max_steps)]
