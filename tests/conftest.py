import logging
import os
import sys
from pathlib import Path

import pytest
from helpers import FakeWandb, make_text, on_two_ranks, tiny_args

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")  # no stdout wrapping: tests read what dynascope prints
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _CurrentStderr:
    """Lightning's log handlers keep the stderr of the moment they were made, which pytest closes after
    that test; this always writes to the current one (so capsys sees it and nothing writes to a closed file)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _log_to_current_stderr():
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)] + [logging.root]
    for handler in (h for log in loggers for h in getattr(log, "handlers", [])):
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
            handler.stream = _CurrentStderr()  # not setStream: it flushes the old stream, which may be closed


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    os.environ["DYNASCOPE_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(400))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> Path:
    """A finished 7-step tiny run with every analysis online (training stream included), analysed
    offline too. Shared: tests that change a run work on `copy_run(tiny_run, tmp_path)`."""
    from dynascope.cli import main

    run = tmp_path_factory.mktemp("tiny") / "run"
    main(tiny_args(corpus_file, run, 7))
    main(["analyze", str(run), "--no_plot"])
    return run


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """Runs a module-level function on two gloo ranks: `two_ranks(fn, *args)` -> {rank: fn(rank, *args)}."""
    stores = iter(range(1_000_000))
    return lambda fn, *args: on_two_ranks(tmp_path_factory.mktemp("store") / f"store{next(stores)}", fn, *args)


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path) -> FakeWandb:
    """wandb's runs replaced by recording stand-ins (see helpers.FakeWandb)."""
    return FakeWandb(monkeypatch, tmp_path / "fake-wandb")
