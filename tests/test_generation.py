"""Exact match on greedy generations for completion tasks (#15 item 3).

The oracle is an explicit greedy loop in this file: one unpadded prompt at a
time, a full forward of plain peft (the saved adapter) per token, argmax. A
random tiny model never emits its EOS, so the test makes it stop: the
tokenizer's EOS becomes an ordinary token that the adapted model picks after
a first token on some prompts. Some golds then end exactly where the model
stops, others do not."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mezo_core import Backend, MezoError
from mezo_core.config import load_config
from mezo_core.data import Task, exact_match, normalize_answer
from tiny import corpus

SEED = 23
EXTRA = Task.EXACT_MATCH_EXTRA_TOKENS


def greedy_loop(model, prompt, n, eos):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    from mezo_backend_hf.backend import HFBackend
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print("seed", SEED)
    tmp = tmp_path_factory.mktemp("em")
    texts = corpus(24, seed=SEED)
    draft = tmp / "draft.jsonl"
    draft.write_text("".join(json.dumps({"prompt": t, "completion": " x"}) + "\n" for t in texts))
    overrides = ["task.kind=completion", f"task.train={draft}", "lora.r=2", "lora.alpha=4",
                 "hf.trunk_cache=false"]
    first = HFBackend(load_config(None, overrides + [f"model.path={tiny_llama}", f"task.dev={draft}"]))
    first.perturb([(SEED, 0.5)])
    first.save_adapter(tmp / "adapter")
    first.close()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      str(tmp / "adapter")).eval()
    prompts = [tok(t)["input_ids"] for t in texts]
    runs = [greedy_loop(plain, p, 12, None) for p in prompts]
    # EOS := the token that most rows reach after at least one other token
    late = {}
    for run in runs:
        for t in set(run):
            if run.index(t) >= 1:
                late[t] = late.get(t, 0) + 1
    stop = max(sorted(late), key=late.get)
    model = tmp / "model"
    shutil.copytree(tiny_llama, model)
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    tok.save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.eos_token_id == stop
    rows = []
    for i, text in enumerate(texts):
        gen = greedy_loop(plain, tok(text)["input_ids"], 12, stop)
        gold = decode(tok, gen) if 0 < len(gen) < 12 else decode(tok, gen[:2])
        if 0 < len(gen) < 12 and i % 3 == 0:
            gold += " and more"                          # the model stops before the gold ends
        rows.append({"prompt": text, "completion": gold if gold.strip() else " x"})
    dev = tmp / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, overrides + [f"model.path={model}", f"task.dev={dev}"])
    backend = HFBackend(cfg)
    backend.load_adapter(tmp / "adapter")
    yield cfg, backend, plain, tok, rows
    backend.close()


def test_hf_generate_is_the_greedy_loop_under_the_adapter(setup):
    _, backend, plain, tok, rows = setup
    prompts = [tuple(tok(r["prompt"])["input_ids"]) for r in rows]   # of different lengths: padded
    got = backend.generate(prompts, 6)
    want = [tuple(greedy_loop(plain, p, 6, tok.eos_token_id)) for p in prompts]
    assert got == want
    assert any(len(g) < 6 for g in got) and any(len(g) == 6 for g in got)   # EOS stops some rows
    # the adapter matters: without it the greedy tokens differ
    with plain.disable_adapter():
        assert [tuple(greedy_loop(plain, p, 6, tok.eos_token_id)) for p in prompts] != want


def test_exact_match_of_the_evaluation_is_the_oracles(setup):
    cfg, backend, plain, tok, rows = setup
    expected = 0
    for r in rows:   # the rule, written out: generation up to |gold| + EXTRA tokens, text to its
        budget = len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + EXTRA   # first newline,
        text = decode(tok, greedy_loop(plain, tok(r["prompt"])["input_ids"], budget, tok.eos_token_id))
        text = text.lstrip().split("\n")[0]                                              # whitespace runs
        expected += " ".join(text.split()) == " ".join(r["completion"].split())         # as one space
    print(f"oracle: {expected} of {len(rows)} exact")
    assert 0 < expected < len(rows)
    task = Task(cfg.task, backend.tokenizer)
    for batch_size in (1, 5, 32):
        result = task.evaluate(backend, batch_size)
        assert result["dev_exact_match"] == pytest.approx(expected / len(rows))
        assert result["dev_examples"] == len(rows) and "dev_loss" in result
    off = load_config(None, [f"{k}={v}" for k, v in (("model.path", cfg.model.path), ("task.kind", "completion"),
                                                      ("task.train", cfg.task.train), ("task.dev", cfg.task.dev),
                                                      ("task.exact_match", "false"))])
    assert "dev_exact_match" not in Task(off.task, backend.tokenizer).evaluate(backend, 8)


def test_exact_match_rule():
    assert exact_match("  Paris\nis the capital", " Paris")          # cut at the first newline
    assert exact_match("\n Paris \n", "Paris")                       # after some text
    assert exact_match("New   York", " New York")                    # whitespace runs
    assert not exact_match(" Paris is the capital", " Paris")        # ran on: no match
    assert not exact_match(" paris", " Paris")                       # case is kept
    assert exact_match(" a\nb", " a\nb") and not exact_match(" a\nc", " a\nb")  # multi-line golds
    assert normalize_answer("\t a  b \n") == "a b"


class NoGeneration(Backend):
    """A backend without ``generate``: its losses are fixed numbers."""
    name = "nogen"

    def trainable_names(self): return []
    def perturb(self, terms, decay=1.0): pass
    def save_adapter(self, path): pass
    def load_adapter(self, path): pass

    def losses(self, batch):
        return torch.tensor([float(len(e.target_ids)) for e in batch], dtype=torch.float64)


def test_a_backend_that_cannot_generate_reports_the_loss_with_a_note(setup, capsys):
    cfg, backend, _, tok, rows = setup
    with pytest.raises(MezoError, match="backend 'nogen' cannot generate"):
        NoGeneration().generate([(1, 2)], 3)
    task = Task(cfg.task, tok)
    result = task.evaluate(NoGeneration(), 4)
    assert "dev_exact_match" not in result
    golds = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert result["dev_loss"] == pytest.approx(sum(golds) / len(golds))
    err = capsys.readouterr().err
    assert err.count("cannot generate text: exact match skipped") == 1


def test_a_completion_run_logs_exact_match(setup, tmp_path):
    """Through the CLI: the zero-shot row of evals.jsonl holds the exact match of the
    evaluation (here of the adapter loaded into this module's backend: the run starts
    from the zero adapter, so its zero-shot numbers are the base model's)."""
    from mezo_core.cli import main
    cfg, _, _, tok, rows = setup
    args = ["train", f"model.path={cfg.model.path}", "task.kind=completion", f"task.train={cfg.task.train}",
            f"task.dev={cfg.task.dev}", "task.n_val=0", "lora.r=2", "lora.layers=null", "mezo.steps=1",
            "mezo.batch_size=2", f"out_dir={tmp_path / 'run'}", "progress=false", "plot=false",
            "report_to=[jsonl,csv]"]
    assert main(args) == 0
    evals = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert evals[0]["label"] == "zero-shot" and all("exact_match" in e for e in evals)
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    expected = 0
    for r in rows:   # the base model's greedy loop, the rule as in the test above
        budget = len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + EXTRA
        text = decode(tok, greedy_loop(base, tok(r["prompt"])["input_ids"], budget, tok.eos_token_id))
        expected += " ".join(text.lstrip().split("\n")[0].split()) == " ".join(r["completion"].split())
    assert evals[0]["exact_match"] == pytest.approx(expected / len(rows))
    assert "exact_match" in (tmp_path / "run" / "evals.csv").read_text().splitlines()[0]
