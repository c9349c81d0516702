"""One harness for every registered analysis: compute() is pure, two processes give one process's
values, online equals offline, and the carry survives a resume checkpoint (on the analysis's device)."""

import io

import pytest
import torch

from dynascope.analysis import REGISTRY, build
from dynascope.analysis.base import Analysis, AnalysisContext, Measurement, Table
from dynascope.analysis.measure import measure, probe_pass
from dynascope.analysis.view import TransformerView
from dynascope.core.model import ModelConfig, Transformer
from dynascope.core.probe import shard
from dynascope.core.records import read_csv, read_metrics
from dynascope.core.runfiles import RunFiles

NAMES = sorted(REGISTRY)
VOCAB = 64


def view(seed: int) -> TransformerView:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=VOCAB, context_length=40)
    return TransformerView(Transformer(cfg).eval())


def context() -> AnalysisContext:
    counts = (4000 / torch.arange(1, VOCAB + 1)).long()  # Zipf; the rarest tokens fall below frequency's min_count
    return AnalysisContext(counts=counts)


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 40), generator=torch.Generator().manual_seed(3))


def analysis(name: str, device: str = "cpu") -> Analysis:
    (a,) = build(name, view(0).shape, context(), device=device)
    return a


def same(x, y) -> bool:
    """Equal results, carried values and tables, with NaN equal to NaN."""
    if isinstance(x, Measurement):
        return all(same(getattr(x, f), getattr(y, f)) for f in ("values", "tables", "summary", "carry"))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, Table):
        return same(x.columns, y.columns) and same(x.rows, y.rows)
    return x == y or (x != x and y != y)


@pytest.mark.parametrize("name", NAMES)
def test_compute_is_pure(name):
    a = analysis(name)
    measure(view(0), [a], probe(), step=0)  # something to carry
    carried = {k: getattr(a, k) for k in a.carried}
    assert set(a.carry) < set(a.carried)  # the onsets' state too
    v = view(1)
    a.bind(v, 1)
    logits, cache = probe_pass(v, probe(), a.hook_names())
    a.update(probe(), logits, cache, torch.arange(len(probe())))
    first, second = a.compute(), a.compute()
    assert first.values and same(first, second)
    assert same(carried, {k: getattr(a, k) for k in a.carried})  # only advance() changes what is carried


def _every_analysis(rank: int) -> list[dict]:
    analyses = [analysis(name) for name in NAMES]
    windows, first = shard(probe(), rank, 2, unit=2)
    return [measure(view(step), analyses, windows, step, batch_size=2, first_window=first).values for step in (0, 1)]


@pytest.fixture(scope="module")
def on_two_ranks(two_ranks) -> dict:
    return two_ranks(_every_analysis)


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_give_the_one_process_values(name, on_two_ranks):
    a = analysis(name)
    single = [measure(view(step), [a], probe(), step, batch_size=2).values for step in (0, 1)]
    for rank in (0, 1):
        for step in (0, 1):
            mine = {k: v for k, v in on_two_ranks[rank][step].items() if k.startswith(name + "/")}
            assert mine and mine == pytest.approx(single[step], rel=1e-5, abs=1e-7, nan_ok=True), (rank, step)


@pytest.mark.parametrize("name", NAMES)
def test_online_equals_offline(name, tiny_run):
    online = {r["trainer/global_step"]: r for r in read_metrics(tiny_run) if "dynamics/seconds" in r}
    offline = {int(r["step"]): r for r in read_csv(RunFiles(tiny_run).analysis.metrics_csv)}
    assert sorted(online) == sorted(offline)
    compared = 0
    for step, row in online.items():
        keys = [k for k in row if k.startswith(name + "/") and not k.startswith(REGISTRY[name].training_keys)]
        measured_offline = {k for k, v in offline[step].items()  # not NaN, and not against the final checkpoint
                            if k.startswith(name + "/") and v == v and not k.startswith(REGISTRY[name].final_keys)}
        assert measured_offline <= set(keys) <= set(offline[step])
        for key in keys:
            assert offline[step][key] == pytest.approx(row[key], rel=1e-5, nan_ok=True), (step, key)
        compared += len(keys)
    assert compared > len(online)


def roundtrip(state: dict) -> dict:
    """Through torch.save and a weights-only load, as Lightning restores a resume checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_carry_survives_a_resume_checkpoint(name):
    kept = analysis(name)
    measure(view(0), [kept], probe(), step=0)
    resumed = analysis(name)
    resumed.load_checkpoint_state(roundtrip(kept.checkpoint_state()))
    after_kept = measure(view(1), [kept], probe(), step=1)
    after_resumed = measure(view(1), [resumed], probe(), step=1)
    assert same(after_kept.values, after_resumed.values) and same(after_kept.tables, after_resumed.tables)
    assert same(after_kept.summary, after_resumed.summary)


@pytest.mark.parametrize("name", NAMES)
def test_loaded_carry_is_on_the_analysis_device(name):
    a = analysis(name)
    measure(view(0), [a], probe(), step=0)
    elsewhere = analysis(name, device="meta")
    elsewhere.load_checkpoint_state(roundtrip(a.checkpoint_state()))
    tensors = [v for k in a.carry for v in [getattr(elsewhere, k)] if isinstance(v, torch.Tensor)]
    assert all(t.device.type == "meta" for t in tensors)
