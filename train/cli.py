"""`dynascope fit`: a LightningCLI over the model, the data, the Trainer and dynascope's callbacks.

Every option of the model (`--model.arch.*`, `--model.lr`, ...), the data (`--data.*`), the Trainer
(`--trainer.*`), the snapshot schedule (`--snapshots.*`), the resume checkpoints (`--checkpoints.*`)
and the analyses (`--dynamics.*`) can be set in the YAML or on the command line; `--help` documents
each. The run directory is trainer.default_root_dir.
"""

from __future__ import annotations

import signal
from pathlib import Path

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from dynascope.callbacks.dynamics import DynamicsCallback
from dynascope.callbacks.resume import AtomicCheckpointIO, ResumeCheckpoints, RewindOnResume, requeue_slurm_job
from dynascope.callbacks.snapshots import Snapshots
from dynascope.errors import Interrupted, require
from dynascope.train.data import DataConfig
from dynascope.train.datamodule import CorpusDataModule
from dynascope.train.loggers import (
    JsonlLogger,
    RunWandbLogger,
    finish_wandb,
    finish_wandb_run,
    publish_run,
    wandb_grouping,
)
from dynascope.train.module import LanguageModel
from dynascope.train.rundir import (
    RunLock,
    holds_run,
    prepare_run_dir,
    release_locks,
    resolve_checkpoint,
    trajectory_hash,
)

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docs of the config dataclasses in --help


class SaveRunConfig(SaveConfigCallback):
    """Lightning's config.yaml of the run, and the same resolved config (architecture, data, trainer,
    snapshots, dynamics) in the wandb run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)


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
        parser.add_argument("--wandb_group", type=str | None, default=None,
                            help="wandb group (default: the preset, activation and a hash of the settings other "
                                 "than seeds, so the seeds of one setup sit together)")
        parser.add_argument("--wandb_tags", type=list[str] | None, default=None,
                            help="wandb tags (default: activation=..., preset=...)")
        parser.add_argument("--report", type=bool, default=True,
                            help="at the end of fit, draw the plots and the report page into the run directory "
                                 "and log them, with per-layer charts, to the wandb run")
        parser.add_argument("--start_over", type=bool, default=False,
                            help="start a new run in a directory that holds one, moving the old run aside")

    def _parse_ckpt_path(self) -> None:
        """Not Lightning's: a checkpoint's hyperparameters must not override the config. The run directory's
        own check compares the whole trajectory with the run's config.yaml instead (rundir.py)."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)  # validates every setting
        self.datamodule = CorpusDataModule(self._get(self.config_init, "data"))
        self.model = self._get(self.config_init, "model")
        self._hold_run_dir()  # after validation, before the loggers and the trainer write anything
        self.trainer = self.instantiate_trainer()

    def _hold_run_dir(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        require(isinstance(config.trainer.max_steps, int) and config.trainer.max_steps >= 1, "trainer.max_steps",
                config.trainer.max_steps, "must be a positive number of optimizer steps")
        run_dir = Path(config.trainer.default_root_dir or "runs/default")
        self._get(self.config_init, "trainer")["default_root_dir"] = config.trainer.default_root_dir = str(run_dir)
        # every rank resumes from the same file: the newest complete checkpoint (no subcommand: run=False)
        requested = config.get("ckpt_path")
        ckpt_path = resolve_checkpoint(run_dir, requested)
        if self.subcommand:
            config.ckpt_path = self.config_init[self.subcommand].ckpt_path = ckpt_path
        # auto with nothing to resume restarts a run an attempt left before its first checkpoint
        start_over = config.start_over or (requested == "auto" and ckpt_path is None and holds_run(run_dir))
        resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
        presets = config.get("config") or []
        group, tags = wandb_grouping(resolved, Path(str(presets[-1])).stem if presets else None)
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        init.wandb_group = config.wandb_group = config.wandb_group or group
        init.wandb_tags = config.wandb_tags = config.wandb_tags or tags
        self._get(self.config_init, "snapshots").trajectory_hash = trajectory_hash(resolved)
        if rank_zero_only.rank == 0:  # rank 0 checks and holds the run directory
            self.run_lock = RunLock(run_dir)
            prepare_run_dir(run_dir, resolved, ckpt_path, start_over)
            if not self.run_lock.path.exists():  # the old run (and its lock) moved aside
                self.run_lock.release()
                self.run_lock = RunLock(run_dir)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config["trainer"]
        run_dir = Path(trainer_cfg["default_root_dir"])
        if trainer_cfg.get("logger") in (None, True):  # a config that declares none: the presets' two
            trainer_cfg["logger"] = [JsonlLogger(), RunWandbLogger(project="dynascope")]
        loggers = trainer_cfg["logger"] if isinstance(trainer_cfg["logger"], list) else [trainer_cfg["logger"]]
        for logger in loggers:  # the loggers write into the run directory, which only now is known
            if isinstance(logger, JsonlLogger) and logger.run_dir is None:
                logger.run_dir = run_dir
            if isinstance(logger, RunWandbLogger):
                logger.bind(run_dir, config["wandb_group"], config["wandb_tags"])
        trainer_cfg["callbacks"] = list(trainer_cfg.get("callbacks") or []) + [RewindOnResume()]
        trainer_cfg["plugins"] = list(trainer_cfg.get("plugins") or []) + [AtomicCheckpointIO()]
        if SLURMEnvironment.detect():  # ResumeCheckpoints checkpoints and requeues at SIGUSR1, not Lightning
            trainer_cfg["plugins"].append(SLURMEnvironment(auto_requeue=False))
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.report and trainer.global_step >= trainer.max_steps and trainer.is_global_zero:
            wandb_runs = [lg for lg in trainer.loggers if isinstance(lg, RunWandbLogger)]
            publish_run(Path(trainer.default_root_dir), wandb_runs[0] if wandb_runs else None)
        finish_wandb(trainer)
        if trainer.global_step < trainer.max_steps:
            signum = next((cb.stopped_by for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoints)), None)
            if signum == signal.SIGUSR1 and SLURMEnvironment.detect() and trainer.is_global_zero:
                release_locks()  # requeueing ends this job at once: nothing may be left open
                requeue_slurm_job()
            raise interrupted(trainer, signum)


def interrupted(trainer, signum: int | None) -> Interrupted:
    """The error a run stopped before max_steps ends with: it names the checkpoint to resume from."""
    by = f" by {signal.Signals(signum).name}" if signum else ""
    return Interrupted(f"training stopped{by} at step {trainer.global_step} of {trainer.max_steps}; resume with "
                       f"--ckpt_path last (checkpoint: {Path(trainer.default_root_dir) / 'checkpoints' / 'last.ckpt'})",
                       128 + signum if signum else 1)


def fit_cli(args: list[str] | None = None, run: bool = True) -> DynascopeCLI:
    """`dynascope fit`; with `run=False` the trainer is built but not run, and the run directory stays held
    by this process until `release_locks()`."""
    try:
        return DynascopeCLI(LanguageModel, None, args=args, run=run, auto_configure_optimizers=False,
                            save_config_callback=SaveRunConfig, save_config_kwargs={"overwrite": True},
                            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False,
                                           "fit": {"exit_on_error": False}})
    finally:
        if run:  # a fit that ended, however it ended, holds nothing: its directory, its wandb run
            release_locks()
            finish_wandb_run()
