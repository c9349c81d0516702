import logging
import os
import random
import sys
from pathlib import Path

import pytest

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

WORDS = ("the a cat dog sat ran on under mat tree house river quickly slowly red blue small large "
         "bird fish king queen stone water fire light dark morning evening song word").split()


def make_text(n_docs: int, seed: int = 0) -> str:
    """Paragraphs of random sentences from a small vocabulary: a corpus with Zipf-like token counts."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choices(WORDS, weights, k=rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return "\n\n".join(docs) + "\n"


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


def tiny_args(corpus_file: Path, run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """CLI arguments of a tiny run (2 layers, d=32, vocab 320, context 32) on the test corpus."""
    return ["fit", "--config", "configs/tiny-relu.yaml",
            "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(max_steps),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--model.arch.n_layers", "2", "--model.arch.d_model", "32", "--model.arch.n_heads", "2",
            "--model.arch.d_mlp", "64", "--model.arch.vocab_size", "320", "--model.arch.context_length", "32",
            "--model.warmup_steps", "2",
            "--data.source", "files", "--data.paths", f"[{corpus_file}]", "--data.vocab_size", "320",
            "--data.batch_size", "4", "--data.val_fraction", "0.2",
            "--snapshots.log_cap", "4", "--snapshots.every", "3", "--checkpoints.every_n_steps", "4",
            "--dynamics.options", '{"regions": {"pairs_per_window": 1}, "sparsity": {"dead_min_tokens": 256}}',
            "--report", "false", *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> Path:
    """A finished 7-step tiny run with every analysis online (training stream included), analysed
    offline too. Shared: tests that change a run work on `copy_run(tiny_run, tmp_path)`."""
    from dynascope.analysis.runner import analyze_run
    from dynascope.train.cli import fit_cli

    run = tmp_path_factory.mktemp("tiny") / "run"
    fit_cli(tiny_args(corpus_file, run, 7))
    analyze_run(run)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))
