"""The reward recipes (#29) run on the CPU: ``conf/sst2-reward.yaml`` (SST-2 answered
by generation, label_word) and ``conf/arith-reward.yaml`` (sums, numeric) with data
from ``benchmarks/make_arith.py``, a few steps each on the tiny random model (adapted
on every layer: it has 4), the recipes' other settings as written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.make_arith import make
from mezo_core.cli import main
from mezo_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["lora.layers=null", "mezo.steps=2", "mezo.batch_size=4", "eval_every=0", "checkpoint_every=1", "progress=false",
         "plot=false", "eval_batch_size=8"]


def test_make_arith_writes_disjoint_sums(tmp_path):
    paths = make(tmp_path / "a", max_operand=12, n_train=40, n_dev=20, n_val=10, seed=3)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"train": 40, "dev": 20, "val": 10}
    pairs = {}
    for split, part in rows.items():
        for r in part:
            q = r["prompt"].split("What is ")[1].split("?")[0]
            a, b = (int(x) for x in q.split(" + "))
            assert 0 <= a <= 12 and 0 <= b <= 12 and r["reference"] == str(a + b)
            assert r["prompt"].endswith(f"A: {a} + {b} =")
            pairs.setdefault(frozenset((a, b)), set()).add(split)
    assert all(len(splits) == 1 for splits in pairs.values())      # no sum in two files, in either order
    again = make(tmp_path / "b", max_operand=12, n_train=40, n_dev=20, n_val=10, seed=3)
    assert all(again[k].read_text() == paths[k].read_text() for k in paths)
    with pytest.raises(SystemExit, match="raise --max"):
        make(tmp_path / "c", max_operand=3, n_train=40, n_dev=0, n_val=0)


def test_sst2_reward_recipe_runs(tmp_path, tiny_llama, fresh_registry):
    recipe = ROOT / "conf" / "sst2-reward.yaml"
    cfg = load_config(recipe, [f"model.path={tiny_llama}"])
    assert (cfg.task.kind, cfg.task.reward, cfg.task.samples) == ("reward", "label_word", 1)
    train = Path(cfg.task.train)
    if not train.exists():   # the bundled SST-2 lives in ../shared/assets; a stand-in elsewhere
        train = tmp_path / "sst2.tsv"
        train.write_text("sentence\tlabel\n" + "".join(f"a film {i}\t{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "-c", str(recipe), f"model.path={tiny_llama}", f"task.train={train}",
                 f"task.dev={train}", "task.n_dev=6", f"out_dir={out}", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for label in ("zero_shot", "final"):
        assert {"dev_reward", "dev_exact_match", "dev_loss"} <= summary[label].keys()
        assert summary[label]["dev_loss"] == -summary[label]["dev_reward"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(-1 <= r["loss"] <= 0 for r in rows)


def test_arith_reward_recipe_runs(tmp_path, tiny_llama, fresh_registry):
    recipe = ROOT / "conf" / "arith-reward.yaml"
    paths = make(tmp_path / "arith", n_train=30, n_dev=8, n_val=4)
    out = tmp_path / "run"
    assert main(["train", "-c", str(recipe), f"model.path={tiny_llama}", *(f"task.{k}={v}" for k, v in paths.items()),
                 f"out_dir={out}", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["dev_examples"] == 8 and 0 <= summary["final"]["dev_reward"] <= 1
    assert main(["train", "-c", str(recipe), f"model.path={tiny_llama}", *(f"task.{k}={v}" for k, v in paths.items()),
                 f"out_dir={out}", *SMALL, "mezo.steps=3", "--resume"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
