"""The SGLang backend's generation for reward tasks (#29 item 3), on the CPU over
``FakeEngine`` (transformers + peft behind SGLang 0.5.15's generate: ``output_ids``,
``finish_reason``, stop tokens, ``sampling_seed``, a radix cache that serves a
prompt less its last token), against the hf backend on the same model and adapter.

What the stand-in cannot show -- SGLang's own kernels agreeing with hf, its radix
cache under real scheduling -- is ``test_sglang_backend``'s GPU group. What these
tests pin down is the backend's side: the requests it sends, the stopping rule made
the hf backend's, both signs in one call, the samples of a prompt reading its KV.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mezo_core.forwards import one_direction
from sglang_support import FakeEngine, build_llama, make_config
from tiny import commonest_inner_token, count_calls, recorded_rows, seeded_random

pytest.importorskip("mezo_backend_sglang", reason="the mezo-backend-sglang package is not installed")
from mezo_backend_hf.backend import HFBackend  # noqa: E402
from mezo_backend_hf.generation import generate as hf_generate  # noqa: E402
from mezo_backend_sglang.backend import SGLangBackend  # noqa: E402

NEW = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("sglang-gen-llama"))


@pytest.fixture
def pair(llama):
    """The SGLang backend over FakeEngine and the hf backend, at the same adapter moved
    off the seeded initial one (its B is zero: the adapter would not matter)."""
    sg = SGLangBackend(make_config(llama), engine_factory=FakeEngine)
    hb = HFBackend(make_config(llama))
    for b in (sg, hb):
        b.perturb([(29, 0.5)])
    sg.reset_stats()
    yield sg, hb
    sg.close()


def random_prompts(seed, n=6):
    rng = seeded_random(seed)
    prompts = [tuple(rng.randrange(4, 300) for _ in range(rng.randint(3, 20))) for _ in range(n)]
    return prompts + [prompts[0]]          # a repeated row: one request


def test_greedy_completions_equal_hf_under_each_adapter(pair):
    sg, hb = pair
    prompts = random_prompts(3)
    got = sg.generate(prompts, NEW)
    assert got == hb.generate(prompts, NEW)
    assert len(set(got)) > 2 and got[0] == got[-1]
    assert sg.engine.calls[-1] == ("generate", len(prompts) - 1)         # the repeated row sent once
    for b in (sg, hb):                                                   # another adapter version
        b.perturb([(30, 1.0)])
    moved = sg.generate(prompts, NEW)
    assert moved == hb.generate(prompts, NEW) and moved != got
    assert sg.generate(prompts, 0) == [()] * len(prompts) and sg.generate([], NEW) == []


def test_the_stopping_rule_is_the_hf_backends(pair, monkeypatch):
    """SGLang stops at the model's other EOS ids too; the backend generates those rows
    again without stops, so completions end only at the tokenizer's EOS, as in hf."""
    sg, hb = pair
    prompts = random_prompts(4)
    free = hb.generate(prompts, NEW)
    other = commonest_inner_token(free)                    # a token generated mid-row: another EOS id
    sg.engine.eos_token_ids = {other}
    calls = len(sg.engine.calls)
    assert sg.generate(prompts, NEW) == free               # the hf backend goes on past it
    stopped = len({p for p, row in zip(prompts, free) if other in row})
    assert stopped >= 1 and sg.engine.calls[calls:] == [("generate", 6), ("generate", stopped)]
    # with it as the tokenizer's EOS, rows stop before it, as hf's generation stops
    want = hf_generate(hb.model, prompts, NEW, pad_id=hb.forwards.pad_id, eos_id=other, device="cpu")
    monkeypatch.setattr(sg, "tokenizer", SimpleNamespace(eos_token_id=other))
    calls = len(sg.engine.calls)
    got = sg.generate(prompts, NEW)
    assert got == want and all(other not in row for row in got)
    assert any(len(row) < NEW for row in got) and any(len(row) == NEW for row in got)
    assert sg.engine.calls[calls:] == [("generate", 6)]    # stopped at the tokenizer's EOS: nothing again


@pytest.mark.parametrize("samples", [1, 3])
def test_both_signs_in_one_call_give_the_sequential_completions(pair, monkeypatch, samples):
    """In place with paired signs: theta + eps z (the state) and theta - eps z (the
    minus slot) generate in one engine call, the completions of the plain sequence."""
    sg, _ = pair
    rewarder, batch = recorded_rows(random_prompts(5, n=4), 6, samples, first_seed=100)
    calls = count_calls(monkeypatch, sg, "_engine_call")
    eps, seed = 0.5, 77
    with pytest.warns(UserWarning, match="enable_deterministic_inference") if samples > 1 else _nothing():
        lp, lm, offset = one_direction(sg, batch, seed, eps)
    paired = list(rewarder.reward.seen)
    distinct = len({p.prompt_ids for p in batch})
    # greedy: one call, a request per (sign, prompt); sampled: the prompts' KV first, then a request per
    # (sign, row, sample) -- the repeated prompt has its own sample seed
    assert calls == ([2 * distinct] if samples == 1 else [2 * distinct, 2 * len(batch) * samples])
    sg.perturb([(seed, -offset)])
    rewarder.reward.seen.clear()
    monkeypatch.setattr(sg, "paired", False)
    with pytest.warns(UserWarning) if samples > 1 else _nothing():
        sp, sm, soffset = one_direction(sg, batch, seed, eps)
    sg.perturb([(seed, -soffset)])
    assert rewarder.reward.seen == paired
    assert torch.equal(sp, lp) and torch.equal(sm, lm)
    assert paired[:len(paired) // 2] != paired[len(paired) // 2:]   # the two signs generate differently


def test_every_state_of_a_reward_step_in_one_call(llama, monkeypatch):
    """mezo.q = 3, greedy: the completions of all six states theta +/- eps z(seed_j)
    come from one engine call through the pinned slots, and are the hf backend's of
    the plain sequence (each state in turn), so the rewards are too."""
    from mezo_core.forwards import each_direction
    sg = SGLangBackend(make_config(llama, **{"mezo.q": 3}), engine_factory=FakeEngine)
    hb = HFBackend(make_config(llama, **{"mezo.q": 3}))
    try:
        for b in (sg, hb):
            b.perturb([(29, 0.5)])
        rewarder, batch = recorded_rows(random_prompts(8, n=4), 6)
        seeds, eps = [301, 302, 303], 0.5
        calls = count_calls(monkeypatch, sg, "_engine_call", lambda ids, names, **kw: sorted(set(names)))
        pairs, offset = sg.population_losses(batch, seeds, eps)
        assert offset == 0.0 and len(calls) == 1
        assert calls[0] == ["mezo-minus"] + [f"mezo-s{k}" for k in range(2, 7)]   # slots 1..6, not the state
        seen = list(rewarder.reward.seen)
        rewarder.reward.seen.clear()
        want, hoffset = each_direction(hb, batch, seeds, eps)
        hb.perturb([(seeds[-1], -hoffset)])
        assert sorted(seen) == sorted(rewarder.reward.seen) and len(set(seen)) > 4
        for (lp, lm), (hp, hm) in zip(pairs, want):
            assert torch.equal(lp, hp) and torch.equal(lm, hm)
        assert any(not torch.equal(lp, lm) for lp, lm in pairs)    # the signs generate differently
    finally:
        sg.close()


def test_samples_read_their_prompt_from_the_radix_cache(pair):
    """task.samples = 8: the distinct prompts are prefilled first, so every sample's
    prompt (less the one token SGLang always computes) comes from the cache."""
    sg, _ = pair
    sg.engine_kwargs["enable_deterministic_inference"] = True          # seeded sampling: no warning
    prompts = random_prompts(6, n=4)[:4]
    rows = [p for p in prompts for _ in range(8)]
    seeds = list(range(len(rows)))
    sg.reset_stats()
    got = sg.generate(rows, 4, temperature=1.0, seeds=seeds)
    s = sg.stats()
    prompt_tokens = sum(map(len, prompts))
    print(f"\n4 prompts x 8 samples: {s.requests} requests, token reuse {s.token_reuse:.3f}")
    assert s.primed_batches == 1 and s.generate_calls == 2 and s.requests == 4 + 32
    assert s.tokens_looked_up == 9 * prompt_tokens
    assert s.tokens_reused == 8 * (prompt_tokens - len(prompts))    # each sample: its prompt less one token
    assert s.token_reuse >= 0.85 * 8 / 9
    # a row's sample is its seed's: the same seeds give the same rows in any order
    assert sg.generate(rows[::-1], 4, temperature=1.0, seeds=seeds[::-1]) == got[::-1]
    assert len(set(got)) > len(prompts)                               # the samples of a prompt differ


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
