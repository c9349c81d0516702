"""Public checkpoint suites at scale: a planted hub suite whose branches are not what their steps claim, flat memory
over 30 revisions, and a killed replay that continues to the uninterrupted result."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import copy_run

from dynascope.analysis import build
from dynascope.analysis.integrity import read_integrity
from dynascope.analysis.replay import replay_events
from dynascope.analysis.view import ModelShape
from dynascope.cli import main
from dynascope.core.io import atomic_write_text, read_json, read_yaml
from dynascope.core.model import ModelConfig, Transformer
from dynascope.core.records import read_csv, read_table
from dynascope.core.runfiles import RecordFiles, RunFiles
from dynascope.core.snapshots import read_manifest, write_snapshot

pytest.importorskip("transformers")

DYNASCOPE = str(Path(sys.executable).with_name("dynascope"))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OPTIONS = '{"regions": {"pairs_per_window": 1}, "sparsity": {"dead_min_tokens": 256}}'  # as the tiny run's config


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory) -> dict[int, Path]:
    """The tiny run's snapshots as Hugging Face GPT-2 directories, by step."""
    out = tmp_path_factory.mktemp("exports") / "hf"
    main(["export", str(tiny_run), "--all", str(out)])
    return {int(d.name.removeprefix("step")): d for d in out.iterdir()}


def hub_suite(exports: dict[int, Path], root: Path, monkeypatch, served: dict[int, int]) -> list[str]:
    """An offline hub cache holding org/suite with a branch stepN per export, branch stepN serving the export of
    step served.get(N, N); the suite's REPO@REVISION names."""
    from huggingface_hub import constants

    repo = root / "hub" / "models--org--suite"
    (repo / "refs").mkdir(parents=True)
    for step, export in exports.items():
        shutil.copytree(export, repo / "snapshots" / f"{step:040x}")
    for step in exports:
        (repo / "refs" / f"step{step}").write_text(f"{served.get(step, step):040x}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return [f"org/suite@step{s}" for s in sorted(exports)]


def test_a_planted_suite_is_flagged_and_its_onsets_skip_the_flagged_branches(exports, tiny_run, tmp_path, monkeypatch,
                                                                           capsys):
    steps = sorted(exports)  # 0, 1, 2, 4, 6, 7
    final, copy, swapped = steps[-1], steps[1], (steps[2], steps[4])
    names = hub_suite(exports, tmp_path, monkeypatch, {copy: final, swapped[0]: swapped[1], swapped[1]: swapped[0]})
    main(["verify", *names, "--out", str(tmp_path / "verified")])
    out = capsys.readouterr()
    assert "3 flagged" in out.out and out.err.count("dynascope: integrity: ") == 3
    expected = {copy: "equals_final", swapped[0]: "out_of_order", swapped[1]: "out_of_order"}
    verified = read_integrity(RecordFiles(tmp_path / "verified"))
    assert {r["step"]: r["flags"].split(":")[0] for r in verified if r["flags"]} == expected

    args = ["analyze", "--hf", *names, "--probe", str(RunFiles(tiny_run).probe), "--counts",
            str(RunFiles(tiny_run).counts), "--options", OPTIONS, "--no_plot"]
    main([*args, "--out", str(tmp_path / "out")])  # exit 0: flagged checkpoints are recorded, and warned about
    out = capsys.readouterr()
    assert out.err.count("; left out of the onsets") == 3 and "integrity: " in out.out
    files = RecordFiles(tmp_path / "out")
    rows = read_integrity(files)
    assert {r["step"]: r["flags"].split(":")[0] for r in rows if r["flags"]} == expected
    assert [(r["step"], r["fingerprint"]) for r in rows] == [(r["step"], r["fingerprint"]) for r in verified]
    assert len(read_csv(files.metrics_csv)) == len(steps)

    def events(left_out: set[int]) -> dict:
        shape = ModelShape(**read_json(files.shape))
        tables = {key: read_table(path) for key, path in files.table_files().items()}
        return replay_events(build("all", shape, None, None), tables, left_out)

    summary = read_json(files.summary)
    assert summary == {**summary, **events(set(expected))} and events(set(expected)) != events(set())
    main(["report", str(tmp_path / "out")])
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "6 checkpoints fingerprinted" in page and "3 flagged, left out of the onsets" in page
    assert page.count("<td>out_of_order: ") == 2 and page.count("<td>equals_final: ") == 1
    main([*args, "--out", str(tmp_path / "kept"), "--keep_flagged"])
    assert read_json(RecordFiles(tmp_path / "kept").summary) == {**summary, **events(set())}


def test_a_clean_suite_flags_nothing(exports, tmp_path, monkeypatch, capsys):
    names = hub_suite(exports, tmp_path, monkeypatch, {})
    main(["verify", *names, "--out", str(tmp_path / "verified")])
    assert "0 flagged" in capsys.readouterr().out
    rows = read_integrity(RecordFiles(tmp_path / "verified"))
    assert len(rows) == len(exports) and not any(r["flags"] for r in rows)
    assert all(a["dist_first"] < b["dist_first"] for a, b in zip(rows, rows[1:], strict=False))


def test_verify_names_a_path_that_is_neither_a_run_nor_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp_path / "notes")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"verify {tmp_path / 'notes'}: neither a run directory" in err and "REPO_ID@REVISION" in err
    assert not (tmp_path / "notes" / "integrity.csv").exists()


def big_run(tiny_run: Path, root: Path, revisions: int) -> Path:
    """The tiny run's probe set and counts with a model of 4 layers, d 256 (about 20 MB of weights) and
    `revisions` snapshots along a random trajectory."""
    run = copy_run(tiny_run, root)
    for p in ("snapshots", "analysis", "checkpoints"):
        shutil.rmtree(run / p, ignore_errors=True)
    config = read_yaml(RunFiles(run).config)
    config["model"]["arch"] |= {"n_layers": 4, "d_model": 256, "n_heads": 4, "d_mlp": 1024}
    atomic_write_text(RunFiles(run).config, yaml.safe_dump(config))
    arch = ModelConfig(**config["model"]["arch"])
    torch.manual_seed(0)
    model = Transformer(arch)
    for step in range(revisions):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        write_snapshot(run, step, model.state_dict(), {"tokens_seen": 128.0 * step, "config_hash": arch.hash()})
    return run


PEAKS = """
import sys
from dynascope.analysis.replay import run_replay
replay = run_replay(sys.argv[1])
for record in replay.records():
    replay.prints.pop(record.step)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(int(status["VmHWM"].split()[0]) // 1024, flush=True)  # peak resident MB so far
"""


def test_memory_stays_flat_over_thirty_revisions(tiny_run, tmp_path):
    run = big_run(tiny_run, tmp_path, 32)
    out = subprocess.run([sys.executable, "-c", PEAKS, str(run)], capture_output=True, text=True, timeout=600,
                         env=ONE_THREAD)
    peaks = [int(line) for line in out.stdout.split()]
    assert out.returncode == 0 and len(peaks) == 32, out.stderr[-2000:]
    # one model is 21 MB: keeping each revision would add ~550 MB from the 5th to the 32nd
    assert peaks[-1] - peaks[4] < 40, peaks


def kill_after(args: list[str], prints: Path, count: int) -> None:
    """Run `dynascope ARGS` and kill -9 it once `count` checkpoints are recorded (their prints written)."""
    proc = subprocess.Popen([DYNASCOPE, *args], env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(prints.glob("*.npz"))) < count:
        time.sleep(0.02)
    assert proc.poll() is None, "the replay ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def record_of(files: RecordFiles) -> tuple:
    rows = [{k: v for k, v in r.items() if not k.startswith("dynamics/")} for r in read_csv(files.metrics_csv)]
    tables = {key: read_table(path) for key, path in files.table_files().items()}
    return repr(rows), read_json(files.summary), tables, repr(read_integrity(files))


@pytest.mark.parametrize("kind", ["run", "hf"])
def test_a_killed_replay_continues_to_the_uninterrupted_result(kind, tiny_run, exports, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    shutil.rmtree(RunFiles(run).analysis.root)
    if kind == "run":
        args, files = ["analyze", str(run), "--no_plot"], RunFiles(run).analysis
        whole = ["analyze", str(copy_run(run, tmp_path / "whole")), "--no_plot"]
        whole_files = RunFiles(tmp_path / "whole" / run.name).analysis
    else:
        hf = ["--hf", *(str(exports[s]) for s in sorted(exports)), "--probe", str(RunFiles(run).probe), "--counts",
              str(RunFiles(run).counts), "--options", OPTIONS, "--no_plot"]
        args, files = ["analyze", *hf, "--out", str(tmp_path / "out")], RecordFiles(tmp_path / "out")
        whole, whole_files = ["analyze", *hf, "--out", str(tmp_path / "whole")], RecordFiles(tmp_path / "whole")
    kill_after(args, files.prints, 2)
    total = len(read_manifest(run))
    done = {int(r["step"]) for r in read_csv(files.metrics_csv)} & {int(p.stem) for p in files.prints.glob("*.npz")}
    assert 2 <= len(done) < total
    resumed = subprocess.run([DYNASCOPE, *args], env=ONE_THREAD, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({total - len(done)} checkpoints measured now)" in resumed.stdout  # only those not recorded yet
    subprocess.run([DYNASCOPE, *whole], env=ONE_THREAD, check=True, capture_output=True)
    assert record_of(files) == record_of(whole_files)
