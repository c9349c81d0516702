"""The command line as a user meets it: help and argument errors before anything heavy loads, one flag style,
a positional run directory, presets and Slurm templates shipped in the wheel, progress from the first second, and
an allocator that keeps a training step's large tensors for the next."""

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import copy_run, tiny_args

from dynascope.cli import COMMANDS, main
from dynascope.core.presets import preset, preset_names, slurm_template

REPO = Path(__file__).parents[1]

ANSWERED_AT_ONCE = [["--help"], ["--version"], ["fit", "--help"], *([c, "--help"] for c in COMMANDS if c != "fit"),
                    ["plot", "/nonexistent"], ["verify", "/nonexistent"], ["analyze"], ["analyze", "/nonexistent"],
                    ["batch", "--step", "3"], ["export", "/nonexistent", "--step", "1", "out"],
                    ["compare", "/nonexistent", "--out", "x"], ["onsets", "/nonexistent"], ["zoom", "/nonexistent"]]

PROBE = """
import contextlib, io, json, sys
from dynascope.cli import main
heavy = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main(argv)
        except SystemExit:
            pass
    heavy.append([m for m in ("torch", "lightning", "matplotlib", "transformers") if m in sys.modules])
    assert "Traceback" not in err.getvalue()
print(json.dumps(heavy))
"""


def test_help_and_argument_errors_load_nothing_heavy():
    """What makes `--help` take seconds is importing torch and Lightning: none of these answers imports them."""
    import json

    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(ANSWERED_AT_ONCE)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [[]] * len(ANSWERED_AT_ONCE)


def test_version_and_errors_name_the_argument(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"dynascope {version('dynascope')}"
    with pytest.raises(SystemExit) as exit_:
        main(["plot", "/nonexistent/run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("dynascope: error: dynascope plot: argument run: /nonexistent/run: no "
                                               "such directory (see dynascope plot --help)")


def test_one_flag_style_and_a_positional_run_directory(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help_all" if command == "fit" else "--help"])
        text = capsys.readouterr().out
        kebab = re.findall(r"^  (--[a-z]+-[\w-]+)", text, re.M)  # option lines, not sbatch options in a help text
        assert kebab == [], (command, kebab)
        if command in ("batch", "analyze", "export", "plot", "report", "sync", "onsets", "zoom"):
            assert re.search(r"positional arguments:\s+run\b", text), command


def test_presets_and_slurm_templates_ship_in_the_wheel(tmp_path):
    assert preset_names() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert Path(preset("tiny-relu")).read_text() == (REPO / "configs" / "tiny-relu.yaml").read_text()
    assert preset("no-such-preset") == "no-such-preset"  # left for the caller's own error
    assert slurm_template("train.sbatch").read_text() == (REPO / "slurm" / "train.sbatch").read_text()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dynascope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"dynascope/configs/{p}.yaml" for p in preset_names()} <= names
    assert {"dynascope/slurm/train.sbatch", "dynascope/slurm/analyze.sbatch", "dynascope/slurm/zoom.sbatch"} <= names
    # from anywhere, a preset by name
    printed = subprocess.run([sys.executable, "-m", "dynascope.cli", "fit", "--config", "tiny-relu", "--print_config"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert printed.returncode == 0 and "n_layers: 4" in printed.stdout, printed.stderr[-1000:]


def test_plot_out_writes_there_and_leaves_other_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not ours")
    main(["plot", str(tiny_run), "--out", str(out)])
    assert capsys.readouterr().out.strip() == f"overview: {out / 'overview.png'}"
    assert (out / "holiday.png").read_bytes() == b"not ours" and (out / "sparsity.png").stat().st_size > 1000


def test_progress_shows_within_the_first_measurement_and_each_replayed_checkpoint(tiny_run, corpus_file, tmp_path):
    """The step-0 measurement runs before the first training step: its stages show in a bar of their own, on the
    training bar's stream (a file, as under Slurm); a replay shows each checkpoint's stages too."""
    args = tiny_args(corpus_file, tmp_path / "run", 2)
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    fit = subprocess.run([sys.executable, "-m", "dynascope.cli", *args], capture_output=True, text=True, cwd=REPO)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "analysing step 0" in fit.stdout and "probe batch 1/" in fit.stdout
    assert "Tip:" not in fit.stdout + fit.stderr and "`srun` command" not in fit.stderr  # Lightning's noise
    assert fit.stdout.index("training:") < fit.stdout.index("analysing step 0") < fit.stdout.index("1/2 steps")
    run = copy_run(tiny_run, tmp_path / "copy")
    replay = subprocess.run([sys.executable, "-m", "dynascope.cli", "analyze", str(run), "--redo", "--no_plot",
                             "--steps", "0,2"], capture_output=True, text=True, cwd=REPO)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "checkpoint 2:" in replay.stderr and "probe batch 1/" in replay.stderr and "frequency" in replay.stderr


MAPPED = """
import ctypes, json, sys
import torch
from dynascope.core.heap import heap_up_to
class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
tuned = sys.argv[1] == "1" and heap_up_to()
logits = torch.ones(16, 128, 4096)  # 32 MiB, a training step's logits
mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc 2.33 and later
if mallinfo2 is not None:
    mallinfo2.restype = Mallinfo2
print(json.dumps([tuned, mallinfo2 and mallinfo2().hblkhd]))
"""


def test_the_command_keeps_a_step_s_32_mib_logits_on_glibc_s_heap():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    (_, mapped), (tuned, mapped_tuned) = (json.loads(subprocess.run(
        [sys.executable, "-c", MAPPED, tune], env=env, check=True, capture_output=True, text=True).stdout)
        for tune in ("0", "1"))
    if not tuned:
        pytest.skip("not glibc 2.35 or later: heap_up_to leaves malloc alone")
    assert mapped >= 32 << 20 > mapped_tuned  # bytes in mmapped blocks, the logits alive: mapped afresh, or on the heap
