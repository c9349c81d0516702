"""Integrity of a sequence of checkpoints: is each one the training state its step claims to be?

Public checkpoint suites have served the final weights under earlier step branches, the same weights
under many steps, and step-0 weights of another initialisation. An onset read off such a suite is
garbage, so every checkpoint analysed gets, from its loaded weights (whatever the file format or
sharding):

- `fingerprint`: sha256 over the tensors in name order (name, dtype, shape, bytes);
- a sketch: `SKETCH` coordinates of the weights at fixed seeded positions of each tensor (in proportion to
  its size), from which the relative distances ‖θ − θ_ref‖ / ‖θ_ref‖ to the first checkpoint
  (`dist_first`), the previous one (`dist_prev`) and the last one (`dist_last`) are estimated (on the
  demo's snapshots within 1% of the distance over all weights).

Flags, in step order, each with a one-line reason:

- `equals_final`: the last checkpoint's fingerprint at another step;
- `duplicate`: another checkpoint's fingerprint at another step (not the last's);
- `out_of_order`: the distances contradict the step order. Each checkpoint's position along training is
  p = dist_first / (dist_first + dist_last) (0 at the first, 1 at the last); a checkpoint is flagged when
  its position lies outside the span of its two neighbours' in step order (by more than `TOLERANCE`;
  checkpoints flagged above are left out). Two swapped checkpoints are both flagged, and the ones between
  them are not; one checkpoint from elsewhere in training also flags a neighbour whose span it distorts;
- `not_from_init`: a step-0 checkpoint from which the weights would have moved more than `INIT_JUMP` (10)
  times faster per step to the next checkpoint than they move per step from that one to the one after
  it: another initialisation than the one training started from (independent inits lie about √2 times
  their norm apart; one optimizer step moves them a small fraction of it).

Flagged checkpoints are measured and recorded like the others; the onsets leave them out unless asked
to keep them (`dynascope analyze --keep_flagged`).
"""

from __future__ import annotations

import csv
import hashlib
import sys
import zlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dynascope.core.errors import DynascopeError
from dynascope.core.io import atomic_path
from dynascope.core.runfiles import RecordFiles

SKETCH = 16_384  # coordinates per checkpoint: 64 KiB each
TOLERANCE = 0.01
INIT_JUMP = 10  # how much faster than the next interval the weights may move from step 0 to the next checkpoint
COLUMNS = ["label", "step", "fingerprint", "dist_first", "dist_prev", "dist_last", "flags"]


@dataclass
class Print:
    """A checkpoint's fingerprint and sketch."""

    label: str
    step: int
    fingerprint: str
    sketch: np.ndarray
    layout: str  # the tensors' names and shapes: sketches of the same layout compare


def weights_print(label: str, step: int, tensors: Mapping[str, torch.Tensor]) -> Print:
    """The fingerprint and sketch of a checkpoint's tensors ({name: tensor}, on any device)."""
    digest = hashlib.sha256()
    layout = hashlib.sha256(repr([(n, tuple(tensors[n].shape)) for n in sorted(tensors)]).encode()).hexdigest()
    total = sum(t.numel() for t in tensors.values())
    parts = []
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        k = max(1, round(SKETCH * t.numel() / total))
        where = torch.randint(t.numel(), (k,), generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        parts.append(t[where.to(t.device)].float().cpu().numpy())
    return Print(label, step, digest.hexdigest(), np.concatenate(parts), layout)


def distance(a: Print, ref: Print) -> float:
    """‖a − ref‖ / ‖ref‖ over two sketches; NaN for checkpoints of different models (their layouts differ)."""
    if a.layout != ref.layout:
        return float("nan")
    x, r = a.sketch.astype(np.float64), ref.sketch.astype(np.float64)
    return float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30))


def integrity_rows(prints: list[Print]) -> list[dict]:
    """The integrity record of checkpoints (any order): one row per checkpoint in step order, with its flags."""
    prints = sorted(prints, key=lambda p: p.step)
    if not prints:
        return []
    first, last = prints[0], prints[-1]
    by_label = {p.label: p for p in prints}
    flags: list[list[str]] = [[] for _ in prints]
    holders: dict[str, list[str]] = defaultdict(list)
    for p in prints:
        holders[p.fingerprint].append(p.label)
    for i, p in enumerate(prints[:-1]):
        if p.fingerprint == last.fingerprint:
            flags[i].append(f"equals_final: the same weights as the last checkpoint ({last.label})")
        elif len(holders[p.fingerprint]) > 1:
            twins = ", ".join(label for label in holders[p.fingerprint] if label != p.label)
            flags[i].append(f"duplicate: the same weights as {twins}")
    rows = [{"label": p.label, "step": p.step, "fingerprint": p.fingerprint,
             "dist_first": distance(p, first), "dist_prev": distance(p, prints[i - 1]) if i else float("nan"),
             "dist_last": distance(p, last)} for i, p in enumerate(prints)]
    for i in _out_of_order(rows, [bool(f) for f in flags]):
        flags[i].append(f"out_of_order: its distances to the first and last checkpoints put it elsewhere in "
                        f"training than step {prints[i].step}")
    later = [row for row, f in zip(rows[1:], flags[1:], strict=True) if not f]  # not copies, in order
    if prints[0].step == 0 and len(later) >= 2:
        nxt, after = later[0], later[1]
        rate0 = nxt["dist_first"] / nxt["step"]  # per step, from step 0 to the next checkpoint
        rate1 = distance(by_label[after["label"]], by_label[nxt["label"]]) / (after["step"] - nxt["step"])
        if rate0 > INIT_JUMP * rate1:
            flags[0].append(f"not_from_init: {rate0:.3g} per step from here to {nxt['label']}, {rate0 / rate1:.0f}× "
                            f"the {rate1:.3g} per step from {nxt['label']} to {after['label']}")
    for row, reasons in zip(rows, flags, strict=True):
        row["flags"] = "; ".join(reasons)
    return rows


def _out_of_order(rows: list[dict], excluded: list[bool]) -> list[int]:
    """Indices of the rows whose position lies outside the span of their neighbours' (in step order)."""
    # another model's checkpoints have NaN distances, which compare False: left out
    idx = [i for i, row in enumerate(rows) if not excluded[i] and row["dist_first"] + row["dist_last"] > 0]
    pos = [rows[i]["dist_first"] / (rows[i]["dist_first"] + rows[i]["dist_last"]) for i in idx]
    out = []
    for j in range(len(idx)):  # the first has only a later neighbour, the last only an earlier one
        neighbours = [pos[k] for k in (j - 1, j + 1) if 0 <= k < len(idx)]
        lo = min(neighbours) if j else 0.0
        hi = max(neighbours) if j < len(idx) - 1 else 1.0
        if not lo - TOLERANCE <= pos[j] <= hi + TOLERANCE:
            out.append(idx[j])
    return out


def warn_flagged(rows: list[dict], consequence: str) -> None:
    """One line on stderr per flagged checkpoint, naming it, why, and what follows from it."""
    for row in rows:
        if row["flags"]:
            print(f"dynascope: integrity: {row['label']} (step {row['step']}): {row['flags']}; {consequence}",
                  file=sys.stderr)


def flagged(rows: list[dict]) -> dict[int, str]:
    """{step: its flags} of the flagged rows."""
    return {int(row["step"]): row["flags"] for row in rows if row["flags"]}


def save_print(files: RecordFiles, p: Print) -> None:
    """A recorded checkpoint's print, written atomically: the mark that it was recorded whole."""
    with atomic_path(files.print_file(p.step)) as tmp, open(tmp, "wb") as f:
        np.savez(f, label=p.label, fingerprint=p.fingerprint, sketch=p.sketch, layout=p.layout)


def load_prints(files: RecordFiles) -> list[Print]:
    """The prints of the checkpoints recorded in `files`, in step order."""
    out = []
    for path in files.prints.glob("*.npz") if files.prints.is_dir() else []:
        try:
            with np.load(path) as f:
                out.append(Print(str(f["label"]), int(path.stem), str(f["fingerprint"]), f["sketch"],
                                 str(f["layout"])))
        except (OSError, ValueError, KeyError) as e:
            raise DynascopeError(f"{path} cannot be read ({e}); delete it and that checkpoint is measured "
                                 "again") from None
    return sorted(out, key=lambda p: p.step)


def write_integrity(files: RecordFiles, rows: list[dict]) -> None:
    with atomic_path(files.integrity_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_integrity(files: RecordFiles) -> list[dict]:
    """integrity.csv's rows (none when it was not written), distances as floats."""
    if not files.integrity_csv.exists():
        return []
    with open(files.integrity_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{**r, "step": int(r["step"]), **{k: float(r[k]) for k in ("dist_first", "dist_prev", "dist_last")}}
            for r in rows]
