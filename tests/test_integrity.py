"""The integrity record of a checkpoint suite: fingerprints, distances and the flags of checkpoints that are not
what their step claims (planted on synthetic trajectories here; on a planted hub suite in test_suites.py)."""

import itertools

import numpy as np
import pytest
import torch

from dynascope.analysis.integrity import flagged, integrity_rows, weights_print

STEPS = [0, 1, 2, 4, 8, 16, 32, 64]


def trajectory(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Weights moving away from their initialisation along a fixed direction plus a drift, as training does:
    ‖θ_s − θ_0‖ grows with s and ‖θ_s − θ_last‖ shrinks."""
    g = torch.Generator().manual_seed(seed)
    init = {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(300, generator=g)}
    direction = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
    return {s: {k: v + np.sqrt(s / 64) * direction[k] + 0.001 * torch.randn(v.shape, generator=g)
                for k, v in init.items()} for s in STEPS}


def prints(weights: dict[int, dict[str, torch.Tensor]]) -> list:
    return [weights_print(f"step{s}", s, w) for s, w in weights.items()]


def test_a_clean_trajectory_flags_nothing():
    rows = integrity_rows(prints(trajectory()))
    assert [r["step"] for r in rows] == STEPS and flagged(rows) == {}
    assert rows[0]["dist_first"] == 0 and rows[-1]["dist_last"] == 0
    assert all(a["dist_first"] < b["dist_first"] for a, b in itertools.pairwise(rows))  # moving away from init
    weights = trajectory()
    exact = (torch.cat([(weights[4][k] - weights[2][k]).flatten() for k in sorted(weights[4])]).norm()
             / torch.cat([weights[2][k].flatten() for k in sorted(weights[2])]).norm()).item()
    assert rows[3]["dist_prev"] == pytest.approx(exact, rel=0.05)  # the sketch estimates the distance


def test_a_copy_of_the_final_checkpoint_and_two_swapped_ones_are_flagged_and_nothing_else():
    weights = trajectory()
    weights[1] = weights[64]  # a branch serving the end of training
    weights[4], weights[16] = weights[16], weights[4]  # two branches swapped, step 8 between them
    flags = flagged(integrity_rows(prints(weights)))
    assert sorted(flags) == [1, 4, 16]
    assert flags[1].startswith("equals_final: the same weights as the last checkpoint (step64)")
    assert flags[4].startswith("out_of_order") and flags[16].startswith("out_of_order")


def test_duplicates_and_a_step_zero_from_another_initialisation():
    weights = trajectory()
    weights[16] = weights[8]  # the same weights served under two steps
    assert flagged(integrity_rows(prints(weights))) == {8: "duplicate: the same weights as step16",
                                                         16: "duplicate: the same weights as step8"}
    weights = trajectory()
    weights[0] = trajectory(seed=1)[0]  # step 0 of another seed
    flags = flagged(integrity_rows(prints(weights)))
    assert list(flags) == [0] and flags[0].startswith("not_from_init")


def test_the_fingerprint_is_of_the_tensors_not_of_their_order_or_container():
    weights = trajectory()[2]
    reordered = dict(reversed(list(weights.items())))
    assert weights_print("a", 2, weights).fingerprint == weights_print("b", 2, reordered).fingerprint
    changed = {k: v.clone() for k, v in weights.items()}
    changed["b.bias"][7] += 1e-6
    assert weights_print("a", 2, weights).fingerprint != weights_print("a", 2, changed).fingerprint
    as_half = {k: v.half() for k, v in weights.items()}  # another dtype is other weights
    assert weights_print("a", 2, weights).fingerprint != weights_print("a", 2, as_half).fingerprint


def test_checkpoints_of_different_models_are_not_compared():
    small, large = trajectory()[0], {k: torch.randn(2 * v.numel()) for k, v in trajectory()[0].items()}
    rows = integrity_rows([weights_print("a", 0, small), weights_print("b", 1, large), weights_print("c", 2, small)])
    assert np.isnan(rows[1]["dist_first"]) and np.isnan(rows[1]["dist_last"]) and rows[2]["dist_first"] == 0
    assert flagged(rows) == {0: "equals_final: the same weights as the last checkpoint (c)"}
