"""best/ selection: an adapter replaces the kept one only for a significant gain on
the validation examples (paired one-sided sign test), so a run does not end on
an adapter that won by noise."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from mezo_core.trainer import Trainer, sign_test_p

SEED = 20261202


def test_sign_test_p_by_hand():
    assert sign_test_p("11111", "00000") == pytest.approx(1 / 32)          # 5 wins of 5
    assert sign_test_p("1110", "0001") == pytest.approx(5 / 16)            # P(X >= 3), X ~ Bin(4, 1/2)
    assert sign_test_p("1111", "1111") == 1.0                              # no disagreement: no evidence
    assert sign_test_p("0000", "1111") == 1.0                              # all losses
    # only disagreements count: agreeing examples (right or wrong) change nothing
    assert sign_test_p("11111" + "10" * 50, "00000" + "10" * 50) == pytest.approx(1 / 32)


def test_sign_test_p_against_a_simulation():
    """The p-value is the chance of doing at least this well by coin flips."""
    rng = random.Random(SEED)
    print("seed", SEED)
    wins, losses = 9, 3
    hits = sum(sum(rng.random() < 0.5 for _ in range(wins + losses)) >= wins for _ in range(20000))
    assert abs(sign_test_p("1" * wins + "0" * losses, "0" * wins + "1" * losses) - hits / 20000) < 0.01


def _trainer(significance, tmp_path):
    cfg = SimpleNamespace(best_significance=significance, early_stop_patience=0)
    return SimpleNamespace(cfg=cfg, task=SimpleNamespace(val=[object()]), writes=False, out=tmp_path)


def _evaluation(outcomes):
    return {"val_accuracy": outcomes.count("1") / len(outcomes), "val_loss": 1.0, "dev_accuracy": 0.5}


@pytest.mark.parametrize("significance, kept_step", [(0.05, 0), (0.0, 10)])
def test_a_gain_of_a_few_examples_does_not_replace_the_kept_adapter(tmp_path, significance, kept_step):
    me = _trainer(significance, tmp_path)
    state = {"step": 0}
    zero = "1100000000" * 10
    Trainer._consider_best(me, state, _evaluation(zero), zero)
    state["step"] = 10
    plus_two = "1111000000" + "1100000000" * 9          # 2 more right, none lost: p = 1/4
    Trainer._consider_best(me, state, _evaluation(plus_two), plus_two)
    assert state["best"]["step"] == kept_step
    state["step"] = 20
    plus_six = "1111111100" + "1100000000" * 9           # 6 more right: p = 1/64
    Trainer._consider_best(me, state, _evaluation(plus_six), plus_six)
    assert state["best"]["step"] == 20 and state["best"]["outcomes"] == plus_six
    state["step"] = 30                                   # 6 won and 5 lost against it: p = 0.5
    mixed = "0000011100" + "1111111100" + "1100000000" * 8
    assert mixed.count("1") > plus_six.count("1")
    Trainer._consider_best(me, state, _evaluation(mixed), mixed)
    assert state["best"]["step"] == (20 if significance else 30)
