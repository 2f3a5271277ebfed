"""A user's first hour (issue #26): nothing trained is discarded, the README's
own-task commands work on a small dataset, the command line and YAML read the same
text alike, and eval writes per-row predictions.

Oracles: the run's own files read back independently (evals.jsonl, the adapters'
tensors, the last checkpoint), the README's text, PyYAML's double-quoted strings,
and a plain peft model scoring the rows by hand."""
from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mezo_core.cli import main
from mezo_core.config import load_config

SEED = 2612
README = Path(__file__).resolve().parent.parent / "README.md"


def cue_task(folder: Path, labels: dict, n_train=200, n_dev=100, seed=SEED) -> tuple[Path, Path]:
    """JSONL rows whose label is given by one cue word among filler words (learnable,
    and unlike the tiny task of mezo_core.testing, sized like a user's first dataset)."""
    rng = random.Random(seed)
    filler = "the a movie film story plot actor scene music ending was is".split()
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                label = rng.choice(sorted(labels))
                words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
                words.insert(rng.randint(0, len(words)), rng.choice(labels[label]))
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return folder / "train.jsonl", folder / "dev.jsonl"


THREE = {"good": ["great", "lovely", "fun"], "bad": ["awful", "dull", "boring"], "meh": ["fine", "long", "short"]}


def test_trained_weights_are_kept_reported_and_plotted(tmp_path, tiny_llama, capsys, fresh_registry):
    """Issue #26, item 1: 3 labels, 200 train / 100 dev rows, 25 validation rows. The sign
    test at 0.025 cannot pass on 25 rows; the run says so, selects by score instead, and
    whatever it selects, last/ holds the trained weights (the last checkpoint's), and the
    CLI, summary.json, evals.jsonl and the plot give the same figures for last and best."""
    print("seed", SEED)
    train, dev = cue_task(tmp_path / "data", THREE)
    run = tmp_path / "run"
    args = ["train", f"model.path={tiny_llama}", f"task.train={train}", f"task.dev={dev}",
            "task.template={text} It was", 'task.verbalizer={good: " great", bad: " terrible", meh: " fine"}',
            "task.val_overlap_words=0", "task.n_val=25", "mezo.steps=40", "eval_every=20", "checkpoint_every=20",
            "mezo.lr=0.5", "mezo.eps=1e-2", "lora.r=4", "lora.layers=null", "progress=false", f"out_dir={run}",
            f"seed={SEED}"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "25 val examples cannot pass the sign test at 0.025" in captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"]["rule"] == "best_score" and summary["selection"]["min_wins"] == 6
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    val = {r["step"]: r["accuracy"] for r in evals if r["split"] == "val" and r["label"] != "best"}
    # best/: the plain best validation score, the earliest of equals (the oracle: evals.jsonl)
    want_best = max(sorted(val), key=lambda s: val[s])
    assert summary["best"]["step"] == want_best
    final = {r["split"]: r["accuracy"] for r in evals if r["label"] == "final"}
    assert summary["final"]["dev_accuracy"] == final["dev"] and summary["final"]["val_accuracy"] == final["val"]
    # last/ holds the trained weights: those of the last checkpoint, LoRA B moved off zero
    last = load_file(str(run / "last" / "adapter_model.safetensors"))
    ckpt = load_file(str(run / "checkpoints" / "step-0000040" / "adapter_model.safetensors"))
    assert last.keys() == ckpt.keys() and all(last[k].equal(ckpt[k]) for k in last)
    assert all(float(t.abs().sum()) > 0 for k, t in last.items() if ".lora_B." in k)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    source = "best" if summary["result"]["adapter"] == "best" else "last"
    kept = load_file(str(run / source / "adapter_model.safetensors"))
    assert all(adapter[k].equal(kept[k]) for k in adapter)
    assert summary["result"]["step"] == (want_best if source == "best" else 40)
    # the CLI names both, with their steps and figures
    out = captured.out
    assert "last (step 40)" in out and f"{summary['final']['dev_accuracy']:.4f}" in out
    assert f"best (step {want_best})" in out and f"{summary['best']['dev_accuracy']:.4f}" in out
    # the plot marks both (its legend), from the same state
    from mezo_core.plot import plot_run
    state = json.loads((run / "checkpoints" / "step-0000040" / "state.json").read_text())
    labels = plot_run(run / "metrics.jsonl", state, tmp_path / "again.png")
    assert "last/ (step 40)" in labels and f"best/ (step {want_best})" in labels


def test_the_gate_that_holds_still_keeps_the_trained_adapter(tmp_path, tiny_llama, capsys, fresh_registry):
    """A gate that keeps the zero-shot adapter (a level no gain of 6 dev rows passes, on a
    rule that is not relaxed) leaves best/ at step 0, adapter/ its copy, and last/ trained."""
    from tiny import write_run_config
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 6, "eval_every": 3, "seed": SEED,
                                                  "selection.significance": 1e-9})
    assert main(["train", "-c", str(cfg), "mezo.lr=0.5"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    # 1e-9 needs 30 wins of 6 rows: the plan falls back to the plain best score; with equal
    # scores the earliest adapter stays. Whatever it keeps, last/ is the trained state.
    last = load_file(str(run / "last" / "adapter_model.safetensors"))
    assert any(float(t.abs().sum()) > 0 for k, t in last.items() if ".lora_B." in k)
    assert summary["final"]["dev_accuracy"] == next(
        r["accuracy"] for r in map(json.loads, (run / "evals.jsonl").read_text().splitlines())
        if r["label"] == "final" and r["split"] == "dev")


# -- the README's own-task commands ---------------------------------------------------
def readme_commands(section: str) -> list[list[str]]:
    """The commands of the first bash block under ``section`` in the README, as argv lists."""
    text = README.read_text(encoding="utf-8")
    body = text[text.index(f"## {section}"):]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def test_readme_own_task_commands_run_on_200_rows(tmp_path, tiny_llama, monkeypatch, capsys, fresh_registry):
    """The README's "Bring your own task" commands, as written, on a 200-row dataset in
    data/ of the working folder. Appended for the test only: the tiny model (its 4
    layers, not the recipe's top 4 of 30), a few steps, no progress bars."""
    print("seed", SEED)
    monkeypatch.chdir(tmp_path)
    cue_task(tmp_path / "data", {"negative": ["awful", "dull", "boring"], "positive": ["great", "lovely", "fun"]},
             n_train=200, n_dev=60)
    commands = readme_commands("Bring your own task")
    assert [c[:2] for c in commands] == [["mezo-run", "init"], ["mezo-run", "train"]]
    test_only = [f"model.path={tiny_llama}", "lora.layers=null", "mezo.steps=6", "eval_every=3",
                 "checkpoint_every=3", "progress=false", "plot=false"]
    assert main(commands[0][1:]) == 0
    recipe = yaml.safe_load(Path(commands[1][commands[1].index("-c") + 1]).read_text())
    assert recipe["task"]["n_val"] >= 20 and recipe["task"]["n_train"] + recipe["task"]["n_val"] <= 200
    assert recipe["task"]["template"] == "Review: {text}\nSentiment:"      # the escape read as YAML's
    assert main(commands[1][1:] + test_only) == 0
    out_dir = Path(next(a.split("=", 1)[1] for a in commands[1] if a.startswith("out_dir=")))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["selection"]["examples"] == recipe["task"]["n_val"]
    assert (out_dir / "metrics.csv").exists() and (out_dir / "last").is_dir()


def test_init_custom_sizes_from_the_data(tmp_path, capsys, fresh_registry):
    """The sizes follow the data: a quarter of the rows for validation (at most 500), the
    rest trained on, a batch never larger than half the training set; a validation file
    of its own takes no rows from train; too few rows: no selection."""
    for n_train, want_val, want_batch in ((200, 50, 16), (40, 0, 16), (8000, 500, 16), (30, 0, 15)):
        train, dev = cue_task(tmp_path / f"d{n_train}", THREE, n_train=n_train, n_dev=10)
        out = tmp_path / f"r{n_train}.yaml"
        assert main(["init", "custom", str(out), f"task.train={train}", f"task.dev={dev}",
                     "task.val_overlap_words=0",
                     'task.verbalizer={good: " great", bad: " terrible", meh: " fine"}']) == 0
        recipe = yaml.safe_load(out.read_text())
        task = recipe["task"]
        assert task["n_val"] == want_val, n_train
        assert task["n_train"] == n_train - want_val and task["k_per_class"] is None
        assert recipe["mezo"]["batch_size"] == min(want_batch, (n_train - want_val) // 2)
        assert recipe["eval_every"] == (100 if want_val else 0) and recipe["selection"]["load_best_at_end"] == bool(want_val)
        cfg = load_config(out)   # the file is a valid recipe
        assert cfg.task.n_val == want_val
    capsys.readouterr()
    assert main(["init", "custom", str(tmp_path / "x.yaml")]) == 2      # no data named: one line
    assert "task.train=FILE" in capsys.readouterr().err


# -- the same text on the command line and in YAML -------------------------------------
@pytest.mark.parametrize("text", ["Ticket: {text}\nCategory:", "a\tb {text}", "{text}\n\nAnswer:", "x {text} y",
                                  "path C:\\data {text}", "two\\lines {text}"])
def test_command_line_and_yaml_read_the_same_text_alike(tmp_path, text, capsys):
    """A recipe writes a template as a double-quoted YAML string; the command line takes
    the same characters between its quotes: \\n, \\t and \\\\ mean the same in both."""
    as_yaml = json.dumps(text)    # a JSON string is a double-quoted YAML string
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task:\n  template: {as_yaml}\n")
    from_yaml = load_config(recipe).task.template
    assert from_yaml == text
    typed = as_yaml[1:-1].replace('\\"', '"')   # what a user types between the shell's quotes
    assert load_config(None, [f"task.template={typed}"]).task.template == text


def test_a_literal_backslash_n_is_pointed_out(tmp_path, capsys):
    """Single-quoted YAML keeps \\n as two characters: the run says so, naming the field."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  template: 'Review: {text}\\nSentiment:'\n")
    assert load_config(recipe).task.template == "Review: {text}\\nSentiment:"
    assert "config field 'task.template' holds a backslash and n" in capsys.readouterr().err


# -- eval --predictions ----------------------------------------------------------------
def test_eval_predictions_match_a_plain_peft_model(tmp_path, tiny_llama, capsys, fresh_registry):
    """One JSON line per dev row, in file order; each row's candidate losses and prediction
    agree with a plain transformers + peft model scoring the same prompts by hand."""
    print("seed", SEED)
    from tiny import plain_choice_losses, write_run_config
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 3, "seed": SEED})
    assert main(["train", "-c", str(cfg), "mezo.lr=0.5"]) == 0
    capsys.readouterr()
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "-c", str(cfg), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--predictions", str(preds)]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [d["text"] for d in dev] and [r["index"] for r in rows] == list(range(6))
    assert sum(r["correct"] for r in rows) / len(rows) == result["dev_accuracy"]
    oracle = plain_choice_losses(tiny_llama, tmp_path / "run" / "adapter", [d["text"] for d in dev])
    for row, d, losses in zip(rows, dev, oracle):
        assert row["losses"] == pytest.approx(losses, abs=1e-4)
        assert row["prediction"] == min(range(2), key=lambda i: losses[i]) and row["label"] == d["label"]


def test_eval_predictions_of_a_completion_task(tmp_path, tiny_llama, capsys, fresh_registry):
    """One JSON line per dev row, in file order, with the loss a plain transformers model gives
    its completion (mean cross-entropy of the completion's tokens after the prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny import write_run_config
    data = tmp_path / "sums.jsonl"
    dev = [{"prompt": f"{a}+{a}=", "completion": f" {2 * a}"} for a in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in dev))
    cfg = write_run_config(tmp_path, tiny_llama, {"task.kind": "completion", "task.train": str(data),
                                                  "task.dev": str(data), "task.k_per_class": None})
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", "-c", str(cfg), "--predictions", str(preds)]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in rows] == [(d["prompt"], d["completion"]) for d in dev]
    assert sum(r["exact_match"] for r in rows) / 4 == result["dev_exact_match"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for row, d in zip(rows, dev):
        prompt = tok(d["prompt"])["input_ids"]
        target = tok(d["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]
        assert row["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(target))),
                                            abs=1e-4)


def test_the_gguf_conversion_is_keyed_by_content(tmp_path, monkeypatch):
    """A copy, a move or a touch of one file shares one conversion folder; other bytes
    get another. The oracle: hashlib over the bytes."""
    import hashlib
    import os
    from mezo_core.models import converted_dir
    monkeypatch.setenv("MEZO_CACHE", str(tmp_path / "cache"))
    rng = random.Random(SEED)
    print("seed", SEED)
    data = bytes(rng.randrange(256) for _ in range(1 << 16))
    a = tmp_path / "a" / "m.gguf"
    b = tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    first = converted_dir(a)
    assert first.name == f"m-{hashlib.sha256(data).hexdigest()[:16]}"
    assert converted_dir(b) == first
    os.utime(a, ns=(1, 1))
    assert converted_dir(a) == first
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert converted_dir(b) != first


def test_train_eval_export_raise_no_deprecation_warnings(tmp_path, tiny_llama, capsys, fresh_registry):
    """Our calls into transformers, peft and torch use their current APIs: a run, an eval
    and an export record no DeprecationWarning or FutureWarning (all shown, none filtered)."""
    import warnings
    from tiny import write_run_config
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 3, "eval_every": 2, "plot": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "-c", str(cfg)]) == 0
        assert main(["eval", "-c", str(cfg), "--adapter", str(tmp_path / "run" / "adapter")]) == 0
        assert main(["export", "-c", str(cfg), "--merge", str(tmp_path / "merged")]) == 0
    old = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in caught
           if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not old, old


def test_a_run_prints_no_library_noise(tmp_path, tiny_llama):
    """A fresh `mezo-run` process (imports as a user's are: peft pulls in torchao where it is
    installed) prints nothing on stderr but its own lines and progress bars: no library
    deprecation notices, no failed extension loads."""
    import subprocess
    import sys
    from tiny import write_run_config
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 2, "eval_every": 1})
    proc = subprocess.run([sys.executable, "-m", "mezo_core.cli", "train", "-c", str(cfg), "progress=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("mezo-run:") and "it/s]" not in line and "s/it]" not in line]
    assert not noise, noise
