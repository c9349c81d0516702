"""`dynascope fit`: a LightningCLI over the model, the data, the Trainer and dynascope's callbacks.

Every option of the model (`--model.arch.*`, `--model.lr`, ...), the data (`--data.*`), the Trainer
(`--trainer.*`), the snapshot schedule (`--snapshots.*`), the resume checkpoints (`--checkpoints.*`)
and the analyses (`--dynamics.*`) can be set in the YAML or on the command line; `--help` documents
each. The run directory is trainer.default_root_dir.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI

from dynascope.callbacks.dynamics import DynamicsCallback
from dynascope.callbacks.resume import ResumeCheckpoints
from dynascope.callbacks.snapshots import Snapshots
from dynascope.train.data import DataConfig
from dynascope.train.datamodule import CorpusDataModule
from dynascope.train.loggers import JsonlLogger, finish_wandb, make_wandb_logger
from dynascope.train.module import LanguageModel

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docs of the config dataclasses in --help


class DynascopeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.add_lightning_class_args(LanguageModel, "model")
        parser.add_class_arguments(DataConfig, "data")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Snapshots, "snapshots")
        parser.add_lightning_class_args(ResumeCheckpoints, "checkpoints")
        parser.add_lightning_class_args(DynamicsCallback, "dynamics")
        parser.add_argument("--wandb_project", default="dynascope", help="wandb project of the run")

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = CorpusDataModule(self._get(self.config_init, "data"))
        self.model = self._get(self.config_init, "model")
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config["trainer"]
        run_dir = Path(trainer_cfg.get("default_root_dir") or "runs/default")
        trainer_cfg["default_root_dir"] = str(run_dir)
        if trainer_cfg.get("logger") in (None, True):
            trainer_cfg["logger"] = [JsonlLogger(run_dir), make_wandb_logger(run_dir, config["wandb_project"])]
        throughput = ThroughputMonitor(batch_size_fn=lambda b: b[0].size(0), length_fn=lambda b: b[0].numel(),
                                       window_size=10)
        trainer_cfg["callbacks"] = list(trainer_cfg.get("callbacks") or []) + [throughput]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        finish_wandb(self.trainer)


def fit_cli(args: list[str] | None = None, run: bool = True) -> DynascopeCLI:
    return DynascopeCLI(LanguageModel, None, args=args, run=run, auto_configure_optimizers=False,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"parser_mode": "omegaconf"})
