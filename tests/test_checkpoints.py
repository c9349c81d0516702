import pytest
import torch

import dynascope.core.snapshots as ck
from dynascope.core.errors import DynascopeError
from dynascope.core.runfiles import RunFiles
from dynascope.core.schedule import CheckpointSchedule


def test_schedule_is_log_spaced_then_periodic_plus_final():
    s = CheckpointSchedule(log_cap=512, every=1000)
    assert s.steps(3500) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 3500]
    assert CheckpointSchedule(log_cap=8, every=5).steps(12) == [0, 1, 2, 4, 8, 10, 12]


def test_snapshot_roundtrip_manifest_and_corruption(tmp_path):
    w = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
    for step in (0, 1):
        ck.write_snapshot(tmp_path, step, w, {"tokens_seen": 10 * step})
    rows = ck.read_manifest(tmp_path)
    assert sorted(rows) == [0, 1] and rows[1]["tokens_seen"] == 10
    assert rows[1]["sha256"] == ck.sha256_file(RunFiles(tmp_path).snapshot(1))
    loaded = ck.load_snapshot(tmp_path, 1)
    assert torch.equal(loaded["a"], w["a"])
    path = RunFiles(tmp_path).snapshot(1)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DynascopeError, match="step_00000001.safetensors"):
        ck.load_snapshot(tmp_path, 1)
    with pytest.raises(DynascopeError, match="corrupt"):
        ck.load_snapshot(tmp_path, 1, verify=False)


def test_crash_while_writing_leaves_previous_snapshots_intact(tmp_path, monkeypatch):
    w = {"a": torch.randn(3, 4)}
    ck.write_snapshot(tmp_path, 0, w, {})
    before = RunFiles(tmp_path).manifest.read_text()

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError):
        ck.write_snapshot(tmp_path, 1, w, {})
    assert not RunFiles(tmp_path).snapshot(1).exists()
    assert RunFiles(tmp_path).manifest.read_text() == before
    assert torch.equal(ck.load_snapshot(tmp_path, 0)["a"], w["a"])


def test_tied_embeddings_snapshot_and_load_back(tmp_path):
    from dynascope.analysis.view import TransformerView
    from dynascope.core.model import ModelConfig, Transformer

    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, vocab_size=50, context_length=8, tie_embeddings=True)
    model = Transformer(cfg)
    ck.write_snapshot(tmp_path, 0, model.state_dict(), {})
    view = TransformerView.from_snapshot(cfg, ck.load_snapshot(tmp_path, 0))
    assert view.model.unembed.weight is view.model.wte.weight
    assert torch.equal(view.output_embeddings, model.unembed.weight)
