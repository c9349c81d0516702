"""The Pythia-style checkpoint schedule: which steps get a snapshot and an analysis."""

from __future__ import annotations

from dataclasses import dataclass


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
