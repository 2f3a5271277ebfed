"""Reward tasks (#29): the reward plugins against hand-written cases, reward rows read
from JSONL and TSV, the objective a step minimises (minus the mean reward of the
completions generated under each perturbed state) against rewards worked out by hand,
an outside reward plugin found through entry points and trained with, and a sampled
reward run that resumes bitwise."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from mezo_core import LocalTensorsBackend, MezoError
from mezo_core.cli import main
from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.forwards import Prompt, objective
from mezo_core.mezo import probe
from mezo_core.philox import mix
from mezo_core.registry import Registry, make_plugin_manager
from mezo_core.rewards import Reward, Rewarder
from mezo_core.testing import write_run_config


def builtin(name, **options):
    cls = Registry(make_plugin_manager()).get("rewards", name)
    return cls(cls.options(**options)) if cls.options else cls()


# -- the built-in rewards -------------------------------------------------------------
@pytest.mark.parametrize("completion, reference, want", [
    (" positive", "positive", 1.0), (" Positive.\nThe review", "positive", 1.0), ("POSITIVE!", " positive ", 1.0),
    (" negative", "positive", 0.0), (" positively", "positive", 0.0), ("", "positive", 0.0),
    (" the positive", "positive", 0.0), ("\n\n'positive'", "positive", 1.0)])
def test_label_word(completion, reference, want):
    assert builtin("label_word").score(completion, reference) == want


@pytest.mark.parametrize("completion, reference, want", [
    (" 19", "19", 1.0), (" 19\nQ: next", "19", 1.0), (" 19 apples", "19", 0.0), ("19", "19 ", 1.0),
    (" Paris", "paris", 0.0)])
def test_exact_match(completion, reference, want):
    assert builtin("exact_match").score(completion, reference) == want


@pytest.mark.parametrize("completion, reference, want", [
    (" 19", "19", 1.0), (" 19 apples", "19", 1.0), ("It is 7+12 = 19", "19", 0.0),   # the FIRST number
    (" -3", "-3", 1.0), (" 1,234.0", "1234", 1.0), (" 19.5", "19", 0.0), (" nineteen", "19", 0.0),
    (" .5", "0.5", 1.0)])
def test_numeric(completion, reference, want):
    assert builtin("numeric").score(completion, reference) == want


def test_numeric_tolerance_and_bad_reference():
    assert builtin("numeric", tolerance=0.5).score(" 19.4", "19") == 1.0
    assert builtin("numeric", tolerance=0.5).score(" 19.6", "19") == 0.0
    with pytest.raises(MezoError, match="holds no number"):
        builtin("numeric").score(" 19", "nineteen")


def test_regex_match_and_group():
    assert builtin("regex", pattern=r"\d+").score("the answer is 42", None) == 1.0
    assert builtin("regex", pattern=r"\d+").score("no digits", "42") == 0.0
    grouped = builtin("regex", pattern=r"answer: (\w+)")
    assert grouped.score("so the answer: 42.", "42") == 1.0
    assert grouped.score("so the answer: 41.", "42") == 0.0
    assert grouped.score("so the answer: 41.", None) == 1.0     # no reference: a match is enough
    assert builtin("regex", pattern=r"answer: (\w+)", ignore_case=True).score("ANSWER: Yes", "yes") == 1.0
    with pytest.raises(MezoError, match="needs a pattern"):
        builtin("regex")
    with pytest.raises(MezoError, match="not a regular expression"):
        builtin("regex", pattern="(")


def test_rewards_that_need_a_reference_say_so():
    for name in ("label_word", "exact_match", "numeric"):
        with pytest.raises(MezoError, match=f"reward '{name}' needs a reference"):
            builtin(name).score(" x", None)


# -- reward rows ----------------------------------------------------------------------
class Words:
    """A tokenizer stand-in: one id per character (ord), decode joins them back."""
    bos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def task_config(tmp_path, train, dev, *extra):
    return load_config(None, [f"task.train={train}", f"task.dev={dev}", "task.kind=reward", "task.k_per_class=null",
                              "model.path=unused", *extra]).task


def test_reward_rows_from_jsonl_and_tsv(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"prompt": "2 + 3 =", "reference": 5}\n{"prompt": "1 + 1 =", "reference": "2"}\n'
                     '{"prompt": "say hi"}\n')
    tsv = tmp_path / "b.tsv"
    tsv.write_text("prompt\treference\nQ: 4 + 4 =\t8\nQ: hello\t\n")
    task = Task(task_config(tmp_path, jsonl, tsv, "task.reward=regex", "task.reward_options={pattern: '\\d'}"), Words())
    assert [(r.text, task.reference(r)) for r in task.dev] == [("Q: 4 + 4 =", "8"), ("Q: hello", None)]
    prompts = sorted((e.prompt_ids, e.reference) for e in task.train_examples)
    assert prompts == sorted([(tuple(map(ord, "2 + 3 =")), "5"), (tuple(map(ord, "1 + 1 =")), "2"),
                              (tuple(map(ord, "say hi")), None)])
    with pytest.raises(MezoError, match=r"a.jsonl, line 3: reward 'numeric' needs a reference"):
        Task(task_config(tmp_path, jsonl, tsv, "task.reward=numeric"), Words())


def test_labelled_rows_answer_with_their_verbalizer_word(tmp_path):
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(8)))
    cfg = task_config(tmp_path, tsv, tsv, "task.reward=label_word", "task.k_per_class=2",
                      "task.template=Review: {text}\nSentiment:")
    task = Task(cfg, Words())
    assert len(task.train) == 4 and sorted(r.label for r in task.train) == [0, 0, 1, 1]   # k per class
    for r in task.dev:
        e = task.example(r)
        assert e.reference == ("great" if r.label else "terrible")      # the default verbalizer, stripped
        assert e.prompt_ids == tuple(map(ord, f"Review: {r.text}\nSentiment:"))


def test_train_batches_seed_each_row_from_the_step(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"p{i}", "reference": str(i)}) + "\n" for i in range(6)))
    task = Task(task_config(tmp_path, jsonl, jsonl), Words())
    a, b = task.train_batch(7, 3, 4), task.train_batch(7, 3, 4)
    assert a == b and [e.sample_seed for e in a] == [mix(7, 3, i, 0x5A3F) for i in range(12, 16)]
    assert [e.sample_seed for e in task.train_batch(7, 4, 4)] != [e.sample_seed for e in a]


# -- the objective ------------------------------------------------------------------------
class Threshold(LocalTensorsBackend):
    """One trainable scalar w. The completion of a prompt is "yes" where w exceeds the
    prompt's threshold (its first id / 100), else "no"; sampled completions append the
    row's seed mod 3. Records every generate call."""
    name = "threshold"

    def __init__(self, w=0.0):
        self._names, self._tensors = ["w"], [torch.tensor([w])]
        self.tokenizer, self.calls = Words(), []

    def losses(self, batch):
        raise AssertionError("reward rows never ask for losses")

    def generate(self, prompts, max_new_tokens, adapters=None, *, temperature=0.0, seeds=None):
        self.calls.append((list(prompts), adapters, temperature, seeds))
        w = float(self._tensors[0][0])
        out = []
        for i, p in enumerate(prompts):
            text = "yes" if w > p[0] / 100 else "no"
            if seeds is not None:
                text += str(seeds[i] % 3)
            out.append(tuple(map(ord, text))[:max_new_tokens])
        return out

    def save_adapter(self, path):
        raise NotImplementedError

    def load_adapter(self, path):
        raise NotImplementedError


def prompts(*thresholds, rewarder, seeds=None):
    return [Prompt((t, 1), "yes", rewarder, sample_seed=(seeds or [0] * len(thresholds))[i])
            for i, t in enumerate(thresholds)]


def test_objective_of_reward_rows_is_minus_their_mean_reward():
    greedy = Rewarder(builtin("exact_match"), max_new_tokens=8)
    backend = Threshold(w=0.25)      # thresholds 0.10, 0.20 pass, 0.30 does not
    assert objective(backend, prompts(10, 30, 20, rewarder=greedy)).tolist() == [-1.0, 0.0, -1.0]
    assert backend.calls[-1][2:] == (0.0, None)                     # greedy: no temperature, no seeds
    sampled = Rewarder(builtin("regex", pattern="^yes[01]$"), max_new_tokens=8, samples=3, temperature=0.7)
    rows = prompts(10, 30, rewarder=sampled, seeds=[5, 11])
    loss = objective(backend, rows, adapters=["a", "b"], on_device=True)
    generated, adapters, temperature, seeds = backend.calls[-1]
    assert seeds == [mix(5, 0), mix(5, 1), mix(5, 2), mix(11, 0), mix(11, 1), mix(11, 2)]
    assert adapters == ["a"] * 3 + ["b"] * 3 and temperature == 0.7 and len(generated) == 6
    by_hand = [-sum(s % 3 in (0, 1) for s in seeds[:3]) / 3, 0.0]    # row 2 says "no": reward 0
    assert loss.dtype == torch.float64 and loss.tolist() == pytest.approx(by_hand)


def test_mezo_probe_on_rewards_is_the_difference_of_rewards():
    """g = (L+ - L-)/2eps with L = -R: w = 0.25 +- eps z moves the thresholds it crosses."""
    greedy = Rewarder(builtin("exact_match"), max_new_tokens=8)
    backend = Threshold(w=0.25)
    z = backend.snapshot()["w"].clone()
    backend.perturb([(3, 1.0)])
    z = backend.snapshot()["w"] - z                                   # z(3) of the one tensor
    backend.perturb([(3, -1.0)])
    eps = 0.06
    batch = prompts(10, 20, 28, 30, rewarder=greedy)
    result = probe(backend, batch, [3], eps)
    reward = lambda w: sum(w > t / 100 for t in (10, 20, 28, 30)) / 4   # noqa: E731
    w_plus, w_minus = 0.25 + eps * float(z[0]), 0.25 - eps * float(z[0])
    assert result.losses_plus == [pytest.approx(-reward(w_plus))]
    assert result.losses_minus == [pytest.approx(-reward(w_minus))]
    assert result.grads == [pytest.approx(-(reward(w_plus) - reward(w_minus)) / (2 * eps))]
    assert result.grads[0] != 0                                       # the thresholds were crossed


def test_a_backend_that_cannot_sample_is_named():
    class Greedy(Threshold):
        def generate(self, prompts, max_new_tokens):
            return super().generate(prompts, max_new_tokens)
    sampled = Rewarder(builtin("exact_match"), max_new_tokens=8, samples=2, temperature=1.0)
    with pytest.raises(MezoError, match="task.samples=2: backend 'threshold' cannot sample"):
        objective(Greedy(), prompts(10, rewarder=sampled))


# -- an outside reward plugin -----------------------------------------------------------
OUTSIDE_DIST, OUTSIDE_MODULE = "mezo-length-reward", "mezo_length_reward"
OUTSIDE_SOURCE = '''
from dataclasses import dataclass, field
from mezo_core import hookimpl
from mezo_core.rewards import Reward

SCORED = []


@dataclass
class LengthOptions:
    per_char: float = field(default=0.1, metadata={"help": "reward per character"})


class Length(Reward):
    name = "length"
    options = LengthOptions
    needs_reference = False

    def score(self, completion, reference):
        SCORED.append((completion, reference))
        return self.opts.per_char * len(completion)


@hookimpl
def register_rewards(register):
    register(Length)
'''


@pytest.fixture
def outside_reward(install_plugin):
    return install_plugin(OUTSIDE_MODULE, OUTSIDE_DIST, "1.0", OUTSIDE_SOURCE, "length")


def reward_files(tmp_path, n_train=6, n_dev=4, reference=True):
    from mezo_core.testing import corpus
    texts = corpus(n_train + n_dev, seed=3)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", texts[:n_train]), ("dev", texts[n_train:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": t, **({"reference": "the"} if reference else {})}) + "\n" for t in part))
    return tmp_path / "train.jsonl", tmp_path / "dev.jsonl"


def reward_run(tmp_path, model, **extra):
    train, dev = reward_files(tmp_path)
    return write_run_config(tmp_path, model, {"task.kind": "reward", "task.train": str(train), "task.dev": str(dev),
                                              "task.k_per_class": None, "task.max_new_tokens": 3,
                                              "mezo.batch_size": 3, "mezo.steps": 4, "mezo.eps": 0.5, **extra})


def test_outside_reward_is_found_and_trains(outside_reward, tmp_path, tiny_llama, capsys):
    entry = Registry(make_plugin_manager()).items["rewards"]["length"]
    assert (entry.distribution, entry.plugin) == (OUTSIDE_DIST, "length")
    cfg = reward_run(tmp_path, tiny_llama, **{"task.reward": "length", "task.reward_options": {"per_char": 0.5}})
    assert main(["train", "-c", str(cfg), "mezo.steps=2"]) == 0
    scored = sys.modules[OUTSIDE_MODULE].SCORED
    # 2 steps x 2 signs x 3 rows, plus the zero-shot and final evaluations of 4 dev rows
    assert len(scored) == 2 * 2 * 3 + 2 * 4 and all(ref == "the" for _, ref in scored)
    evals = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    dev_scores = [0.5 * len(text) for text, _ in scored[:4]]     # the zero-shot evaluation came first
    assert evals[0]["reward"] == pytest.approx(sum(dev_scores) / 4) and evals[0]["reward"] > 0
    assert main(["train", "-c", str(cfg), "task.reward_options={width: 1}"]) == 2
    assert "task.reward_options.width" in capsys.readouterr().err


def test_unknown_reward_is_refused(tmp_path, tiny_llama, fresh_registry, capsys):
    cfg = reward_run(tmp_path, tiny_llama, **{"task.reward": "nope"})
    assert main(["train", "-c", str(cfg)]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


# -- a sampled reward run ------------------------------------------------------------------
def test_sampled_reward_run_resumes_bitwise(tmp_path, tiny_llama, fresh_registry):
    extra = {"task.reward": "regex", "task.reward_options": {"pattern": "e"}, "task.samples": 2,
             "task.temperature": 1.0, "checkpoint_every": 2, "hf.pm_batch": True}
    full = reward_run(tmp_path / "a", tiny_llama, **extra)
    assert main(["train", "-c", str(full)]) == 0
    cut = reward_run(tmp_path / "b", tiny_llama, **{**extra, "mezo.steps": 2})
    assert main(["train", "-c", str(cut)]) == 0
    assert main(["train", "-c", str(cut), "mezo.steps=4", "--resume"]) == 0
    rows = lambda p: [json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [(r["loss_plus"], r["loss_minus"], r["grads"]) for r in a] == \
           [(r["loss_plus"], r["loss_minus"], r["grads"]) for r in b]
    assert any(r["grads"] != [0.0] for r in a)                  # the rewards differed between the signs
    assert all(-1.0 <= r["loss_plus"] <= 0.0 for r in a)
    wa = load_file(str(tmp_path / "a" / "run" / "last" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "last" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_reward_interface_is_abstract():
    with pytest.raises(TypeError):
        Reward()


def test_fzoo_runs_on_rewards(tmp_path, tiny_llama, fresh_registry):
    """fzoo's one-sided estimate from rewards: g_i = (l_i - l_0)/eps with l = -reward,
    the q + 1 states side by side (hf.pm_batch) and one after another alike."""
    extra = {"task.reward": "regex", "task.reward_options": {"pattern": "e"}, "mezo.estimator": "fzoo",
             "mezo.q": 2, "mezo.lr": 1e-3, "mezo.steps": 3}
    rows = {}
    for pm in (True, False):
        cfg = reward_run(tmp_path / str(pm), tiny_llama, **extra, **{"hf.pm_batch": pm})
        assert main(["train", "-c", str(cfg)]) == 0
        rows[pm] = [json.loads(x) for x in (tmp_path / str(pm) / "run" / "metrics.jsonl").read_text().splitlines()]
        for r in rows[pm]:
            assert sum(r["grads"]) / 2 * 0.5 == pytest.approx(r["loss_plus"] - r["loss_minus"], abs=1e-12)
            assert -1.0 <= r["loss_minus"] <= 0.0 and r["tokens_per_second"] > 0
    assert any(g != 0 for r in rows[True] for g in r["grads"])
    assert [r["grads"] for r in rows[True]] == [r["grads"] for r in rows[False]]


def test_reward_rows_from_a_hf_dataset(monkeypatch, tmp_path):
    from test_tasks import fake_datasets
    rows = [{"question": f"q{i}", "answer": i} for i in range(5)]
    fake_datasets(monkeypatch, {"train": rows, "validation": rows[:2]})
    spec = "{path: gsm, text_field: question, reference_field: answer}"
    cfg = load_config(None, [f"task.hf_dataset={spec}", "task.kind=reward", "task.k_per_class=null",
                             "task.reward=numeric", "model.path=unused"])
    task = Task(cfg.task, Words())
    assert [(r.text, task.reference(r)) for r in task.dev] == [("q0", "0"), ("q1", "1")]
    assert sorted(e.reference for e in task.train_examples) == ["0", "1", "2", "3", "4"]


def test_eval_predictions_of_a_reward_task(tmp_path, tiny_llama, fresh_registry, capsys):
    cfg = reward_run(tmp_path, tiny_llama, **{"task.reward": "regex", "task.reward_options": {"pattern": "e"}})
    out = tmp_path / "pred.jsonl"
    assert main(["eval", "-c", str(cfg), "--predictions", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["reference"] == "the" for r in rows)
    for r in rows:   # the reward of each greedy generation, by hand
        assert r["reward"] == float("e" in r["generation"])
        assert r["exact_match"] == (r["generation"].lstrip().split("\n", 1)[0].split() == ["the"])
    mean = sum(r["reward"] for r in rows) / 4
    assert f'"dev_reward": {mean}' in printed and f'"dev_loss": {0.0 - mean}' in printed
