"""Offline replay sharded across processes equals the one-process replay: the table, the summary events
(recomputed over the merged rows) and the tables."""

import shutil

import pytest
from helpers import copy_run

from dynascope.analysis.integrity import read_integrity
from dynascope.analysis.replay import Checkpoint, pending
from dynascope.cli import main
from dynascope.core.io import read_json
from dynascope.core.records import read_csv, read_table
from dynascope.core.runfiles import RunFiles


def outputs(analysis_dir):
    rows = {int(r["step"]): r for r in read_csv(analysis_dir / "metrics.csv")}
    summary = read_json(RunFiles(analysis_dir).summary) if (RunFiles(analysis_dir).summary).exists() else {}
    tables = {p.name: read_table(p) for p in sorted(RunFiles(analysis_dir).tables.glob("*.jsonl"))}
    return rows, summary, tables, read_integrity(RunFiles(analysis_dir))


def assert_same(one, sharded):
    (rows, summary, tables, integrity), (rows2, summary2, tables2, integrity2) = one, sharded
    assert len(integrity) == len(rows) and repr(integrity2) == repr(integrity)  # the integrity record merges too
    assert sorted(rows2) == sorted(rows)
    for step, row in rows.items():
        assert rows2[step].keys() == row.keys()
        for key, value in row.items():
            assert rows2[step][key] == (value if key == "label" else pytest.approx(value, rel=1e-6, abs=1e-9,
                                                                                   nan_ok=True)), (step, key)
    assert summary2 == summary and tables2.keys() == tables.keys()


def test_shards_are_contiguous_and_start_after_the_checkpoint_before_them():
    ckpts = [Checkpoint(s, 0.0, str(s)) for s in (0, 1, 2, 4, 6, 7)]
    parts = [pending(ckpts, (i, 3)) for i in range(3)]
    assert [[(c.step, c.record) for c in part] for part in parts] == [
        [(0, True), (1, True)], [(1, False), (2, True), (4, True)], [(4, False), (6, True), (7, True)]]
    # a replay that continues: each run of the steps not recorded yet after the checkpoint before it
    assert [(c.step, c.record) for c in pending(ckpts, done={0, 1, 4, 6})] == [
        (1, False), (2, True), (6, False), (7, True)]
    assert [(c.step, c.record) for c in pending(ckpts, (1, 3), done={2})] == [(2, False), (4, True)]


@pytest.mark.parametrize("how", ["devices", "array"])
def test_sharded_replay_equals_the_one_process_replay(how, tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    one = outputs(run / "analysis")
    shutil.rmtree(run / "analysis")
    if how == "devices":
        main(["analyze", str(run), "--devices", "2", "--no_plot"])
    else:  # as Slurm array tasks, then a merge
        for i in range(3):
            main(["analyze", str(run), "--shard", f"{i}/3", "--no_plot"])
        main(["analyze", str(run), "--merge", "--no_plot"])
    assert not (run / "analysis" / "shards").exists()
    assert_same(one, outputs(run / "analysis"))


def test_events_replayed_from_the_onsets_tables_equal_the_measured_ones():
    import torch
    from test_frequency import D, V, head_view, planted, tokens
    from test_outliers import planted_view, windows

    from dynascope.analysis import build
    from dynascope.analysis.measure import measure
    from dynascope.analysis.replay import replay_events

    ods = [{3: 8.0}, {3: 8.0}, {}, {3: 8.0}]  # emerges at 0, revised away at 2, back at 3
    (outliers,) = build("outliers", planted_view().shape)
    records = [measure(planted_view(offsets=o), [outliers], windows(), step=s) for s, o in enumerate(ods)]
    _, a, context = planted(noise=0.0)
    (frequency,) = build("frequency", head_view(*planted(0.0, a=a)[:2]).shape, context)
    for step, level in enumerate([1.0, 0.5, 0.3, 0.3, 1.0, 0.3, 0.3]):
        E = planted(0.0, a=a)[0] + level * torch.randn(V, D, generator=torch.Generator().manual_seed(9))
        records.append(measure(head_view(E, a), [frequency], tokens(), step=10 + step))
    measured = {k: v for r in records for k, v in r.summary.items()}
    assert measured["outliers/emergence_step"] == 3.0 and measured["frequency/converged_step"] == 16.0
    tables = {}
    for r in records:
        for key, table in r.tables.items():
            tables.setdefault(key, []).append({"step": r.step, "columns": table.columns, "rows": table.rows})
    fresh = build("outliers", planted_view().shape) + build("frequency", head_view(*planted(0.0, a=a)[:2]).shape,
                                                             context)
    assert replay_events(fresh, tables) == measured
