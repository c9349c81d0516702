"""The LightningModule that pretrains a `Transformer` with AdamW and warmup + cosine decay.

A non-finite loss is caught before its backward pass: the first such step is `diverged_step`, and with
`stop_on_divergence` (the default) training ends there (`Diverged`), its weights still finite. The check is
one host sync per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from typing_extensions import override

from dynascope.core.errors import Diverged, DynascopeError, require
from dynascope.core.model import ModelConfig, Transformer


class LanguageModel(L.LightningModule):
    def __init__(self, arch: ModelConfig = ModelConfig(), lr: float = 1e-3, min_lr_ratio: float = 0.1,
                 warmup_steps: int = 100, decay_steps: int | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), compile: bool = False):
        """Pretrain a Transformer with AdamW, linear warmup and cosine decay.

        Args:
            arch: The model's architecture.
            lr: Peak learning rate, reached at the end of the warmup.
            min_lr_ratio: The cosine decays to min_lr_ratio × lr.
            warmup_steps: Optimizer steps of linear warmup from lr / warmup_steps.
            decay_steps: Length of the cosine schedule in steps (default: trainer.max_steps).
            weight_decay: Decoupled weight decay of matrices (none on norms, biases and embeddings).
            betas: AdamW's β1 and β2.
            compile: Compile the training forward pass with torch.compile.
        """
        require(lr > 0, "model.lr", lr, "must be positive")
        require(0 <= min_lr_ratio <= 1, "model.min_lr_ratio", min_lr_ratio, "must lie between 0 and 1")
        require(warmup_steps >= 0, "model.warmup_steps", warmup_steps, "must be 0 or more")
        require(decay_steps is None or decay_steps >= 1, "model.decay_steps", decay_steps,
                "must be a positive number of steps, or unset for trainer.max_steps")
        require(weight_decay >= 0, "model.weight_decay", weight_decay, "must be 0 or more")
        require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "model.betas", betas,
                "must be two numbers in [0, 1)")
        super().__init__()
        self.save_hyperparameters(ignore="arch")
        self.hparams["arch"] = asdict(arch)
        self.model = Transformer(arch)
        self.tokens_per_step = 0
        self.stop_on_divergence = True  # set by `dynascope fit` (--stop_on_divergence)
        self.diverged_step: int | None = None  # the first step with a non-finite loss
        self._train_forward = torch.compile(self.model.forward) if compile else self.model.forward

    @property
    def arch(self) -> ModelConfig:
        return self.model.cfg

    @override
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        self.tokens_per_step = dm.tokens_per_step()
        # Read by Lightning's ThroughputMonitor to report MFU (FLOPs of one micro-batch on this rank).
        self.flops_per_batch = self.model.flops_per_token() * dm.config.batch_size * self.arch.context_length

    def tokens_seen(self, step: int) -> int:
        """Tokens all ranks trained on before the update of `step`: what the weights at `step` have seen."""
        return step * self.tokens_per_step

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self._train_forward(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        if not torch.isfinite(loss):
            if self.diverged_step is None:
                self.diverged_step = self.global_step
            if self.stop_on_divergence:  # before this step's update: the weights stay finite
                raise Diverged(self.global_step, loss.item())
        self.log("train/loss", loss, prog_bar=True)
        self.log("tokens_seen", float(self.tokens_seen(self.global_step)))
        return loss

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("train/grad_norm", grad_norm(self, norm_type=2)["grad_2.0_norm_total"])  # before clipping
        self.log("train/lr", optimizer.param_groups[0]["lr"])  # the lr this update uses (one schedule, both groups)

    @override
    def configure_optimizers(self):
        hp = self.hparams
        no_decay = {"wte.weight", "wpe.weight"}  # embeddings; norms and biases are 1-D
        params = dict(self.model.named_parameters())  # tied weights appear once, under wte
        decay = [p for n, p in params.items() if p.ndim >= 2 and n not in no_decay]
        rest = [p for n, p in params.items() if p.ndim < 2 or n in no_decay]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=hp.lr, betas=hp.betas)
        total = hp.decay_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise DynascopeError("set trainer.max_steps or model.decay_steps: the cosine schedule needs a length")

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
