"""The output floor: every output is a `Sink` the one `Recorder` drives, online and offline; adding one is
one module; the JSONL log appends in constant time; the Parquet output holds the CSV's table."""

import math

import pyarrow.parquet as pq
import pytest
from helpers import copy_run, tiny_args

from dynascope.cli import main
from dynascope.core.errors import DynascopeError
from dynascope.core.records import CheckpointRecord, Table, read_csv, read_metrics
from dynascope.core.runfiles import RunFiles
from dynascope.outputs import SINKS, Destination, Recorder, Sink, check_outputs
from dynascope.outputs import files as file_sinks


def test_a_new_output_is_one_subclass_and_every_command_drives_it(tiny_run, tmp_path, corpus_file):
    seen = []

    class Memory(Sink):  # a whole output: metrics, summary, tables, rewind and the end
        name = "memory"

        def __init__(self, destination, tag="x"):
            super().__init__(destination)
            self.tag = tag

        def log_metrics(self, metrics, step):
            seen.append(("metrics", self.destination.job_type, step, "basic/probe_loss" in metrics))

        def log_table(self, key, table, step):
            seen.append(("table", key, step))

        def finalize(self, pictures=None, failed=False):
            seen.append(("finalize", sorted(pictures or {}), failed))

    try:
        main(tiny_args(corpus_file, tmp_path / "run", 2, "--dynamics.analyses", "basic,regions",
                       "--outputs", '{"memory": {"tag": "y"}}'))
        assert ("metrics", "train", 2, True) in seen and ("table", "regions/median_curve", 1) in seen
        assert seen[-1] == ("finalize", [], False)  # --report false: no pages
        seen.clear()
        main(["analyze", str(copy_run(tiny_run, tmp_path / "copy")), "--analyses", "basic", "--outputs",
              '{"memory": {}}', "--redo"])
        assert [s for s in seen if s[0] == "metrics"] == [("metrics", "analyze", s, True) for s in (0, 1, 2, 4, 6, 7)]
        assert seen[-1][0] == "finalize" and {"report", "plots/overview"} <= set(seen[-1][1])
        with pytest.raises(DynascopeError, match=r"--outputs.memory: unknown option\(s\) \['colour'\]"):
            check_outputs({"memory": {"colour": 1}})
    finally:
        del SINKS["memory"]
    with pytest.raises(DynascopeError, match="--outputs names unknown outputs \\['nowhere'\\]"):
        check_outputs({"nowhere": {}})


def test_the_recorder_writes_records_as_upserts_in_every_file(tmp_path):
    files = RunFiles(tmp_path)
    recorder = Recorder.open(Destination(files, files), {"jsonl": {}, "csv": {}, "summary": {}, "tables": {}},
                             echo=lambda line: None)
    for step, loss in [(0, 5.0), (1, 4.0), (1, 3.5)]:  # step 1 measured again: its values replaced
        recorder.write(CheckpointRecord(step, 10.0 * step, str(step), {"basic/probe_loss": loss},
                                        {"t/x": Table(["a"], [[step]])}, {"e/first_step": float(step)}))
    recorder.rewind(0)
    recorder.write(CheckpointRecord(1, 10.0, "1", {"basic/probe_loss": 3.0}))
    assert [(r["trainer/global_step"], r["basic/probe_loss"]) for r in read_metrics(tmp_path)
            if "basic/probe_loss" in r] == [(0, 5.0), (1, 3.0)]
    assert [(r["step"], r["basic/probe_loss"]) for r in read_csv(files.metrics_csv)] == [(0, 5.0), (1, 3.0)]
    assert [line.count('"step"') for line in files.table("t/x").read_text().splitlines()] == [1]  # step 0 only
    assert files.summary.read_text().count("e/first_step") == 1


def test_appending_to_the_metrics_log_does_not_read_it(tmp_path, monkeypatch):
    files = RunFiles(tmp_path)
    sink = file_sinks.JsonlMetrics(Destination(files, files))
    reads = []
    original = file_sinks.read_jsonl
    monkeypatch.setattr(file_sinks, "read_jsonl", lambda *a: reads.append(a) or original(*a))
    for step in range(2000):  # a step's analysis row, then the step before's training row, as a fit logs them
        sink.log_metrics({"basic/probe_loss": 1.0 / (step + 1), "tokens_seen": step * 8.0}, step)
        sink.log_metrics({"train/loss": 2.0, "tokens_seen": max(step - 1, 0) * 8.0}, max(step - 1, 0))
    assert len(reads) == 1  # the first row of the session, whose step the file may hold already
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 * 2000 - 1 and sum("tokens_seen" in r for r in rows) == 2000  # each value once


def test_the_parquet_output_holds_the_offline_table(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    main(["analyze", str(run), "--no_plot", "--outputs", '{"parquet": {}}', "--redo"])
    files = RunFiles(run).analysis
    table = pq.read_table(files.metrics_parquet).to_pylist()
    rows = read_csv(files.metrics_csv)
    assert [r["step"] for r in table] == [r["step"] for r in rows] == [0, 1, 2, 4, 6, 7]
    for parquet_row, csv_row in zip(table, rows, strict=True):  # the CSV's empty cells are null (not measured)
        for key, value in csv_row.items():
            got = parquet_row[key]
            assert got == value or (math.isnan(value) and (got is None or math.isnan(got))), key
