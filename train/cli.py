"""The `dynascope` command.

    dynascope fit --config configs/tiny-relu.yaml [--trainer.max_steps N] [--trainer.default_root_dir DIR]
    dynascope batch --run RUN_DIR --step N [--rank R] [--micro M]
    dynascope prepare --config CONFIG
    dynascope analyze RUN_DIR [--analyses ...] [--steps ...] | --hf MODEL_DIR ... --out OUT_DIR
    dynascope plot RUN_DIR

`fit` (and Lightning's other subcommands) go to LightningCLI; the run directory is
trainer.default_root_dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI

from dynascope.callbacks.dynamics import DynamicsCallback
from dynascope.train.checkpoints import ResumeCheckpoints, Snapshots
from dynascope.train.data import Corpus, DataConfig, prepare_corpus, sample_batch
from dynascope.train.datamodule import CorpusDataModule
from dynascope.train.errors import DynascopeError
from dynascope.train.loggers import JsonlLogger, finish_wandb, make_wandb_logger
from dynascope.train.module import LanguageModel


class DynascopeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.arch.context_length", "data.context_length")
        parser.add_lightning_class_args(Snapshots, "snapshots")
        parser.add_lightning_class_args(ResumeCheckpoints, "checkpoints")
        parser.add_lightning_class_args(DynamicsCallback, "dynamics")
        parser.add_argument("--wandb_project", default="dynascope", help="wandb project of the run")

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
    return DynascopeCLI(LanguageModel, CorpusDataModule, args=args, run=run,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"parser_mode": "omegaconf"})


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DynascopeError(f"{path} not found; give a YAML config or a `dynascope fit` run directory")
    return yaml.safe_load(path.read_text())


def run_config(run_dir: str | Path) -> dict:
    return read_config(Path(run_dir) / "config.yaml")


def batch_text(run_dir: str | Path, step: int, rank: int = 0, micro: int = 0) -> list[str]:
    """The training windows of (step, rank, micro-batch) of a run, decoded."""
    cfg = run_config(run_dir)
    d, T = cfg["data"], cfg["model"]["arch"]["context_length"]
    corpus = Corpus(prepare_corpus(DataConfig.from_config(cfg), d.get("cache_dir")))
    x, y = sample_batch(corpus.tokens("train"), d["batch_size"], T, d["seed"], step, rank, micro)
    tok = corpus.tokenizer()
    full = [row + [last] for row, last in zip(x.tolist(), y[:, -1].tolist(), strict=True)]
    return [tok.decode(ids, skip_special_tokens=False) for ids in full]


def _prepare_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="dynascope prepare",
                                description="Build the tokenized corpus of a config (e.g. once before a cluster job).")
    p.add_argument("--config", required=True, help="a YAML preset, e.g. configs/tiny-relu.yaml")
    a = p.parse_args(argv)
    cfg = read_config(a.config)
    print(prepare_corpus(DataConfig.from_config(cfg), (cfg.get("data") or {}).get("cache_dir")))


def _batch_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="dynascope batch", description="Print the text a training step saw.")
    p.add_argument("--run", required=True, help="run directory (trainer.default_root_dir of `dynascope fit`)")
    p.add_argument("--step", type=int, required=True, help="global step (0-based optimizer step)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--micro", type=int, default=0, help="micro-batch index under gradient accumulation")
    a = p.parse_args(argv)
    for i, text in enumerate(batch_text(a.run, a.step, a.rank, a.micro)):
        print(f"--- window {i} ---\n{text}")


def _analyze_main(argv: list[str]) -> None:
    from dynascope.analysis.plots import plot_run
    from dynascope.analysis.runner import analyze_hf, analyze_run
    from dynascope.train.loggers import upload_to_wandb

    p = argparse.ArgumentParser(prog="dynascope analyze", description="Replay analyses over saved checkpoints.")
    p.add_argument("run", nargs="?", help="run directory of `dynascope fit`")
    p.add_argument("--hf", nargs="+", metavar="MODEL_DIR", help="local Hugging Face model directories instead")
    p.add_argument("--out", help="output directory (required with --hf)")
    p.add_argument("--labels", help="comma-separated labels of the --hf directories, in order (e.g. step1000,...)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="with --hf: text files for the probe set and counts")
    p.add_argument("--analyses", default="all", help="comma-separated analysis names, or all")
    p.add_argument("--steps", help="comma-separated snapshot steps (default: all)")
    p.add_argument("--batch-size", type=int, help="probe batch size (default: the run's, else 16)")
    p.add_argument("--options", type=json.loads,
                   help='per-analysis options as JSON (default: the run\'s), e.g. \'{"regions": {"n_alpha": 31}}\'')
    p.add_argument("--no-plot", action="store_true", help="skip the plots (draw them later with `dynascope plot`)")
    p.add_argument("--wandb", action="store_true", help="upload table and plots to wandb (offline without a key)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.hf:
        if not a.out:
            p.error("--hf needs --out OUT_DIR")
        data = DataConfig(source="files", paths=a.data) if a.data else None
        report = analyze_hf(a.hf, a.out, a.labels.split(",") if a.labels else None, a.analyses, data,
                            batch_size=a.batch_size or 16, device=a.device, options=a.options)
    elif a.run:
        steps = [int(s) for s in a.steps.split(",")] if a.steps else None
        report = analyze_run(a.run, a.analyses, steps, a.batch_size, a.device, a.options)
    else:
        p.error("give a run directory or --hf MODEL_DIR ...")
    print(f"metrics: {report.out_dir / 'metrics.csv'} ({len(report.rows)} checkpoints)")
    if report.rows and not a.no_plot:
        print(f"overview: {plot_run(a.run or a.out)}")
    if report.rows and a.wandb:
        print(f"wandb run: {upload_to_wandb(report.rows, report.out_dir / 'plots', report.out_dir)}")
    if report.skipped:
        print(f"dynascope: {len(report.skipped)} checkpoint(s) skipped: {', '.join(report.skipped)}", file=sys.stderr)
        sys.exit(1)


def _plot_main(argv: list[str]) -> None:
    from dynascope.analysis.plots import plot_run

    p = argparse.ArgumentParser(prog="dynascope plot", description="Draw emergence curves of a run.")
    p.add_argument("run", help="run directory (or --hf output directory of `dynascope analyze`)")
    a = p.parse_args(argv)
    print(f"overview: {plot_run(a.run)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"batch": _batch_main, "prepare": _prepare_main, "analyze": _analyze_main, "plot": _plot_main}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            fit_cli(argv if argv != sys.argv[1:] else None)
    except DynascopeError as e:
        print(f"dynascope: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
