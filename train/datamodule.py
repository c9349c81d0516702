"""The LightningDataModule: training batches from a prepared corpus (see `data.py`)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from dynascope.core.data import Corpus, DataConfig, StepBatches, prepare_corpus
from dynascope.core.errors import DynascopeError


class CorpusDataModule(L.LightningDataModule):
    """Training batches of `config` from its prepared corpus; windows are the model's context length."""

    def __init__(self, config: DataConfig):
        super().__init__()
        self.config = config
        self.corpus: Corpus | None = None

    @property
    def context_length(self) -> int:
        return self.trainer.lightning_module.arch.context_length

    @override
    def prepare_data(self) -> None:
        prepare_corpus(self.config)

    @override
    def setup(self, stage: str) -> None:
        """Runs before any callback's setup: a corpus that does not fit the model stops the run before its
        directory is written."""
        self.corpus = Corpus(prepare_corpus(self.config))
        vocab, model_vocab = self.corpus.meta["vocab_size"], self.trainer.lightning_module.arch.vocab_size
        if vocab > model_vocab:
            raise DynascopeError(f"the tokenizer of {self.corpus.path} has {vocab} tokens, more than "
                                 f"model.arch.vocab_size={model_vocab}; raise it or lower data.vocab_size")
        for split in ("train", "val"):
            n = self.corpus.meta[f"n_{split}"]
            if n < self.context_length + 1:
                raise DynascopeError(
                    f"the {split} split of corpus {self.corpus.path} has {n} tokens, fewer than one window of "
                    f"context_length + 1 = {self.context_length + 1}; add text or lower model.arch.context_length"
                    + (" or raise data.val_fraction" if split == "val" else ""))

    def tokens_per_step(self) -> int:
        t = self.trainer
        return self.config.batch_size * self.context_length * t.accumulate_grad_batches * t.world_size

    @override
    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        ds = StepBatches(self.corpus.tokens("train"), self.config.batch_size, self.context_length, self.config.seed,
                         t.global_step, t.global_rank, t.accumulate_grad_batches)
        return DataLoader(ds, batch_size=None)
