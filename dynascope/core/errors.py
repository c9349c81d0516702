"""The exceptions the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations


class DynascopeError(ValueError):
    """Bad input or state the user can fix; the message names the file or option and what to do."""


class Interrupted(Exception):
    """Training stopped before trainer.max_steps (a signal or a requeue); its checkpoint is saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(Interrupted):
    """Training stopped at a non-finite loss: the run's record says at which step."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: the loss is {loss}; the run's record says so "
                         "(summary.json train/diverged_step). Lower model.lr or clip gradients harder and start "
                         "over, or resume with --stop_on_divergence false to train on", 3)
        self.step = step


def require(ok: bool, option: str, value: object, expected: str) -> None:
    """Raise a DynascopeError naming `option` and its `value` unless `ok`."""
    if not ok:
        raise DynascopeError(f"{option}={value!r}: {expected}")


def first_line(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (libraries wrap the telling message)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:160]
