"""``mezo-run`` end to end on the tiny Llama with tiny JSONL data: the run
folder, user errors (exit code 2, one line, nothing written), --resume
reproducing the uninterrupted run bit for bit, and its refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mezo_core.cli import main
from mezo_core.registry import get_registry
from tiny import InterruptAt, error_text, metric_rows, plain_choice_losses, read_jsonl, write_run_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
TIMING = {"step_seconds", "tokens_per_second"}


def write_config(tmp_path, model, steps=4, checkpoint_every=2, plot=False):
    return write_run_config(tmp_path, model, {"mezo.steps": steps, "checkpoint_every": checkpoint_every,
                                              "plot": plot, "mezo.q": 2, "mezo.weight_decay": 0.01})


def comparable(row, stats=("forward_tokens",)):
    # timing fields differ run to run; backend stats count the process's own
    # forward passes (the resumed process did not evaluate zero-shot)
    return {k: v for k, v in row.items() if k not in TIMING and k not in stats}


# -- a whole run ------------------------------------------------------------------
def test_train_writes_the_run_folder(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_config(tmp_path, tiny_llama, steps=5, plot=True)
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "mezo.lr_schedule=cosine", "mezo.lr_end=1e-3",
                 "mezo.warmup_steps=1", "eval_every=2", "selection.load_best_at_end=false"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "last (step 5)" in out and "best (step " in out
    metrics = metric_rows(run)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    for r in metrics:
        assert {"loss", "loss_plus", "loss_minus", "grads", "seeds", "eps", "lr", "step_seconds",
                "tokens_per_second", "forward_tokens"} <= set(r)
        assert len(r["grads"]) == len(r["seeds"]) == 2
    assert metrics[0]["lr"] == pytest.approx(1e-2) and metrics[1]["lr"] == pytest.approx(1e-2)
    assert metrics[-1]["lr"] < 1e-2                       # cosine after warm-up
    # eval_every=2: dev metrics in the rows of steps 2 and 4 (step 5 is the final eval)
    assert [r["step"] for r in metrics if "dev_accuracy" in r] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5
    evals = {r["label"]: r for r in map(json.loads, (run / "evals.jsonl").read_text().splitlines())
             if r["split"] == "dev"}
    for key, label in (("zero_shot", "zero-shot"), ("final", "final")):   # one figure, wherever it is shown
        assert summary[key]["dev_accuracy"] == evals[label]["accuracy"] and summary[key]["dev_examples"] == 6
    # the figures themselves: a plain model (zero-shot: the initial adapter adds nothing) and a
    # plain peft model with the saved adapter score the six dev rows one at a time
    dev = read_jsonl(tmp_path / "data" / "dev.jsonl")
    for key, adapter in (("zero_shot", None), ("final", run / "adapter")):
        scores = plain_choice_losses(tiny_llama, adapter, [d["text"] for d in dev])
        right = [min(range(2), key=s.__getitem__) == d["label"] for s, d in zip(scores, dev)]
        assert summary[key]["dev_accuracy"] == sum(right) / 6, (key, scores)
        assert summary[key]["dev_loss"] == pytest.approx(sum(s[d["label"]] for s, d in zip(scores, dev)) / 6,
                                                         abs=1e-5)
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("adapter", "last"):   # selection.load_best_at_end=false: adapter/ is the last adapter
        assert sorted(p.name for p in (run / folder).iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    assert summary["result"]["adapter"] == "last" and summary["result"]["step"] == 5
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000005"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000004", "step-0000005"]
    state = json.loads((ckpts / "step-0000005" / "state.json").read_text())
    assert state["step"] == 5 and state["final"] == summary["final"]
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == load_file(str(ckpts / "step-0000005" / "adapter_model.safetensors")).keys()
    assert any(float(t.abs().sum()) > 0 for n, t in final.items() if ".lora_B." in n)   # it trained
    assert (run / "config.yaml").exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    # eval of the saved adapter reproduces the final accuracy
    assert main(["eval", "-c", str(cfg), "--adapter", str(run / "adapter")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dev_accuracy"] == summary["final"]["dev_accuracy"]
    assert result["dev_loss"] == pytest.approx(summary["final"]["dev_loss"], rel=1e-6)


def test_config_command_prints_the_resolved_config(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_config(tmp_path, tiny_llama)
    assert main(["config", "-c", str(cfg), "mezo.steps=9"]) == 0
    out = capsys.readouterr().out
    assert "steps: 9" in out and str(tiny_llama) in out


# -- user errors: exit code 2, one clear line, nothing written ------------------------
def _bad_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", label: 0}\n')
    return [f"task.train={bad}"], [str(bad), "line 3", "malformed JSON"]


CASES = {
    "unknown backend": lambda p: (["backend=nope"], ["unknown backend 'nope'", "hf"]),
    "bad key": lambda p: (["mezo.stepz=3"], ["mezo.stepz"]),
    "bad value": lambda p: (["mezo.steps=many"], ["mezo.steps", "many"]),
    "bad value check": lambda p: (["lora.r=0"], ["lora.r"]),
    "missing data file": lambda p: ([f"task.train={p / 'none.jsonl'}"], ["task.train", "none.jsonl", "not found"]),
    "missing dev file": lambda p: ([f"task.dev={p / 'none.jsonl'}"], ["task.dev", "none.jsonl"]),
    "malformed JSONL line": _bad_jsonl,
    "missing model": lambda p: ([f"model.path={p / 'no-model'}"], ["model.path", "no-model"]),
    "unknown schedule": lambda p: (["mezo.eps_schedule=zigzag"], ["zigzag"]),
    "bad target module": lambda p: (["lora.target_modules=[nope]"], ["lora", "nope"]),
}
MULTI_LINE = {"missing data file", "missing dev file", "missing model"}   # a hint follows the first line


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_one_clear_line_and_write_nothing(case, tmp_path, tiny_llama, capsys,
                                                                  fresh_registry):
    cfg = write_config(tmp_path, tiny_llama)
    overrides, needles = CASES[case](tmp_path)
    assert main(["train", "-c", str(cfg), *overrides]) == 2
    err = error_text(capsys.readouterr().err)
    lines = err.strip().splitlines()
    if case not in MULTI_LINE:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    assert not (tmp_path / "run").exists()


def test_impossible_schedule_is_a_user_error(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_config(tmp_path, tiny_llama)
    try:
        rc = main(["train", "-c", str(cfg), "mezo.eps_schedule=exponential", "mezo.eps_end=0"])
    except ValueError:
        rc = "traceback"
    assert rc == 2
    assert "eps" in error_text(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_bad_key_in_the_config_file(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_config(tmp_path, tiny_llama)
    cfg.write_text(cfg.read_text() + "verbose: true\n")
    assert main(["train", "-c", str(cfg)]) == 2
    err = error_text(capsys.readouterr().err).strip()
    n = len(cfg.read_text().splitlines())
    assert err == (f"mezo-run: error: {cfg}, line {n}: field 'verbose': Key 'verbose' not in 'RunConfig' "
                   "(neither a core field nor the section of an installed plugin: see mezo-run backends)")
    assert main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- resume ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(tmp, tiny_llama, steps=5, checkpoint_every=2)
    get_registry.cache_clear()
    assert main(["train", "-c", str(cfg)]) == 0
    get_registry.cache_clear()
    return tmp / "run"


@pytest.mark.parametrize("stop_at", [2, 3])   # 2: before that step's checkpoint is written
def test_resume_reproduces_the_uninterrupted_run(stop_at, uninterrupted, tmp_path, tiny_llama, capsys,
                                                 fresh_registry):
    cfg = write_config(tmp_path, tiny_llama, steps=5, checkpoint_every=2)
    run = tmp_path / "run"
    stopper = InterruptAt(stop_at)
    fresh_registry.pm.register(stopper)
    try:
        assert main(["train", "-c", str(cfg)], fresh_registry) == 130
    finally:
        fresh_registry.pm.unregister(stopper)
    assert "--resume" in capsys.readouterr().err
    assert [r["step"] for r in metric_rows(run)] == list(range(1, stop_at + 1))
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()

    # a changed config is refused, and the run is left as it was
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "-c", str(cfg), "--resume", "mezo.lr=0.5"]) == 2
    err = error_text(capsys.readouterr().err)
    assert "config differs" in err and "mezo.lr" in err and len(err.strip().splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == before
    # so is starting over in the same folder without --resume
    assert main(["train", "-c", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before

    assert main(["train", "-c", str(cfg), "--resume"]) == 0
    want, got = metric_rows(uninterrupted), metric_rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [comparable(r) for r in got] == [comparable(r) for r in want]
    a = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name                  # bitwise on CPU
    assert (json.loads((run / "summary.json").read_text())
            == json.loads((uninterrupted / "summary.json").read_text()))


# -- the fused step schedule (mezo.fuse_steps) ------------------------------------------
def test_fused_schedule_matches_the_unfused_run(tmp_path, tiny_llama, capsys, fresh_registry,
                                                monkeypatch):
    """fuse_steps=true folds restore + update + the next step's +eps z into one pass, except
    before an evaluation, a checkpoint or the end: the trajectory, the mid-run evaluation and
    checkpoint, and the final adapter match fuse_steps=false up to fp32 rounding."""
    import mezo_core.stepper as trainer_mod
    real_update = trainer_mod.update
    carried = {True: [], False: []}                  # per step: did it take the next step's +eps z?

    def spy(*args, next_direction=None, **kwargs):
        carried[fuse].append(next_direction is not None)
        return real_update(*args, next_direction=next_direction, **kwargs)

    monkeypatch.setattr(trainer_mod, "update", spy)
    runs = {}
    for fuse in (True, False):
        folder = tmp_path / f"fuse-{fuse}"
        # eval after step 3, checkpoint after step 4 (both mid-run), end after step 6
        cfg = write_config(folder, tiny_llama, steps=6, checkpoint_every=4)
        get_registry.cache_clear()
        assert main(["train", "-c", str(cfg), "eval_every=3", f"mezo.fuse_steps={str(fuse).lower()}"]) == 0
        runs[fuse] = folder / "run"
    capsys.readouterr()
    # steps 1, 2 and 5 carry the next step's +eps z; 3, 4 and 6 leave clean weights behind
    steps_that_carried = {k: [i + 1 for i, c in enumerate(v) if c] for k, v in carried.items()}
    assert steps_that_carried == {True: [1, 2, 5], False: []}

    fused, plain = metric_rows(runs[True]), metric_rows(runs[False])
    assert [r["step"] for r in fused] == [r["step"] for r in plain] == [1, 2, 3, 4, 5, 6]
    tol = dict(rel=1e-4, abs=1e-6)                   # fp32 rounding only
    for f, p in zip(fused, plain):
        assert f["seeds"] == p["seeds"] and f["eps"] == p["eps"] and f["lr"] == p["lr"]
        for key in ("loss", "loss_plus", "loss_minus"):
            assert f[key] == pytest.approx(p[key], **tol), (f["step"], key)
        assert f["grads"] == pytest.approx(p["grads"], **tol), f["step"]
    # the mid-run evaluation (step 3) saw clean weights in both runs
    assert [r["step"] for r in fused if "dev_accuracy" in r] == [3]
    for f, p in zip(fused, plain):
        if "dev_accuracy" in f:
            assert f["dev_accuracy"] == p["dev_accuracy"] and f["dev_examples"] == p["dev_examples"]
            assert f["dev_loss"] == pytest.approx(p["dev_loss"], rel=1e-5)
    sf, sp = (json.loads((runs[k] / "summary.json").read_text()) for k in (True, False))
    assert sf["zero_shot"] == sp["zero_shot"]        # nothing has moved yet: bitwise
    assert sf["final"]["dev_accuracy"] == sp["final"]["dev_accuracy"]
    assert sf["final"]["dev_loss"] == pytest.approx(sp["final"]["dev_loss"], rel=1e-5)
    # the mid-run checkpoint (step 4) and the final adapter hold the same tensors
    for rel in ("checkpoints/step-0000004", "adapter"):
        a = load_file(str(runs[True] / rel / "adapter_model.safetensors"))
        b = load_file(str(runs[False] / rel / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] - b[name]).abs().max() <= 1e-6, (rel, name)


def test_training_twice_into_a_finished_run_is_refused(uninterrupted, capsys, fresh_registry):
    cfg = uninterrupted.parent / "run.yaml"
    before = (uninterrupted / "metrics.jsonl").read_text()
    assert main(["train", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_resume_without_a_checkpoint_is_refused(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# -- the real SST-2 files (optional) ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason=f"{SHARED}/data/sst2 is not here")
def test_real_sst2_files_read_and_sample():
    from collections import Counter

    from mezo_core.data import read_records, sample
    train = read_records(SHARED / "data" / "sst2" / "train.tsv", "classification", 2)
    dev = read_records(SHARED / "data" / "sst2" / "dev.tsv", "classification", 2, field="task.dev")
    assert len(train) == 67349 and len(dev) == 872
    assert set(Counter(r.label for r in dev)) == {0, 1}
    k = sample(train, 16, None, seed=42)
    assert Counter(r.label for r in k) == {0: 16, 1: 16}
