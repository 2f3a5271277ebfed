"""The accuracy benchmark's bookkeeping (benchmarks/accuracy.py) on hand-built run
records: which runs a suite makes, what a killed run counts as, and the robustness
verdict -- each checked against figures worked out by hand here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import accuracy  # noqa: E402


def test_grid_runs_expand_lr_by_k_once_per_variant():
    grid = dict(lr=[1e-3, 1e-2], k_per_class=[16, 256], steps=30, base=["lora.r=4"],
                variants={"-a": ["x=1"], "-b": {"overrides": ["x=2"], "lr": [3e-2]}})
    runs = dict(accuracy.grid_runs(grid))
    assert sorted(runs) == sorted(["grid-lr0.001-k16-a", "grid-lr0.01-k16-a", "grid-lr0.001-k256-a",
                                   "grid-lr0.01-k256-a", "grid-lr0.03-k16-b", "grid-lr0.03-k256-b"])
    assert runs["grid-lr0.03-k256-b"] == ["lora.r=4", "x=2", "mezo.lr=0.03", "task.k_per_class=256",
                                          "mezo.steps=30"]
    assert accuracy.grid_variant("grid-lr0.03-k256-b", 0.03, 256) == "b"
    assert accuracy.grid_runs({}) == []


def test_every_suite_builds_its_runs():
    for name, suite in accuracy.SUITES.items():
        runs = suite["recipes"] + accuracy.grid_runs(suite.get("grid", {}))
        assert runs, name
        assert len({n for n, _ in runs}) == len(runs), f"{name}: two runs share a name"


def _record(name, points, summary=None, overrides=("mezo.lr=0.01", "task.k_per_class=16", "mezo.steps=3000")):
    curve = [{"step": s, "loss": 0.5, "dev_accuracy": d, "val_accuracy": v} for s, d, v in points]
    return {"name": name, "overrides": list(overrides), "curve": curve, "summary": summary}


def test_a_killed_run_counts_its_best_validation_evaluation():
    killed = _record("r", [(500, 0.80, 0.70), (1000, 0.75, 0.90), (1500, 0.85, 0.80)])
    assert accuracy._final_dev(killed) == (0.75, 1000, True)
    worse = _record("r", [(500, 0.49, 0.51)])                       # the guard stopped it (exit 3)
    worse["zero_shot"] = {"dev_accuracy": 0.789, "val_accuracy": 0.772}
    assert accuracy._final_dev(worse) == (0.789, 0, True)          # it ends on best/: zero-shot
    tie = _record("r", [(500, 0.70, 0.772)])
    tie["zero_shot"] = worse["zero_shot"]
    assert accuracy._final_dev(tie) == (0.789, 0, True)            # a tie keeps the first adapter
    done = _record("r", [(500, 0.80, 0.70)], summary={"final": {"dev_accuracy": 0.81}, "step": 3000})
    assert accuracy._final_dev(done) == (0.81, 3000, False)


def test_robustness_verdict_by_hand():
    zero = 0.789
    rows = [  # variant "": drops 0.010 and 0.025; finals vs zero-shot +0.011, -0.004
        {"variant": "", "best_dev_accuracy": 0.810, "final_dev_accuracy": 0.800},
        {"variant": "", "best_dev_accuracy": 0.810, "final_dev_accuracy": 0.785},
        {"variant": "x", "best_dev_accuracy": 0.800, "final_dev_accuracy": 0.790},
        {"variant": "x", "best_dev_accuracy": 0.900, "final_dev_accuracy": None},  # no figure: left out
    ]
    v = accuracy.robustness_verdict(rows, zero)
    assert v["grid"]["runs"] == 2 and v["x"]["runs"] == 1
    assert v["grid"]["worst_drop_from_own_best"] == pytest.approx(0.025)
    assert v["grid"]["worst_final_minus_zero_shot"] == pytest.approx(-0.004)
    assert v["grid"]["within_2_points_of_own_best"] is False
    assert v["grid"]["none_below_zero_shot"] is False
    assert v["grid"]["mean_final_dev_accuracy"] == pytest.approx(0.7925)
    assert v["x"]["within_2_points_of_own_best"] is True and v["x"]["none_below_zero_shot"] is True
    assert accuracy.robustness_verdict(rows, None)["x"]["worst_final_minus_zero_shot"] is None


def test_summarize_reports_the_issue_fields():
    zs = {"dev_accuracy": 0.789, "val_accuracy": 0.77}
    result = {"runs": [
        _record("grid-lr0.01-k16", [(500, 0.80, 0.78)],
                summary={"final": {"dev_accuracy": 0.795}, "step": 3000, "zero_shot": zs, "guard": {"roll_backs": 1}}),
        _record("recipe-a", [(500, 0.82, 0.85)], summary={"final": {"dev_accuracy": 0.83}, "step": 3000,
                                                          "zero_shot": zs}),
        _record("recipe-b", [(500, 0.86, 0.80)], summary={"final": {"dev_accuracy": 0.86}, "step": 3000,
                                                          "zero_shot": zs}),
    ], "backprop": [{"name": "bp", "result": {"final_dev_accuracy": 0.89, "best_dev_accuracy": 0.9,
                                              "steps": 300, "lr": 5e-4}}]}
    s = accuracy.summarize(result)
    assert s["zero_shot_dev_accuracy"] == 0.789
    # chosen on validation (0.85 beats 0.80), reported on dev: not the higher dev figure
    assert s["best_mezo_recipe"] == "recipe-a" and s["best_mezo_dev_accuracy"] == 0.83
    # the final evaluation (in the summary, not the curve) counts: recipe-b's is best on validation
    result["runs"][2]["summary"]["best"] = {"val_accuracy": 0.88}
    assert accuracy.summarize(result)["best_mezo_recipe"] == "recipe-b"
    assert s["backprop_dev_accuracy"] == 0.89
    row, = s["robustness"]
    assert row == {"lr": 0.01, "k_per_class": 16, "steps": 3000, "variant": "", "best_dev_accuracy": 0.80,
                   "final_dev_accuracy": 0.795, "stopped_by_time_limit": False, "stopped_by_guard": False,
                   "guard_roll_backs": 1}
    assert s["robustness_goal"]["grid"]["none_below_zero_shot"] is True


def test_zero_shot_comes_from_a_killed_runs_evals(tmp_path):
    from benchmarks.sweep import collect
    out = tmp_path / "grid-lr0.01-k16"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 50, "loss": 0.4}\n')
    (out / "evals.jsonl").write_text(
        '{"step": 0, "event": "eval", "label": "zero-shot", "split": "dev", "accuracy": 0.789}\n'
        '{"step": 0, "event": "eval", "label": "zero-shot", "split": "val", "accuracy": 0.772}\n'
        '{"step": 500, "event": "eval", "label": "periodic", "split": "dev", "accuracy": 0.81}\n')
    record = collect({"name": out.name, "overrides": ["mezo.lr=0.01", "task.k_per_class=16", "mezo.steps=3000"]},
                     -9, 530.0, out, ["mezo-run"])
    assert record["summary"] is None
    assert record["zero_shot"] == {"dev_accuracy": 0.789, "val_accuracy": 0.772}
    assert accuracy.summarize({"runs": [record], "backprop": []})["zero_shot_dev_accuracy"] == 0.789


def test_the_recipe_suite_names_the_recipe_file():
    suite = accuracy.SUITES["gpu-recipe"]
    assert [o[:2] for _, o in suite["recipes"]] == [["-c", "conf/sst2-gpu.yaml"]] * 3
