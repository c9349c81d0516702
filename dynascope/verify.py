"""`dynascope verify`: the integrity record of a run's snapshots or of Hugging Face checkpoints, without measuring
anything, so that a suite can be checked before hours are spent on it.

Each checkpoint is loaded as `dynascope analyze` loads it (so the fingerprints agree), printed
(`analysis/integrity.py`), and let go; integrity.csv and the prints go where `analyze` writes them:
RUN_DIR/analysis/, or `--out`. A print alone does not mark a checkpoint as measured: `analyze` still
measures it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from dynascope.analysis.hub import hf_source
from dynascope.analysis.integrity import (
    integrity_rows,
    load_prints,
    save_print,
    warn_flagged,
    weights_print,
    write_integrity,
)
from dynascope.analysis.replay import Source, run_source
from dynascope.core.errors import DynascopeError
from dynascope.core.io import ensure_writable
from dynascope.core.runfiles import RecordFiles, RunFiles


def verify_source(paths: list[str], out: str | None, labels: list[str] | None) -> tuple[Source, RecordFiles]:
    """The checkpoints named (one run directory, or Hugging Face model directories and hub revisions) and where
    their integrity record goes."""
    if len(paths) == 1 and RunFiles(paths[0]).config.is_file():
        return run_source(paths[0]), RunFiles(paths[0]).analysis
    for path in paths:
        model_dir = (Path(path) / "config.json").is_file()
        hub_revision = "@" in path and not Path(path).exists()
        if not (model_dir or hub_revision):
            raise DynascopeError(f"verify {path}: neither a run directory (no config.yaml) nor a Hugging Face model "
                                 "(no config.json); give a run directory, model directories, or REPO_ID@REVISION")
    if out is None:
        raise DynascopeError("verify: Hugging Face checkpoints need --out OUT_DIR for their integrity record")
    return hf_source(paths, labels)[0], RecordFiles(out)


def verify(paths: list[str], out: str | None = None, labels: list[str] | None = None) -> tuple[RecordFiles, list[dict],
                                                                                             list[str]]:
    """Print every checkpoint, write the integrity record and warn about each flagged checkpoint; the files, the
    record's rows and the labels of the checkpoints that could not be loaded."""
    source, files = verify_source(paths, out, labels)
    ensure_writable(files.root)
    skipped = []
    for ckpt in tqdm(source.checkpoints, desc="verifying checkpoints", unit="ckpt"):
        try:
            view = source.load_view(ckpt.label, "cpu")
        except DynascopeError as e:
            tqdm.write(f"dynascope: skipped: {e}", file=sys.stderr)
            skipped.append(ckpt.label)
            continue
        save_print(files, weights_print(ckpt.label, ckpt.step, view.model.state_dict()))
    labels_now = {c.label for c in source.checkpoints}
    rows = integrity_rows([p for p in load_prints(files) if p.label in labels_now])
    write_integrity(files, rows)
    warn_flagged(rows, "`dynascope analyze` leaves it out of the onsets")
    return files, rows, skipped
