"""Onsets as measurements: brackets around planted steps, guards, the bootstrap interval's calibration, and the
outliers guard against a near-constant last-layer state."""

import pytest
import torch
from helpers import FakeView
from test_outliers import Planted, planted_view, windows

from dynascope.analysis import build
from dynascope.analysis.measure import measure
from dynascope.analysis.onsets import Event, judge, resample_counts, summarize

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 100, 200]


def judged(event: Event, values: list[dict], replicates: list[dict] | None = None) -> dict:
    """The summary of `event` over checkpoints STEPS with these values (and replicate values)."""
    history, previous, previous_replicates = [], None, None
    for k, (step, v) in enumerate(zip(STEPS, values, strict=False)):
        reps = replicates[k] if replicates else {}
        j = judge([event], step, v, reps, previous, previous_replicates)
        history += list(j.values())
        previous, previous_replicates = v, reps
    return summarize(event, history)


def test_a_planted_step_is_bracketed_by_the_checkpoints_around_it():
    event = Event("x/up", lambda v, p: v["x"] > 0.5)
    s = judged(event, [{"x": float(step >= 24)} for step in STEPS])  # the true onset, 24, lies between 16 and 32
    assert (s["x/up_step"], s["x/up_bracket_lo"], s["x/up_bracket_hi"]) == (32, 16, 32)
    assert (s["x/up_interval_lo"], s["x/up_interval_hi"], s["x/up_confidence"]) == (32, 32, 1.0)  # not resampled
    assert s["x/up_revisions"] == 0 and s["x/up_guarded"] == 0


def test_a_sustained_event_is_revised_and_a_first_crossing_is_not():
    values = [{"x": x} for x in [0, 0, 1, 1, 0, 1, 1, 1, 1, 1]]
    sustained = judged(Event("x/up", lambda v, p: v["x"] > 0.5), values)
    assert (sustained["x/up_step"], sustained["x/up_bracket_lo"], sustained["x/up_revisions"]) == (16, 8, 2)
    first = judged(Event("x/up", lambda v, p: v["x"] > 0.5, sustained=False), values)
    assert (first["x/up_step"], first["x/up_bracket_lo"], first["x/up_revisions"]) == (2, 1, 0)


def test_an_event_cannot_fire_where_its_guard_fails_and_a_missing_value_is_not_judged():
    event = Event("x/up", lambda v, p: v["x"] > 0.5, guard=lambda v: v["ok"])
    values = [{"x": 1.0, "ok": step >= 8} for step in STEPS]
    s = judged(event, values)
    assert (s["x/up_step"], s["x/up_bracket_lo"], s["x/up_guarded"]) == (8, 4, 4)  # 0, 1, 2 and 4 guarded out
    gaps = [{"x": 1.0, "ok": True} if step in (0, 16, 64, 200) else {} for step in STEPS]  # judged at four only
    assert judged(event, gaps)["x/up_bracket_lo"] is None  # held at every checkpoint that judged it


def test_the_interval_comes_from_the_replicates_and_the_confidence_from_how_many_had_the_event():
    event = Event("x/up", lambda v, p: v["x"] > 0.5)
    onsets = [4, 8, 8, 16] * 50 + [None] * 50  # 250 replicates: 50 never see the event
    replicates = [{"x": [float(o is not None and step >= o) for o in onsets]} for step in STEPS]
    s = judged(event, [{"x": float(step >= 8)} for step in STEPS], replicates)
    assert s["x/up_step"] == 8 and s["x/up_confidence"] == 0.8
    assert (s["x/up_interval_lo"], s["x/up_interval_hi"]) == (4, 16)


def dataset(seed: int, windows: int = 64, checkpoints: int = 30, sigma: float = 2.0) -> tuple[list, list]:
    """A value measured on probe windows at each checkpoint: a ramp that crosses 0 between checkpoints 14 and
    15, plus window noise (half shared by a window across checkpoints, as a fixed probe set's is); the point
    value and its bootstrap replicates at each checkpoint."""
    g = torch.Generator().manual_seed(seed)
    mean = (torch.arange(checkpoints, dtype=torch.float64) - 14.5) / 10
    shared = torch.randn(windows, generator=g, dtype=torch.float64)
    x = mean[:, None] + sigma * 0.5 ** 0.5 * (shared + torch.randn(checkpoints, windows, generator=g,
                                                                   dtype=torch.float64))
    counts = resample_counts(windows)
    return ([{"x": row.mean().item()} for row in x], [{"x": (counts @ row / counts.sum(1)).tolist()} for row in x])


def test_the_95_percent_interval_covers_the_true_onset_in_90_to_99_percent_of_replicated_experiments():
    event = Event("x/up", lambda v, p: v["x"] > 0)
    covered, exact = 0, 0
    for seed in range(200):
        values, replicates = dataset(seed)
        history, previous, previous_replicates = [], None, None
        for k, (v, r) in enumerate(zip(values, replicates, strict=True)):
            history += list(judge([event], k, v, r, previous, previous_replicates).values())
            previous, previous_replicates = v, r
        s = summarize(event, history)
        covered += s["x/up_interval_lo"] is not None and s["x/up_interval_lo"] <= 15 <= s["x/up_interval_hi"]
        exact += s["x/up_step"] == 15
    assert 0.90 <= covered / 200 <= 0.99
    assert exact / 200 < 0.5  # the point estimate alone misses more often than not: the interval is needed


class Constant(Planted):
    """The same last-layer vector at every position: the paper's rule finds ODs in it by construction."""

    def forward(self, tokens):
        g = torch.Generator().manual_seed(self.seed)
        h = torch.randn(self.d, generator=g).expand(*tokens.shape, self.d).clone()
        return self.normalized(h) @ self.E.T


def test_a_constant_last_layer_state_gives_no_outlier_and_no_onset():
    model = Constant(256, {})
    v = FakeView(model, {"ln_final.hook_normalized": model.normalized}, model.E, d_mlp=512, context_length=40)
    (a,) = build("outliers", v.shape)
    record = measure(v, [a], windows(), step=0)
    assert record.values["outliers/h_varying_share"] == pytest.approx(0.0, abs=1e-6)
    assert record.values["outliers/score_max"] > 1  # the paper's rule alone would report an OD here
    assert record.values["outliers/count"] == 0 and "outliers/ablate_kl" not in record.values
    assert record.summary["outliers/emergence_step"] is None and record.summary["outliers/emergence_guarded"] == 1


def test_a_planted_outlier_in_a_varying_state_is_found_with_its_onset_and_interval():
    (a,) = build("outliers", planted_view().shape)
    for step, offsets in zip(STEPS[:5], [{}, {}, {7: 1.0}, {7: 8.0}, {7: 8.0}], strict=True):
        record = measure(planted_view(offsets=offsets), [a], windows(), step=step)
    s = record.summary
    assert record.values["outliers/count"] == 1 and record.values["outliers/h_varying_share"] > 0.5
    assert (s["outliers/emergence_step"], s["outliers/emergence_bracket_lo"]) == (4, 2)
    assert s["outliers/emergence_confidence"] == 1.0 and s["outliers/emergence_interval_lo"] == 4
