"""The weight average (mezo.ema_half_life): what a run evaluates, selects and saves.

Oracle: the same run without the average (the raw trajectory, which the average
must not change), its checkpoints read from disk, averaged here in float64 by the
formula in mezo_core/average.py's docstring."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mezo_core.average import WeightAverage
from mezo_core.cli import main
from mezo_core.registry import get_registry
from tiny import InterruptAt, write_run_config

SEED = 4321
ADAPTER = "adapter_model.safetensors"


def _train(folder, tiny_llama, over, *args, plugin=None):
    cfg = write_run_config(folder, tiny_llama, over)
    get_registry.cache_clear()
    reg = get_registry()
    if plugin:
        reg.pm.register(plugin)
    try:
        return main(["train", "-c", str(cfg), *args], reg)
    finally:
        if plugin:
            reg.pm.unregister(plugin)


def _adapter(path):
    return load_file(str(path / ADAPTER))


def test_update_rule_by_hand():
    avg = WeightAverage(half_life=40)                       # every 2 steps, decay 0.5 ** (2 / 40)
    assert avg.every == 2 and avg.due(4) and not avg.due(5)
    avg.reset({"w": torch.tensor([0.0])})
    avg.update({"w": torch.tensor([1.0])})                 # d = min(0.966, 1/10) = 0.1
    assert avg.tensors["w"].item() == pytest.approx(0.9)
    avg.update({"w": torch.tensor([0.0])})                 # d = 2/11
    assert avg.tensors["w"].item() == pytest.approx(0.9 * 2 / 11)
    assert not WeightAverage(0).enabled and not WeightAverage(0).due(20)


def test_run_saves_and_selects_the_average_of_its_raw_trajectory(tmp_path, tiny_llama, capsys, fresh_registry):
    """The averaged run's adapter is the EMA of the raw run's weights at every
    averaging step; best/ holds the average at its step; the raw weights follow the
    same trajectory with or without the average."""
    print("seed", SEED)
    half_life, steps = 40, 10                                # an update every 2 steps
    common = {"mezo.steps": steps, "seed": SEED, "checkpoint_every": 2, "keep_checkpoints": 100,
              "eval_every": 4, "task.n_val": 0, "selection.significance": 0.0, "selection.load_best_at_end": False,
              "guard.enabled": False, "mezo.lr": 0.3}
    assert _train(tmp_path / "raw", tiny_llama, common) == 0
    assert _train(tmp_path / "avg", tiny_llama, {**common, "mezo.ema_half_life": half_life}) == 0
    capsys.readouterr()
    raw, avg = tmp_path / "raw" / "run", tmp_path / "avg" / "run"
    # the raw trajectory: checkpoints 0..8 of the raw run (equal in both runs), its final adapter
    thetas = {s: _adapter(raw / "checkpoints" / f"step-{s:07d}") for s in range(0, steps, 2)}
    thetas[steps] = _adapter(raw / "adapter")
    for s in range(2, steps, 2):
        other = _adapter(avg / "checkpoints" / f"step-{s:07d}")
        assert all(other[k].equal(thetas[s][k]) for k in other), f"raw weights differ at step {s}"
    assert any(not thetas[steps][k].equal(thetas[0][k]) for k in thetas[0])   # training moved them
    # the oracle average, float64
    decay = 0.5 ** (2 / half_life)
    oracle = {0: {k: v.double() for k, v in thetas[0].items()}}
    for n, s in enumerate(range(2, steps + 1, 2)):
        d = min(decay, (1 + n) / (10 + n))
        oracle[s] = {k: d * oracle[s - 2][k] + (1 - d) * thetas[s][k].double() for k in thetas[0]}
    final = _adapter(avg / "adapter")
    for k in final:
        torch.testing.assert_close(final[k].double(), oracle[steps][k], rtol=1e-5, atol=1e-7)
    assert any((final[k].double() - thetas[steps][k].double()).abs().max() > 1e-4 for k in final)
    best = json.loads((avg / "best" / "best.json").read_text())
    kept = _adapter(avg / "best")
    for k in kept:
        torch.testing.assert_close(kept[k].double(), oracle[best["step"]][k], rtol=1e-5, atol=1e-7)
    # the evaluations saw the averaged weights: the final one scores the saved adapter
    s_raw, s_avg = (json.loads((r / "summary.json").read_text()) for r in (raw, avg))
    assert s_avg["zero_shot"] == s_raw["zero_shot"]
    assert s_avg["final"]["dev_loss"] != s_raw["final"]["dev_loss"]


def test_resume_with_the_average_is_bitwise(tmp_path, tiny_llama, capsys, fresh_registry):
    """The average and its update count travel in the checkpoint: an interrupted run
    resumes to the uninterrupted adapter, best/ and summary."""
    print("seed", SEED)
    over = {"mezo.steps": 12, "seed": SEED, "checkpoint_every": 4, "eval_every": 4, "task.n_val": 0,
            "mezo.ema_half_life": 60, "mezo.lr": 0.3}
    assert _train(tmp_path / "a", tiny_llama, over) == 0
    assert _train(tmp_path / "b", tiny_llama, over, plugin=InterruptAt(7)) == 130
    assert _train(tmp_path / "b", tiny_llama, over, "--resume") == 0
    capsys.readouterr()
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for sub in ("adapter", "best"):
        x, y = _adapter(a / sub), _adapter(b / sub)
        assert all(x[k].equal(y[k]) for k in x), sub
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())


def test_roll_back_resets_the_average(tmp_path, tiny_llama, capsys, fresh_registry):
    """Every step non-finite (lr 1e30): each is rolled back to the start, so the average
    stays the starting adapter and nothing non-finite reaches disk."""
    print("seed", SEED)
    over = {"mezo.steps": 6, "seed": SEED, "guard.warmup": 0, "guard.max_recoveries": 100,
            "mezo.ema_half_life": 20, "checkpoint_every": 3, "keep_checkpoints": 100}
    assert _train(tmp_path, tiny_llama, over, "mezo.lr=1e30") == 0
    capsys.readouterr()
    run = tmp_path / "run"
    start, final = _adapter(run / "checkpoints" / "step-0000000"), _adapter(run / "adapter")
    assert all(final[k].equal(start[k]) for k in start)
    assert json.loads((run / "summary.json").read_text())["guard"]["roll_backs"] >= 1
