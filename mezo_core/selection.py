"""Which evaluated adapter ``best/`` keeps.

Every evaluation of a run (zero-shot included) is a candidate. With accuracies, a
candidate replaces the kept adapter only when it is right on significantly more of
the selection examples where the two disagree (a one-sided paired sign test): a
gain of a few examples is noise, and keeping it would let a run end below its
zero-shot adapter on unseen data. The test needs enough examples to ever pass:
on a small validation set it would keep the first adapter whatever training
does, so ``plan`` checks that first and falls back to the
plain best score, saying so. ``best/`` never replaces the trained weights: the
run always saves its last adapter too (``mezo_core.trainer``).
"""
from __future__ import annotations

import math

#: the gate is usable when its floor -- the smallest accuracy gain that can pass at all,
#: every disagreement won -- is at most this; above it the gate can practically never
#: pass (MeZO's measured gains are 6-7 points on SST-2)
MAX_GATE_FLOOR = 0.10


def sign_test_p(candidate: str, kept: str) -> float:
    """One-sided exact sign test: the probability that a candidate no better than
    the kept adapter is right on at least as many of the disagreeing examples as
    it is (``candidate``/``kept``: per-example "1"/"0" outcomes, same examples)."""
    wins = sum(c == "1" and k == "0" for c, k in zip(candidate, kept))
    losses = sum(c == "0" and k == "1" for c, k in zip(candidate, kept))
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n


def best_tests(cfg) -> int:
    """How many evaluations of a run can replace best/'s adapter: one per ``eval_every``
    steps after step 0, the final one included (ceil(mezo.steps / eval_every); the
    first candidate, zero-shot or not, is kept without a test). A function of the
    config alone, so that a seed gives one trajectory: early stopping does not change
    it, nor does a --resume."""
    if not cfg.eval_every:
        return 1
    return max(1, -(-cfg.mezo.steps // cfg.eval_every))


def best_level(cfg, first_move: bool = True) -> float:
    """The level of a best/ sign test: of the first move off the run's first adapter
    (``first_move``), or of a later one.

    A test at ``selection.significance`` repeated at every evaluation lets noise through
    far more often (12 evaluations at 0.05: up to 46 %). ``bonferroni`` splits
    ``selection.significance`` over the ``best_tests`` evaluations for the first move: until
    best/ first moves, every test compares a candidate with the first adapter, so by
    the union bound noise alone moves it with probability <= selection.significance. Later
    candidates face an adapter already shown better than the start, at
    ``selection.significance``. ``none``: every evaluation at ``selection.significance``."""
    if cfg.selection.correction == "none" or not first_move:
        return cfg.selection.significance
    return cfg.selection.significance / best_tests(cfg)


def min_wins(level: float) -> int:
    """The fewest disagreements a candidate must win, losing none, to pass a sign test
    at ``level``: the smallest m with 2^-m < level (0 when there is no test)."""
    return 0 if level <= 0 else math.floor(math.log2(1 / level)) + 1


def plan(cfg, rows: int, split: str) -> dict:
    """The selection rule a run uses, decided before training from the config and
    the number of selection examples (``rows`` of ``split``): the sign test when it
    can pass, else the plain best score. Recorded in ``summary.json``."""
    level = best_level(cfg)
    wins = min_wins(level)
    out = {"split": split, "examples": rows, "rule": "sign_test" if level > 0 else "best_score",
           "significance": cfg.selection.significance, "first_move_level": level}
    if level > 0:
        floor = wins / rows if rows else math.inf
        out.update(min_wins=wins, min_gain=round(floor, 4))
        if floor > MAX_GATE_FLOOR:
            out["rule"] = "best_score"
            out["note"] = (f"{rows} {split} examples cannot pass the sign test at {level:.3g}: a candidate "
                           f"would need {wins} more right answers than the kept adapter and none fewer "
                           f"(+{100 * floor:.0f} points); best/ takes the plain best {split} score instead "
                           f"(more examples: task.n_val or task.val)")
    return out


class Selection:
    """best/'s rule over one run: ``consider`` each evaluation in turn."""

    def __init__(self, cfg, rows: int, split: str):
        self.cfg, self.split = cfg, split
        self.plan = plan(cfg, rows, split)

    def level(self, first_move: bool) -> float:
        return best_level(self.cfg, first_move) if self.plan["rule"] == "sign_test" else 0.0

    def consider(self, state: dict, evaluation: dict, outcomes: str | None = None) -> tuple[bool, bool]:
        """Whether ``evaluation`` (of the adapter at ``state["step"]``) becomes best/
        (then ``state["best"]`` describes it), and whether early stopping should stop
        the run. Higher accuracy wins, ties broken by the lower loss, and with the
        sign test only a significant gain (``outcomes``: per-example "1"/"0")."""
        split = self.split
        key = f"{split}_accuracy" if f"{split}_accuracy" in evaluation else f"{split}_loss"
        score = [evaluation[key], -evaluation[f"{split}_loss"]] if key.endswith("accuracy") else [-evaluation[key]]
        best = state.get("best")
        better = best is None or score > best["score"]
        level = None if best is None else best.get("significance_per_eval", self.level(True))
        if better and level and outcomes and best.get("outcomes"):
            better = sign_test_p(outcomes, best["outcomes"]) < level
        if better:
            # the level a later candidate must reach against this adapter: corrected while
            # best/ holds the run's first adapter, selection.significance once it has moved
            state["best"] = {"step": state["step"], "score": score, "selected_on": key, **evaluation,
                             "evals_since": 0, "significance_per_eval": self.level(best is None),
                             "outcomes": outcomes}
            return True, False
        best["evals_since"] += 1
        patience = self.cfg.selection.early_stop_patience
        return False, bool(patience) and best["evals_since"] >= patience
