"""The LightningDataModule: training batches from a prepared corpus (see `data.py`)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from dynascope.train.data import EOS, Corpus, DataConfig, StepBatches, prepare_corpus
from dynascope.train.errors import DynascopeError


class CorpusDataModule(L.LightningDataModule):
    """Training batches from a prepared corpus. `context_length` is linked from the model's config."""

    def __init__(self, source: str = "embedded", corpus: str = "wiki", paths: list[str] | None = None,
                 hf_name: str | None = None, hf_config: str | None = None, hf_split: str = "train",
                 hf_max_docs: int | None = None, text_column: str = "text", tokenizer: str | None = None,
                 eos_token: str = EOS, vocab_size: int = 4096, val_fraction: float = 0.05, batch_size: int = 16,
                 context_length: int = 128, seed: int = 1234, cache_dir: str | None = None):
        super().__init__()
        self.config = DataConfig(source=source, corpus=corpus, paths=list(paths or []), hf_name=hf_name,
                                 hf_config=hf_config, hf_split=hf_split, hf_max_docs=hf_max_docs,
                                 text_column=text_column, tokenizer=tokenizer, eos_token=eos_token,
                                 vocab_size=vocab_size, val_fraction=val_fraction)
        self.batch_size, self.context_length, self.seed, self.cache_dir = batch_size, context_length, seed, cache_dir
        self.corpus: Corpus | None = None

    def prepare_data(self) -> None:
        prepare_corpus(self.config, self.cache_dir)

    def setup(self, stage: str) -> None:
        self.corpus = Corpus(prepare_corpus(self.config, self.cache_dir))
        for split in ("train", "val"):
            n = self.corpus.meta[f"n_{split}"]
            if n < self.context_length + 1:
                raise DynascopeError(
                    f"the {split} split of corpus {self.corpus.path} has {n} tokens, fewer than one window of "
                    f"context_length + 1 = {self.context_length + 1}; add text or lower model.arch.context_length"
                    + (" or raise data.val_fraction" if split == "val" else ""))

    def tokens_per_step(self) -> int:
        t = self.trainer
        return self.batch_size * self.context_length * t.accumulate_grad_batches * t.world_size

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        ds = StepBatches(self.corpus.tokens("train"), self.batch_size, self.context_length, self.seed,
                         t.global_step, t.global_rank, t.accumulate_grad_batches)
        return DataLoader(ds, batch_size=None)
