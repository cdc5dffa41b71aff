"""The threshold rule of `emseg finetune` and `emseg calibrate`: the lowest ARE + VOI with a one-step
margin against the merge cliff, on hand-made held-out scores."""

from __future__ import annotations

import pytest

from emseg.workflows.finetune import SWEEP, ModelScores, choose_model


def _scores(totals: dict[float, float], *, merge_from: float = 1.0, name: str = "step-1",
            default: float = 0.8) -> ModelScores:
    """ARE + VOI ``totals`` per threshold, split into (ARE, VOI split, VOI merge) in some fixed way:
    the rule looks at the sum only."""
    table = {}
    for t, total in totals.items():
        merge = total * 0.8 if t >= merge_from else total * 0.1
        table[f"{t:g}"] = (total * 0.1, total - total * 0.1 - merge, merge)
    return ModelScores(name, 1, default, table, 1.0)


# a held-out curve like a fine-tuned 2-D model's on a FIB-SEM strip: splits fall slowly up to the
# optimum at 0.75, the merge cliff follows at 0.8
CLIFF = {0.3: 2.6, 0.4: 1.5, 0.5: 1.08, 0.55: 0.78, 0.6: 0.73, 0.65: 0.52, 0.7: 0.378, 0.75: 0.364, 0.8: 1.48,
         0.85: 3.67, 0.9: 3.67, 0.95: 3.67}


def test_the_threshold_keeps_one_sweep_step_below_the_merge_cliff() -> None:
    s = _scores(CLIFF, merge_from=0.8)
    assert s.best_threshold == 0.75  # the plain optimum sits right below the cliff
    assert s.chosen_threshold == 0.7
    assert s.margin_total(0.7) == pytest.approx(0.378)  # 0.75 above it scores better: its own score counts
    assert s.margin_total(0.75) == pytest.approx(1.48)  # the cliff one step above
    assert s.chosen_total == pytest.approx(0.378)


def test_the_optimum_is_kept_where_the_step_above_it_scores_well() -> None:
    s = _scores({0.6: 0.6, 0.65: 0.5, 0.7: 0.4, 0.75: 0.45, 0.8: 1.2})
    assert s.best_threshold == s.chosen_threshold == 0.7
    assert s.chosen_total == pytest.approx(0.45)


def test_on_a_flat_curve_the_lower_threshold_wins() -> None:
    s = _scores({0.5: 0.9, 0.6: 0.5, 0.65: 0.41, 0.7: 0.4, 0.75: 0.41, 0.8: 0.45, 0.85: 1.2})
    assert s.best_threshold == 0.7
    assert s.chosen_threshold == 0.65  # margin 0.41 at 0.65 and at 0.7: the lower one


def test_ties_go_to_the_lower_threshold_not_the_default() -> None:
    s = _scores({0.6: 0.5, 0.7: 0.5, 0.8: 0.5, 0.9: 0.5}, default=0.8)
    assert s.best_threshold == 0.8  # the plain optimum's tie-break: the default
    assert s.chosen_threshold == 0.6


def test_the_top_of_the_sweep_keeps_its_own_score() -> None:
    s = _scores({0.85: 1.0, 0.9: 0.8, 0.95: 0.6})
    assert s.margin_total(0.95) == pytest.approx(0.6)
    assert s.chosen_threshold == 0.95


def test_a_sweep_with_one_threshold() -> None:
    s = _scores({0.8: 0.7})
    assert s.chosen_threshold == 0.8 and s.chosen_total == pytest.approx(0.7)


def test_checkpoints_are_compared_with_the_margin() -> None:
    edge = _scores(CLIFF, name="step-400")  # best plain optimum (0.364), on the cliff's edge
    robust = _scores({t: 0.37 + abs(t - 0.6) for t in SWEEP}, name="step-200")  # 0.37 at 0.6: margin 0.42
    assert min((edge, robust), key=lambda v: v.best_total) is edge
    chosen = choose_model([_scores({t: 3.0 for t in SWEEP}, name="bundled"), robust, edge])
    assert chosen is edge  # margin 0.378 at 0.7 beats step-200's 0.42 at 0.6
    steep = _scores({**CLIFF, 0.7: 0.6}, name="step-600")  # the step below the optimum is poor: margin 0.6
    assert steep.best_total < robust.best_total  # the plain optimum would keep step-600
    assert choose_model([robust, steep]) is robust


def test_equal_margins_keep_the_earlier_checkpoint() -> None:
    a, b = _scores(CLIFF, name="step-100"), _scores(CLIFF, name="step-200")
    assert choose_model([a, b]) is a
