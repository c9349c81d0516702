"""`dynascope fit`: a LightningCLI over the model, the data, the Trainer and dynascope's callbacks.

Every option of the model (`--model.arch.*`, `--model.lr`, ...), the data (`--data.*`), the Trainer
(`--trainer.*`), the snapshot schedule (`--snapshots.*`), the resume checkpoints (`--checkpoints.*`),
the analyses (`--dynamics.*`) and the run's outputs (`--outputs`) can be set in the YAML or on the
command line; `dynascope fit --help_all` documents each. The run directory is trainer.default_root_dir.

The run's record goes through one `Recorder` (rank 0): metrics.jsonl, summary.json and tables/, and the
outputs `--outputs` names (the presets: the wandb run). Lightning reaches it through a `RecordLogger`, the
analyses through `DynamicsCallback`. The CLI parses and checks everything, holds the run directory, and
only then runs `Trainer.fit` itself with the checkpoint it resolved (`--ckpt_path`, loaded weights-only). A
non-finite loss ends the fit (`Diverged`, exit 3) unless `--stop_on_divergence false`; either way the summary
records `train/diverged_step`. `LossSpikes` watches every run.
"""

from __future__ import annotations

import logging
import pickle
import signal
import warnings
from pathlib import Path

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm
from typing_extensions import override

from dynascope.callbacks.dynamics import DynamicsCallback
from dynascope.callbacks.logger import RecordLogger
from dynascope.callbacks.progress import StepProgressBar
from dynascope.callbacks.resume import AtomicCheckpointIO, ResumeCheckpoints, RewindOnResume, requeue_slurm_job
from dynascope.callbacks.snapshots import Snapshots
from dynascope.callbacks.stability import LossSpikes
from dynascope.core.data import DataConfig
from dynascope.core.errors import DynascopeError, Interrupted, require
from dynascope.core.records import DIVERGED_KEY
from dynascope.core.rundir import RunLock, holds_run, prepare_run_dir, release_locks, resolve_checkpoint
from dynascope.core.runfiles import RunFiles
from dynascope.core.settings import trajectory_hash
from dynascope.outputs import Destination, Recorder, check_outputs
from dynascope.outputs.wandb_run import wandb_grouping
from dynascope.pages.publish import draw_pages
from dynascope.train.datamodule import CorpusDataModule
from dynascope.train.module import LanguageModel

RECORD = {"jsonl": {}, "summary": {}, "tables": {}}  # what every fit writes into its run directory


class DynascopeCLI(LightningCLI):
    @override
    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.add_lightning_class_args(LanguageModel, "model")
        parser.add_class_arguments(DataConfig, "data")

    @override
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Snapshots, "snapshots")
        parser.add_lightning_class_args(ResumeCheckpoints, "checkpoints")
        parser.add_lightning_class_args(DynamicsCallback, "dynamics")
        parser.add_argument("--outputs", type=dict[str, dict], default={},
                            help="where the run's record goes besides metrics.jsonl, summary.json and tables/: "
                                 "{output name: its options}, e.g. {wandb: {project: dynascope}, parquet: {}}")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume: last (the run's newest complete checkpoint), auto (that one if there is "
                                 "one, else start; for requeued jobs), or a checkpoint file")
        parser.add_argument("--wandb_group", type=str | None, default=None,
                            help="wandb group (default: the preset, activation and a hash of the settings other "
                                 "than seeds, so the seeds of one setup sit together)")
        parser.add_argument("--wandb_tags", type=list[str] | None, default=None,
                            help="wandb tags (default: activation=..., preset=...)")
        parser.add_argument("--report", type=bool, default=True,
                            help="at the end of fit, draw the plots and the report page into the run directory "
                                 "and hand them to the outputs (the wandb run)")
        parser.add_argument("--start_over", type=bool, default=False,
                            help="start a new run in a directory that holds one, moving the old run aside")
        parser.add_argument("--stop_on_divergence", type=bool, default=True,
                            help="stop at the first non-finite training loss (exit 3; the summary says at which "
                                 "step); false trains on, marking non-finite snapshots, which nothing measures")

    @override
    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)  # validates every setting
        check_outputs(self.config.outputs)
        self.datamodule = CorpusDataModule(self.config_init.data)
        self.model = self.config_init.model
        self.model.stop_on_divergence = self.config.stop_on_divergence
        self.recorder: Recorder | None = None
        self._hold_run_dir()  # after validation, before anything is written
        try:
            self.trainer = self.instantiate_trainer()
        except BaseException:
            self.close(failed=True)
            raise

    def _hold_run_dir(self) -> None:
        config = self.config
        require(isinstance(config.trainer.max_steps, int) and config.trainer.max_steps >= 1, "trainer.max_steps",
                config.trainer.max_steps, "must be a positive number of optimizer steps")
        accumulate = config.trainer.get("accumulate_grad_batches", 1)
        require(isinstance(accumulate, int) and accumulate >= 1, "trainer.accumulate_grad_batches", accumulate,
                "must be a positive number of micro-batches per step")
        self.run_dir = Path(config.trainer.default_root_dir or "runs/default")
        self.config_init.trainer["default_root_dir"] = config.trainer.default_root_dir = str(self.run_dir)
        # every rank resumes from the same file: the newest complete checkpoint
        requested = config.ckpt_path
        self.ckpt_path = resolve_checkpoint(self.run_dir, requested)
        config.ckpt_path = self.config_init.ckpt_path = self.ckpt_path
        # auto with nothing to resume restarts a run an attempt left before its first checkpoint
        start_over = config.start_over or (requested == "auto" and self.ckpt_path is None and holds_run(self.run_dir))
        resolved = yaml.safe_load(self.parser.dump(config, skip_none=False))
        presets = config.get("config") or []
        name, group, tags = wandb_grouping(resolved, Path(str(presets[-1])).stem if presets else None)
        self.config_init.wandb_group = config.wandb_group = config.wandb_group or group
        self.config_init.wandb_tags = config.wandb_tags = config.wandb_tags or tags
        self.config_init.snapshots.trajectory_hash = trajectory_hash(resolved)
        if rank_zero_only.rank == 0:  # rank 0 checks and holds the run directory, and records the run
            self.run_lock = RunLock(self.run_dir)
            prepare_run_dir(self.run_dir, resolved, self.ckpt_path, start_over)
            if not self.run_lock.path.exists():  # the old run (and its lock) moved aside
                self.run_lock.release()
                self.run_lock = RunLock(self.run_dir)
            run = RunFiles(self.run_dir)
            resolved |= {"wandb_group": config.wandb_group, "wandb_tags": config.wandb_tags}
            destination = Destination(run, run, resolved, name, group=config.wandb_group, tags=config.wandb_tags)
            self.recorder = Recorder.open(destination, RECORD | config.outputs, echo=tqdm.write)  # beside the bars

    @override
    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self.config_init.trainer
        declared = trainer_cfg.get("logger")
        theirs = [lg for lg in (declared if isinstance(declared, list) else [declared]) if isinstance(lg, Logger)]
        trainer_cfg["logger"] = [RecordLogger(self.recorder, self.run_dir), *theirs]
        self.config_init.dynamics.recorder = self.recorder
        trainer_cfg["callbacks"] = list(trainer_cfg.get("callbacks") or []) + [RewindOnResume(self.recorder),
                                                                               LossSpikes()]
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
                isinstance(cb, ProgressBar) for cb in trainer_cfg["callbacks"]):
            trainer_cfg["callbacks"].append(StepProgressBar())
        trainer_cfg["plugins"] = list(trainer_cfg.get("plugins") or []) + [AtomicCheckpointIO()]
        if SLURMEnvironment.detect():  # ResumeCheckpoints checkpoints and requeues at SIGUSR1, not Lightning
            trainer_cfg["plugins"].append(SLURMEnvironment(auto_requeue=False))
        return super().instantiate_trainer(**kwargs)

    def fit(self) -> None:
        """Train from the resolved checkpoint; publish the pages of a finished run; end an interrupted one with
        the checkpoint to resume from (requeueing a Slurm job Slurm warned of its time limit)."""
        trainer = self.trainer
        # resume checkpoints load through torch's weights-only unpickler: no file can run code when loaded
        try:
            trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.ckpt_path, weights_only=True)
        except pickle.UnpicklingError:  # whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: weights_only is explicit
            raise DynascopeError(f"{self.ckpt_path} holds objects beyond tensors and plain values, so it was not "
                                 "written by dynascope and is not loaded (nothing in it ran); delete it, or resume "
                                 "from another checkpoint") from None
        finally:  # the record says that the run diverged and where, whether it stopped there or trained on
            if self.model.diverged_step is not None and self.recorder is not None:
                self.recorder.log_summary({DIVERGED_KEY: self.model.diverged_step})
        finished = trainer.global_step >= trainer.max_steps
        pictures = draw_pages(self.run_dir) if self.config.report and finished and trainer.is_global_zero else None
        self.close(pictures=pictures)
        if not finished:
            signum = next((cb.stopped_by for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoints)), None)
            if signum == signal.SIGUSR1 and SLURMEnvironment.detect() and trainer.is_global_zero:
                release_locks()  # requeueing ends this job at once: nothing may be left open
                requeue_slurm_job()
            raise interrupted(trainer, signum)

    def close(self, pictures: dict[str, Path] | None = None, failed: bool = False) -> None:
        """Finalize the run's record (its wandb run included) and release its directory."""
        if self.recorder is not None:
            self.recorder.finalize(pictures, failed)
            self.recorder = None
        release_locks()


def interrupted(trainer, signum: int | None) -> Interrupted:
    """The error a run stopped before max_steps ends with: it names the checkpoint to resume from."""
    by = f" by {signal.Signals(signum).name}" if signum else ""
    return Interrupted(f"training stopped{by} at step {trainer.global_step} of {trainer.max_steps}; resume with "
                       f"--ckpt_path last (checkpoint: {RunFiles(trainer.default_root_dir).last_checkpoint})",
                       128 + signum if signum else 1)


def build_fit(args: list[str] | None = None) -> DynascopeCLI:
    """`dynascope fit` parsed, checked and ready: the run directory is held (until `close()`) and the
    Trainer built, not run."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docs of the config dataclasses in --help
    with warnings.catch_warnings():  # `dynascope fit` passes its own arguments: sys.argv also holds the command
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return DynascopeCLI(LanguageModel, None, args=args, run=False, auto_configure_optimizers=False,
                            save_config_callback=SaveConfigCallback, save_config_kwargs={"overwrite": True},
                            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False})


class _LightningAdverts(logging.Filter):
    """Drops Lightning's product tips from its log (a run's terminal output is the run's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_ADVERTS = _LightningAdverts()  # one instance: adding it again (a second fit in one process) is a no-op


def fit_cli(args: list[str] | None = None) -> None:
    """`dynascope fit`: however it ends, the run's record is closed and its directory released."""
    cli = None
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_ADVERTS)
    # dynascope's Slurm templates launch with srun; a run started by hand on a Slurm machine is meant as one
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # Lightning's own deprecation under torch 2.13, which a user cannot act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        cli = build_fit(args)
        cli.fit()
    except BaseException:
        if cli is not None:
            cli.close(failed=True)
        raise
    finally:
        release_locks()
