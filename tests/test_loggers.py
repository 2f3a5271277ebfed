"""Logging like the ecosystem (#15 item 5): logger plugins picked by report_to,
evaluation rows, per-step backend counters, resume, and every plugin listed."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from mezo_core import hookimpl
from mezo_core.cli import main
from mezo_core.registry import get_registry
from tiny import InterruptAt, write_run_config


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(tmp_path, model, *overrides, steps=5, registry=None):
    cfg = write_run_config(tmp_path, model, {"mezo.steps": steps, "checkpoint_every": 2, "eval_every": 2,
                                             "selection.load_best_at_end": False})
    return cfg, main(["train", "-c", str(cfg), *overrides], registry)


def train_interrupted(tmp_path, model, registry, *overrides):
    """A run stopped (Ctrl-C) after step 3's row; its last checkpoint is step 2."""
    stopper = InterruptAt(3)
    registry.pm.register(stopper)
    try:
        return train(tmp_path, model, *overrides, registry=registry)
    finally:
        registry.pm.unregister(stopper)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    get_registry.cache_clear()
    tmp = tmp_path_factory.mktemp("logged")
    _, code = train(tmp, tiny_llama, "report_to=[jsonl,csv]")
    assert code == 0
    return tmp / "run"


def test_evaluations_are_rows_of_their_own(run):
    summary = json.loads((run / "summary.json").read_text())
    evals = jsonl(run / "evals.jsonl")
    assert [(r["step"], r["label"], r["split"]) for r in evals] == [
        (0, "zero-shot", "dev"), (2, "periodic", "dev"), (4, "periodic", "dev"), (5, "final", "dev")]
    assert all(r["event"] == "eval" for r in evals)
    # the oracle: the summary and the step rows the trainer wrote
    for row, want in ((evals[0], summary["zero_shot"]), (evals[-1], summary["final"])):
        assert (row["accuracy"], row["loss"], row["examples"]) == (
            want["dev_accuracy"], want["dev_loss"], want["dev_examples"])
    steps = {r["step"]: r for r in jsonl(run / "metrics.jsonl")}
    assert list(steps) == [1, 2, 3, 4, 5]                     # metrics.jsonl: the steps, as before
    for row in evals[1:3]:
        assert row["accuracy"] == steps[row["step"]]["dev_accuracy"]


def test_per_step_counters_beside_the_cumulative_ones(run):
    rows = jsonl(run / "metrics.jsonl")
    assert all(r["forward_tokens_step"] > 0 for r in rows)
    # between steps 1->2 and 3->4 nothing else ran a forward: the cumulative count moved by the step's own
    for a, b in ((0, 1), (2, 3)):
        assert rows[b]["forward_tokens"] - rows[a]["forward_tokens"] == rows[b]["forward_tokens_step"]
    # an evaluation ran after step 2: the cumulative count moved by more than step 3's own
    assert rows[2]["forward_tokens"] - rows[1]["forward_tokens"] > rows[2]["forward_tokens_step"]


def test_csv_holds_the_same_rows(run):
    rows = jsonl(run / "metrics.jsonl")
    with (run / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]
    for got, want in zip(table, rows):
        assert float(got["loss"]) == want["loss"] and json.loads(got["grads"]) == want["grads"]
        assert (got.get("dev_accuracy") or None) == (str(want["dev_accuracy"]) if "dev_accuracy" in want else None)
    with (run / "evals.csv").open(newline="") as f:
        assert [(int(r["step"]), r["label"]) for r in csv.DictReader(f)] == [
            (r["step"], r["label"]) for r in jsonl(run / "evals.jsonl")]


def test_resume_leaves_the_logs_of_the_uninterrupted_run(run, tmp_path, tiny_llama, fresh_registry):
    cfg, code = train_interrupted(tmp_path, tiny_llama, fresh_registry, "report_to=[jsonl,csv]")
    assert code == 130
    assert main(["train", "-c", str(cfg), "--resume", "report_to=[jsonl,csv]"]) == 0
    resumed = tmp_path / "run"
    assert jsonl(resumed / "evals.jsonl") == jsonl(run / "evals.jsonl")
    for name in ("metrics.csv", "evals.csv"):
        with (resumed / name).open(newline="") as a, (run / name).open(newline="") as b:
            got, want = list(csv.DictReader(a)), list(csv.DictReader(b))
        timing = ("step_seconds", "tokens_per_second", "forward_tokens")  # the process's own
        assert [{k: v for k, v in r.items() if k not in timing} for r in got] == \
               [{k: v for k, v in r.items() if k not in timing} for r in want]


def test_unknown_or_unavailable_logger_is_one_line(tmp_path, tiny_llama, capsys, monkeypatch, fresh_registry):
    _, code = train(tmp_path, tiny_llama, "report_to=[jsonl,wandb2]")
    err = capsys.readouterr().err
    assert code == 2 and "unknown logger 'wandb2'" in err and "csv, jsonl, tensorboard" in err
    assert not (tmp_path / "run").exists()                     # refused before anything was written
    # tensorboard as where it is not installed (None in sys.modules: its import fails)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    _, code = train(tmp_path, tiny_llama, "report_to=[tensorboard]")
    err = capsys.readouterr().err
    assert code == 2 and "report_to" in err and "pip install tensorboard" in err, err
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars(tmp_path, tiny_llama, fresh_registry):
    # tensorboard is in requirements-dev.txt: this test runs, never skips
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, code = train(tmp_path, tiny_llama, "report_to=[tensorboard]", steps=2)
    assert code == 0
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/dev/accuracy")] == [0, 2]
    # each figure once: a step row's copy of its evaluation is not a train/ scalar
    _, code = train(tmp_path / "b", tiny_llama, "report_to=[tensorboard]", "eval_every=1", steps=2)
    acc = EventAccumulator(str(tmp_path / "b" / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/dev/accuracy" in tags and not [t for t in tags if t.startswith(("train/dev_", "train/val_"))]


class HookOnly:
    @hookimpl
    def on_step_end(self, step, metrics):
        pass


def test_backends_lists_hook_only_plugins(capsys, fresh_registry):
    fresh_registry.pm.register(HookOnly(), name="my-hook-only-plugin")
    assert main(["backends"], fresh_registry) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "my-hook-only-plugin" in l)
    assert "on_step_end" in line
    assert "loggers: csv" in out and "register_loggers" in out


class FakeWandb:
    """A stand-in ``wandb`` module: records init / log / finish."""

    def __init__(self):
        self.calls = []
        self.ids = set()   # runs that exist "on the server"
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "fakeid01")})

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:   # ``step``: as W&B's, the next step after the last one logged (0 when new)
            step = (max((c[1] for c in fake.calls if c[0] == "log"), default=-1) + 1
                    if kwargs.get("id") in fake.ids else 0)

            def log(self, data, step=None):
                fake.calls.append(("log", step, data))

            def finish(self):
                fake.calls.append(("finish",))
        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    import sys
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return fake


def test_wandb_logs_config_steps_and_evaluations(tmp_path, tiny_llama, fake_wandb, fresh_registry, monkeypatch):
    from mezo_core.config import load_config
    from omegaconf import OmegaConf
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg_file, code = train(tmp_path, tiny_llama, "report_to=[jsonl,wandb]")
    assert code == 0
    run = tmp_path / "run"
    kinds = [c[0] for c in fake_wandb.calls]
    assert kinds[0] == "init" and kinds[-1] == "finish" and kinds.count("init") == kinds.count("finish") == 1
    init = fake_wandb.calls[0][1]
    want = OmegaConf.to_container(load_config(cfg_file, ["report_to=[jsonl,wandb]"]), resolve=True)
    assert init["config"] == want and init["config"]["mezo"]["steps"] == 5
    assert (init["mode"], init["project"], init["resume"], init["dir"]) == ("offline", "mezo-run", "allow", str(run))
    assert init["id"] == (run / "wandb-run-id").read_text().strip() == "fakeid01"
    logs = [c for c in fake_wandb.calls if c[0] == "log"]
    # the oracle: the rows the jsonl logger wrote
    steps = jsonl(run / "metrics.jsonl")
    train_logs = [(s, d) for _, s, d in logs if "train/loss" in d]
    assert [(s, d["train/loss"], d["train/lr"]) for s, d in train_logs] == [(r["step"], r["loss"], r["lr"]) for r in steps]
    evals = jsonl(run / "evals.jsonl")
    eval_logs = [(s, d) for _, s, d in logs if "eval/dev/accuracy" in d]
    assert [(s, d["eval/dev/accuracy"], d["eval/dev/loss"]) for s, d in eval_logs] == [
        (r["step"], r["accuracy"], r["loss"]) for r in evals]
    assert all(isinstance(v, (int, float)) for _, _, d in logs for v in d.values())   # scalars only
    assert [s for _, s, _ in logs] == sorted(s for _, s, _ in logs)                   # W&B wants steps in order


def test_wandb_resume_continues_the_same_run(tmp_path, tiny_llama, fake_wandb, fresh_registry):
    cfg, code = train_interrupted(tmp_path, tiny_llama, fresh_registry, "report_to=[wandb]")
    assert code == 130
    first = list(fake_wandb.calls)
    assert first[-1] == ("finish",)                                # closed on the interrupt too
    sent = [c[1] for c in first if c[0] == "log" and "train/loss" in c[2]]
    assert sent == [1, 2, 3]                                       # interrupted after step 3
    fake_wandb.ids.add(first[0][1]["id"])
    assert main(["train", "-c", str(cfg), "--resume", "report_to=[wandb]"]) == 0
    resumed = fake_wandb.calls[len(first):]
    init = resumed[0][1]
    assert init["id"] == first[0][1]["id"] and init["resume"] == "allow"
    # the checkpoint is step 2: the run writes step 3 again, W&B has it already
    assert [c[1] for c in resumed if c[0] == "log" and "train/loss" in c[2]] == [4, 5]
    assert all(c[1] >= 4 for c in resumed if c[0] == "log")


def test_wandb_unavailable_is_one_line(tmp_path, tiny_llama, capsys, fresh_registry, monkeypatch):
    import sys
    from mezo_builtin.loggers import WandbLogger
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert WandbLogger.name == "wandb" and "pip install wandb" in WandbLogger.unavailable_reason()
    _, code = train(tmp_path, tiny_llama, "report_to=[wandb]")
    err = capsys.readouterr().err
    assert code == 2 and "logger 'wandb' is unavailable" in err and "pip install wandb" in err
    assert not (tmp_path / "run").exists()


def test_the_run_record_is_written_whatever_report_to_says(tmp_path, tiny_llama, fresh_registry):
    """report_to=[csv]: metrics.jsonl and evals.jsonl are still the run's record (the
    core writes them: --resume trims them, training.png reads them), and csv holds the
    same steps. report_to=[jsonl, csv] writes each jsonl row once."""
    rows = {}
    for name, report in (("csv", "report_to=[csv]"), ("both", "report_to=[jsonl,csv]")):
        _, code = train(tmp_path / name, tiny_llama, report, "plot=true", steps=3)
        assert code == 0
        run = tmp_path / name / "run"
        rows[name] = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows[name]] == [1, 2, 3]
        with (run / "metrics.csv").open() as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
        evals = (run / "evals.jsonl").read_text().splitlines()
        assert len(evals) == len(set(evals)) and evals
    assert [r["loss"] for r in rows["csv"]] == [r["loss"] for r in rows["both"]]
