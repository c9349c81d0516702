"""The `dynascope` command.

    dynascope fit --config tiny-relu [--trainer.max_steps N] [--trainer.default_root_dir DIR]
    dynascope prepare --config CONFIG
    dynascope batch RUN_DIR --step N [--rank R] [--micro M]
    dynascope analyze RUN_DIR [--analyses ...] [--steps ...] | --hf MODEL_DIR|REPO@REVISION ... --out OUT_DIR
    dynascope export RUN_DIR (--step N | --all) OUT_DIR [--push REPO_ID]
    dynascope plot RUN_DIR [--out DIR]
    dynascope report RUN_DIR [--out DIR]
    dynascope sync RUN_DIR [--project P]
    dynascope sweep --config CONFIG --grid "KEY=V1,V2 ..." --out SWEEP_DIR [--slurm] [fit arguments]
    dynascope compare DIR ... --out OUT_DIR
    dynascope verify RUN_DIR | MODEL_DIR|REPO@REVISION ... --out OUT_DIR

Every command parses its arguments before it imports anything heavy (torch, Lightning), so `--help` and
argument errors answer at once; options are --snake_case throughout, as `fit`'s (LightningCLI's) are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dynascope.core.errors import DynascopeError, Interrupted
from dynascope.core.heap import heap_up_to
from dynascope.core.presets import preset, preset_names
from dynascope.core.runfiles import RunFiles

COMMANDS = {
    "fit": "pretrain a model, snapshotting and analysing it on a schedule (`dynascope fit --help_all`: every option)",
    "prepare": "tokenize a config's corpus once, e.g. before a cluster job",
    "batch": "print the text a training step saw",
    "analyze": "replay analyses over a run's snapshots or over Hugging Face checkpoints",
    "export": "write a run's snapshots as Hugging Face GPT-2 checkpoints, optionally pushed as branches stepN",
    "plot": "draw a run's emergence curves",
    "report": "write one page with each paper's figures for a run (or an `analyze --hf` output directory)",
    "sync": "upload a run directory's record to wandb as one run (e.g. after offline resumes)",
    "sweep": "train one run per combination of a grid of settings, one after another or as a Slurm array job",
    "compare": "write one page overlaying the headline curves of several runs (seeds as bands) and their events",
    "onsets": "list a run's onsets: step, bracket, interval, confidence and guard, and the zoom that resolves each",
    "zoom": "train a stretch of a run again, snapshotting and measuring it densely, to resolve an onset",
    "verify": "check that each checkpoint of a run or a suite is what its step claims, without analysing it",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one-line DynascopeErrors instead of a usage dump."""

    def error(self, message: str):
        raise DynascopeError(f"{self.prog}: {message} (see {self.prog} --help)")


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise DynascopeError(f"--steps {text!r}: give comma-separated step numbers, e.g. 0,64,128") from None
    if any(s < 0 for s in steps):
        raise DynascopeError(f"--steps {text!r}: steps are 0 or more")
    return steps


def _at_least(low: int):
    """argparse type of a whole number of `low` or more (a count: 1, a step or index: 0), checked where parsed."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: give {low} or more")
        return value

    return parse


_count, _index = _at_least(1), _at_least(0)


def _directory(text: str) -> str:
    """argparse type of a run (or output) directory to read: one that exists, checked before anything heavy loads."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return text


def _checkpoints(text: str) -> str:
    """argparse type of a checkpoint list item: a directory, or a hub revision REPO@REVISION."""
    if "@" not in text and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory (a hub checkpoint is REPO_ID@REVISION)")
    return text


def _shard(text: str) -> tuple[int, int]:
    """argparse type of --shard: I/N with 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N")
    return index, count


def _json_options(text: str) -> dict:
    """argparse type of --options: a JSON object (errors keep their message: ArgumentTypeError)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("give a JSON object of analysis names to their options")
    return options


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return ("usage: dynascope [--version] COMMAND [options]\n\nTrack when interpretability phenomena emerge during "
            "language-model pretraining.\n\ncommands:\n" + "\n".join(lines) + "\n\n`dynascope COMMAND --help` "
            "describes a command's options.")


def _prepare(argv: list[str]) -> None:
    p = _Parser(prog="dynascope prepare", description=COMMANDS["prepare"],
                epilog="Any other arguments are `dynascope fit` arguments: the --data.* ones apply, the rest are "
                       "ignored, so a job script can pass the same arguments to both.")
    p.add_argument("--config", required=True, help=f"a YAML file, or a preset: {', '.join(preset_names())}")
    a, rest = p.parse_known_args(argv)
    from jsonargparse import ArgumentParser

    from dynascope.core.data import DataConfig, prepare_corpus
    from dynascope.core.io import read_yaml

    data = ArgumentParser(exit_on_error=False)
    data.add_class_arguments(DataConfig, "data")
    section = (read_yaml(preset(a.config)).get("data") or {})
    known = {k: v for k, v in section.items() if k in DataConfig.__dataclass_fields__}
    config = data.parse_args(["--data", json.dumps(known), *_data_arguments(rest)])
    print(prepare_corpus(data.instantiate(config).data))


def _data_arguments(argv: list[str]) -> list[str]:
    """The `--data.*` arguments (with their values) among `dynascope fit` arguments."""
    kept, i = [], 0
    while i < len(argv):
        takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if argv[i].startswith("--data."):
            kept += argv[i:i + 1 + takes_value]
        i += 1 + takes_value
    return kept


def _batch(argv: list[str]) -> None:
    p = _Parser(prog="dynascope batch", description=COMMANDS["batch"])
    p.add_argument("run", type=_directory, help="run directory (trainer.default_root_dir of `dynascope fit`)")
    p.add_argument("--step", type=_index, required=True, help="global step (0-based optimizer step)")
    p.add_argument("--rank", type=_index, default=0)
    p.add_argument("--micro", type=_index, default=0, help="micro-batch index under gradient accumulation")
    a = p.parse_args(argv)
    from dynascope.core.data import batch_text

    for i, text in enumerate(batch_text(a.run, a.step, a.rank, a.micro)):
        print(f"--- window {i} ---\n{text}")


def _analyze(argv: list[str]) -> None:
    p = _Parser(prog="dynascope analyze", description=COMMANDS["analyze"])
    p.add_argument("run", nargs="?", type=_directory, help="run directory of `dynascope fit`")
    p.add_argument("--hf", nargs="+", metavar="MODEL", type=_checkpoints,
                   help="Hugging Face checkpoints instead: local model directories, or hub revisions REPO@REVISION "
                        "(e.g. EleutherAI/pythia-160m@step1000; REPO@pythia-schedule: Pythia's 154 step branches), "
                        "read from the local HF cache when offline")
    p.add_argument("--out", help="output directory (required with --hf)")
    p.add_argument("--labels", help="comma-separated labels of the --hf directories, in order (e.g. step1000,...)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="with --hf: text files for the probe set and counts")
    p.add_argument("--probe", metavar="FILE", help="with --hf: these probe windows (e.g. RUN_DIR/probe.safetensors)")
    p.add_argument("--counts", metavar="FILE", help="with --hf: these training token counts (e.g. RUN_DIR/counts.npy)")
    p.add_argument("--tokens_per_step", type=_count, metavar="N",
                   help="with --hf: tokens_seen = step × N (Pythia: 2097152)")
    p.add_argument("--analyses", default="all", help="comma-separated analysis names, or all")
    p.add_argument("--steps", help="comma-separated snapshot steps (default: all)")
    p.add_argument("--batch_size", type=_count, help="probe batch size (default: the run's, else 16)")
    p.add_argument("--options", type=_json_options,
                   help='per-analysis options as JSON (default: the run\'s), e.g. \'{"regions": {"n_alpha": 31}}\'')
    p.add_argument("--outputs", type=_json_options, default={},
                   help='outputs besides metrics.csv, summary.json and tables/, as JSON, e.g. \'{"parquet": {}}\'')
    p.add_argument("--no_plot", action="store_true", help="skip the plots and the report page (draw them later "
                                                          "with `dynascope plot` and `dynascope report`)")
    p.add_argument("--wandb", action="store_true", help="record to wandb too (offline without a key): a run's "
                                                        "analysis goes into its training run")
    p.add_argument("--device", help="where to measure (default: cuda if there is a GPU, else cpu)")
    p.add_argument("--devices", type=_count, default=1,
                   help="worker processes sharing the checkpoints (on as many GPUs with --device cuda), merged")
    p.add_argument("--shard", type=_shard, metavar="I/N", help="only shard I of N (a Slurm array task); then --merge")
    p.add_argument("--merge", action="store_true", help="merge the shards written by --shard into one table")
    p.add_argument("--redo", action="store_true", help="measure every checkpoint again (default: only those not "
                                                       "recorded yet, so a killed replay continues)")
    p.add_argument("--keep_flagged", action="store_true",
                   help="judge onsets on checkpoints the integrity record flags too (default: leave them out)")
    a = p.parse_args(argv)
    if bool(a.hf) == bool(a.run):
        p.error("give a run directory or --hf MODEL_DIR ... (one of them)")
    if a.hf and not a.out:
        p.error("--hf needs --out OUT_DIR")
    if not a.hf and (a.probe or a.counts or a.tokens_per_step):
        p.error("--probe, --counts and --tokens_per_step go with --hf (a run has its own)")
    if sum([a.devices > 1, a.shard is not None, a.merge]) > 1:
        p.error("--devices, --shard and --merge exclude each other")
    import torch

    from dynascope import analyze as driver

    request = driver.AnalyzeRequest(
        run=a.run, hf=a.hf, out=a.out, labels=a.labels.split(",") if a.labels else None, data=a.data, probe=a.probe,
        counts=a.counts, tokens_per_step=a.tokens_per_step, analyses=a.analyses,
        steps=_steps(a.steps) if a.steps else None, batch_size=a.batch_size, options=a.options,
        outputs=({"wandb": {}} if a.wandb else {}) | a.outputs,
        device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"), redo=a.redo,
        keep_flagged=a.keep_flagged)
    if a.shard is not None:
        outcome = driver.analyze_shard(request, a.shard)
        print(f"shard {a.shard[0]}/{a.shard[1]}: {len(outcome.steps)} checkpoints in {outcome.files.root}; merge the "
              "shards with --merge when all are done")
        return
    if a.devices > 1:
        driver.analyze_in_parallel(request, a.devices)
    outcome = driver.merge(request, not a.no_plot) if a.merge or a.devices > 1 else driver.analyze(request,
                                                                                                  not a.no_plot)
    if driver.report(outcome):
        sys.exit(1)


def _export(argv: list[str]) -> None:
    p = _Parser(prog="dynascope export", description=COMMANDS["export"])
    p.add_argument("run", type=_directory, help="run directory of `dynascope fit`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=_index, help="the snapshot to export, into OUT_DIR")
    which.add_argument("--all", action="store_true", help="every snapshot, into OUT_DIR/stepN")
    p.add_argument("out", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty directory, replacing only the export's own files there")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this hub repo, step N as its branch stepN (Pythia's "
                                                     "layout); needs `hf auth login`")
    a = p.parse_args(argv)
    from dynascope.export import export_run, push

    exports = export_run(a.run, a.out, None if a.all else a.step, a.overwrite)
    for step, path in exports.items():
        print(f"step {step}: {path}")
    if a.push:
        push(exports, a.push)
        print(f"pushed: https://huggingface.co/{a.push} (branches {', '.join(f'step{s}' for s in exports)})")


def _sync(argv: list[str]) -> None:
    p = _Parser(prog="dynascope sync", description=COMMANDS["sync"])
    p.add_argument("run", type=_directory, help="run directory of `dynascope fit`")
    p.add_argument("--project", help="wandb project (default: the run's, from its logger settings)")
    a = p.parse_args(argv)
    if not RunFiles(a.run).wandb_id.is_file():
        raise DynascopeError(f"{a.run} has no wandb_id: it is not the run directory of a `dynascope fit`")
    from dynascope.pages.publish import sync_run

    print(f"wandb run: {sync_run(Path(a.run), a.project)}")


def _plot(argv: list[str]) -> None:
    p = _Parser(prog="dynascope plot", description=COMMANDS["plot"])
    p.add_argument("run", type=_directory, help="run directory (or --hf output directory of `dynascope analyze`)")
    p.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    a = p.parse_args(argv)
    from dynascope.pages.plots import plot_run

    print(f"overview: {plot_run(a.run, a.out)}")


def _report(argv: list[str]) -> None:
    p = _Parser(prog="dynascope report", description=COMMANDS["report"])
    p.add_argument("run", type=_directory, help="run directory, or the --out directory of `dynascope analyze --hf`")
    p.add_argument("--out", help="where to write index.html and its PNGs (default: RUN_DIR/report)")
    a = p.parse_args(argv)
    from dynascope.pages.report import write_report

    print(f"report: {write_report(a.run, a.out)}")


def _sweep(argv: list[str]) -> None:
    p = _Parser(prog="dynascope sweep", description=COMMANDS["sweep"], allow_abbrev=False,
                epilog="Any other arguments are `dynascope fit` arguments, given to every run.")
    p.add_argument("--config", required=True, help=f"a YAML file, or a preset: {', '.join(preset_names())}")
    p.add_argument("--grid", required=True, help='"KEY=V1,V2 KEY=V1,V2 ..." (fit options without dashes; seed sets '
                   'seed_everything and data.seed), e.g. "seed=1,2 model.arch.activation=relu,gelu", or a YAML file '
                   "mapping keys to lists of values")
    p.add_argument("--out", required=True, help="the sweep directory: a run directory per combination")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm array job of slurm/train.sbatch instead")
    p.add_argument("--sbatch", default="", help='with --slurm, sbatch options, e.g. --sbatch="--gres=gpu:1 '
                   '--ntasks-per-node=1"')
    a, fit_args = p.parse_known_args(argv)
    from dynascope.train.sweep import MANIFEST, read_grid, sweep

    done = sweep(preset(a.config), read_grid(a.grid), a.out, fit_args, a.slurm, shlex.split(a.sbatch))
    compare = f"dynascope compare {a.out}/*=*/ --out {a.out}/compare"  # run names hold "="
    if a.slurm:
        print(f"sweep: Slurm array job {done}, its runs listed in {Path(a.out) / MANIFEST}; when it is done: {compare}")
    else:
        print(f"sweep: {len(done)} runs in {a.out}; compare them: {compare}")


def _compare(argv: list[str]) -> None:
    p = _Parser(prog="dynascope compare", description=COMMANDS["compare"])
    p.add_argument("dirs", nargs="+", metavar="DIR", type=_directory,
                   help="run directories and `analyze --hf` output directories")
    p.add_argument("--out", required=True, help="where to write index.html and its PNGs")
    a = p.parse_args(argv)
    from dynascope.pages.compare import write_compare

    print(f"compare: {write_compare(a.dirs, a.out)}")


def _onsets(argv: list[str]) -> None:
    p = _Parser(prog="dynascope onsets", description=COMMANDS["onsets"])
    p.add_argument("run", type=_directory, help="run directory (or the --out directory of `dynascope analyze --hf`)")
    a = p.parse_args(argv)
    from dynascope.pages.onsets import format_rows, onset_rows, onset_summary

    rows = onset_rows(onset_summary(a.run), a.run)
    print(format_rows(rows) if rows else f"{a.run}: no onsets yet (measure it: dynascope analyze {a.run})")


def _zoom(argv: list[str]) -> None:
    p = _Parser(prog="dynascope zoom", description=COMMANDS["zoom"],
                epilog="The zoom is RUN/zoom/A-B, a run directory of its own; the run's files are not touched. "
                       "`dynascope analyze RUN` then includes its points.")
    p.add_argument("run", type=_directory,
                   help="run directory of `dynascope fit`, with a resume checkpoint at or before --from")
    p.add_argument("--from", dest="start", type=_index, metavar="A", help="the first step of the stretch")
    p.add_argument("--to", dest="end", type=_index, metavar="B", help="its last step")
    p.add_argument("--every", type=_count, default=1, metavar="K", help="a snapshot every K steps (default: 1)")
    p.add_argument("--onset", metavar="EVENT", help="take --from and --to from this onset's bracket, e.g. "
                                                    "outliers/emergence (`dynascope onsets RUN` lists them)")
    a = p.parse_args(argv)
    if a.onset and (a.start is not None or a.end is not None):
        p.error("--onset takes the bracket from the run; give it, or --from and --to, not both")
    if not a.onset and (a.start is None or a.end is None):
        p.error("give --from A and --to B, or --onset EVENT")
    from dynascope.zoom import bracket, zoom

    start, end = bracket(RunFiles(a.run), a.onset) if a.onset else (a.start, a.end)
    zoomed = zoom(a.run, start, end, a.every)
    print(f"zoom: {zoomed.root} (steps {start}-{end} every {a.every}); measure it with the run: "
          f"dynascope analyze {a.run}")


def _verify(argv: list[str]) -> None:
    p = _Parser(prog="dynascope verify", description=COMMANDS["verify"],
                epilog="Writes integrity.csv (fingerprint, distances to the first, previous and last checkpoint, "
                       "flags) into RUN_DIR/analysis/ or --out, and one warning per flagged checkpoint.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINTS", type=_checkpoints,
                   help="a run directory, or Hugging Face model directories and hub revisions REPO@REVISION")
    p.add_argument("--out", help="where the integrity record of Hugging Face checkpoints goes")
    p.add_argument("--labels", help="comma-separated labels of the Hugging Face checkpoints, in order")
    a = p.parse_args(argv)
    from dynascope.verify import verify

    files, rows, skipped = verify(a.checkpoints, a.out, a.labels.split(",") if a.labels else None)
    print(f"integrity: {files.integrity_csv} ({len(rows)} checkpoints, {sum(bool(r['flags']) for r in rows)} "
          "flagged)")
    if skipped:
        print(f"dynascope: {len(skipped)} checkpoint(s) could not be loaded: {', '.join(skipped)}", file=sys.stderr)
        sys.exit(1)


FIT_USAGE = """usage: dynascope fit --config CONFIG [--SECTION.OPTION VALUE ...] [--ckpt_path last|auto|PATH]

{description}

  --config CONFIG     a YAML file, or a preset: {presets}
  --ckpt_path last    resume the run in trainer.default_root_dir (auto: resume if it has a checkpoint, else start)
  --print_config      print the resolved configuration and exit
  --report false      leave out the plots and the report page at the end
  --start_over true   start a new run in a directory that holds one, moving the old run aside
  --stop_on_divergence false   train on past a non-finite loss (default: stop there, exit 3)

Every option of each section can be set in the YAML or as --SECTION.OPTION:
  --model.*           the architecture (--model.arch.n_layers, .d_model, .activation, ...), the optimizer (--model.lr)
  --data.*            the corpus, tokenizer and batches (--data.source, --data.batch_size, ...)
  --trainer.*         Lightning's Trainer (--trainer.max_steps, --trainer.default_root_dir, --trainer.devices, ...)
  --snapshots.*       the snapshot schedule
  --checkpoints.*     the resume checkpoints
  --dynamics.*        the analyses measured while training (--dynamics.analyses, --dynamics.options)
  --outputs           where the record goes besides the run directory (wandb, parquet)
  --seed_everything   the seed

  --help_all          every option with its documentation (loads Lightning: a few seconds)"""


def _fit(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(FIT_USAGE.format(description=COMMANDS["fit"].split(" (")[0], presets=", ".join(preset_names())))
        return
    args = ["--help" if a == "--help_all" else a for a in argv[1:]]
    for i, a in enumerate(args):  # a preset by name; jsonargparse reads the file
        if a == "--config" and i + 1 < len(args):
            args[i + 1] = preset(args[i + 1])
        elif a.startswith("--config="):
            args[i] = "--config=" + preset(a.split("=", 1)[1])
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dynascope.train.cli import fit_cli

    try:
        fit_cli(args)
    except SIGTERMException:  # Lightning ends a SIGTERM'd run with a plain SystemExit (status 0)
        raise Interrupted("training stopped by SIGTERM; resume with --ckpt_path last", 128 + 15) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] == "--version":
        from dynascope import __version__

        print(f"dynascope {__version__}")
        return
    if argv[0] not in COMMANDS:
        print(f"dynascope: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    handlers = {"fit": _fit, "prepare": _prepare, "batch": _batch, "analyze": _analyze, "export": _export,
                "plot": _plot, "report": _report, "sync": _sync, "sweep": _sweep, "compare": _compare,
                "onsets": _onsets, "zoom": _zoom, "verify": _verify}
    try:
        handlers[argv[0]](argv if argv[0] == "fit" else argv[1:])
    except (DynascopeError, argparse.ArgumentError) as e:
        print(f"dynascope: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only file system, a missing permission: what, where, what to do
        where = f"{e.filename}: " if e.filename else ""
        print(f"dynascope: error: {where}{e.strerror or e}; check that it exists and is writable and that its disk "
              "has space, then run the command again (files already written are whole)", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"dynascope: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def command() -> None:
    """The `dynascope` executable (and `python -m dynascope.cli`): `main` in a process of its own, whose
    allocator it tunes (`dynascope.core.heap`)."""
    heap_up_to()
    main()


if __name__ == "__main__":
    command()
