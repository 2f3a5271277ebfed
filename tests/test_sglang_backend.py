"""The SGLang backend.

Two groups:
- everywhere (CPU CI): the plugin loads without SGLang, says why it cannot run,
  maps eviction policies, and -- over ``ScriptedEngine``, a stand-in with no
  model that records every request -- sends the right requests (input ids,
  logprob_start_len, adapter slots or versions, loads, unloads, flushes) and
  turns the answers into the right losses; one end-to-end run over
  ``FakeEngine`` (transformers + peft behind SGLang's call shapes) lowers the
  loss. Both stand-ins carry the scheduler side (``FakeScheduler``), so every
  test runs the production transport, ``in_place``, unless it is about another;
- on a CUDA machine with SGLang (``requires_sglang``): the same checks against a
  real ``sglang.Engine`` and the hf backend on the GPU, a short MeZO run, the
  radix cache's cached tokens and the stale-version test. Elsewhere they are
  skipped with the reason.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mezo_core import Backend, Example, MezoError
from mezo_core.mezo import direction_seeds, mezo_step
from mezo_core.forwards import one_direction
from mezo_core.stats import stats_of
from mezo_core.interfaces import restore, snapshot
from sglang_support import FakeEngine, ScriptedEngine, build_llama, examples, make_config, scripted_logprob

# the backend package (backends/sglang): installed by `make test`; a host that installs only
# the core (the GPU host's kernel suite) skips this file rather than failing collection
pytest.importorskip("mezo_backend_sglang", reason="the mezo-backend-sglang package is not installed")
from mezo_backend_sglang.backend import SGLangBackend
from mezo_backend_sglang.options import RADIX_EVICTION, UNSUPPORTED_EVICTION, SGLangOptions, radix_eviction_policy


def _gpu_skip_reason():
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed (no CPU build; these tests run on a CUDA host with SGLang)"
    if not torch.cuda.is_available():
        return "no CUDA device (SGLang runs on NVIDIA GPUs only)"
    return None


def requires_sglang(test):
    """A test of a real sglang.Engine: marked ``gpu``, skipped (with the reason) elsewhere."""
    skip = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("sglang-llama"))


# --------------------------------------------------------------------------------
# everywhere
# --------------------------------------------------------------------------------
def test_plugin_registers_without_sglang():
    from mezo_core.registry import get_registry
    cls = get_registry().get("backends", "sglang")
    assert cls is SGLangBackend
    reason = cls.unavailable_reason()
    if _gpu_skip_reason() is None:      # sglang and a GPU here: the backend can run
        assert reason is None
    else:                               # else it says why, naming what is missing
        assert reason and ("sglang" in reason or "CUDA" in reason)


def test_eviction_policy_mapping():
    from mezo_core.registry import get_registry
    builtin = set(get_registry().items["eviction_policies"])
    assert builtin == set(RADIX_EVICTION) | set(UNSUPPORTED_EVICTION)
    assert radix_eviction_policy("lru") == "lru"
    assert radix_eviction_policy("LFU") == "lfu"
    assert radix_eviction_policy("fifo") == "fifo"
    assert radix_eviction_policy(None) is None
    with pytest.raises(MezoError, match="size.*cannot be honoured"):
        radix_eviction_policy("size")
    with pytest.raises(MezoError, match="no SGLang radix-cache counterpart"):
        radix_eviction_policy("random")


def test_engine_options_from_config(llama):
    cfg = make_config(llama, sglang={"eviction_policy": "fifo", "mem_fraction_static": 0.3,
                                     "engine": {"max_loras_per_batch": 3}})
    b = SGLangBackend(cfg, engine_factory=ScriptedEngine)
    kw = b.engine_kwargs
    assert kw["radix_eviction_policy"] == "fifo" and "eviction_policy" not in kw
    assert kw["mem_fraction_static"] == 0.3 and kw["max_loras_per_batch"] == 3  # top-level keys are engine keys too
    assert kw["enable_lora"] and kw["attention_backend"] == "triton"
    assert kw["max_lora_rank"] == 8 and kw["lora_target_modules"] == ["q_proj", "v_proj"]
    assert b.engine.kwargs == {k: v for k, v in kw.items()}
    b.close()
    assert b.engine is None
    with pytest.raises(MezoError, match="size"):
        SGLangBackend(make_config(llama, sglang={"eviction_policy": "size"}), engine_factory=ScriptedEngine)
    with pytest.raises(MezoError, match="also set"):
        SGLangBackend(make_config(llama, sglang={"eviction_policy": "lfu", "radix_eviction_policy": "lru"}),
                      engine_factory=ScriptedEngine)
    with pytest.raises(MezoError, match="adapter_transport"):
        SGLangOptions(adapter_transport="pigeon")
    with pytest.raises(MezoError, match="sglang.prime_min_tokens"):
        SGLangOptions(prime_min_tokens="many")


@pytest.mark.skipif(_gpu_skip_reason() is None, reason="checks the message shown where SGLang is absent")
def test_real_engine_refused_here(llama):
    with pytest.raises(MezoError, match="backend sglang"):
        SGLangBackend(make_config(llama))


@pytest.fixture
def scripted(llama, request):
    """A backend over ScriptedEngine with the default options -- the production
    transport, in_place -- or those of an indirect parameter."""
    sg = SGLangBackend(make_config(llama, sglang=getattr(request, "param", None)), engine_factory=ScriptedEngine)
    yield sg
    engine = sg.engine
    sg.close()
    assert engine.shut


def weight(sg):
    """The sum of the backend's adapter tensors: what ScriptedEngine's answers depend on."""
    return float(sum(t.double().sum() for t in sg.state_dict().values()))


def expected_losses(sg, batch):
    """Mean -log p of each example's targets, from the engine's script (not from its answers)."""
    w = weight(sg)
    return torch.tensor([-sum(scripted_logprob(t, len(e.prompt_ids) + j, w) for j, t in enumerate(e.target_ids))
                         / len(e.target_ids) for e in batch], dtype=torch.float64)


@pytest.mark.parametrize("scripted", [{"adapter_transport": "tensors"}], indirect=True)
def test_requests_losses_and_adapter_versions(scripted):
    """The versioned transports: a new adapter version per change of the state."""
    sg, engine = scripted, scripted.engine
    batch = examples(4, 6, 3, seed=1)
    torch.testing.assert_close(sg.losses(batch), expected_losses(sg, batch), rtol=0, atol=1e-12)
    assert engine.calls == [("load", "mezo-v0"), ("generate", 4)]
    for req, e in zip(engine.requests, batch):   # the whole sequence, logprobs from the last prompt token
        assert req["input_ids"] == list(e.prompt_ids + e.target_ids)
        assert req["logprob_start_len"] == len(e.prompt_ids) - 1 and req["lora_path"] == "mezo-v0"
        assert req["sampling_params"] == {"max_new_tokens": 1, "temperature": 0.0} and req["return_logprob"]
    loaded = engine.loaded["mezo-v0"]   # the engine got the backend's state itself
    assert sorted(loaded) == sg.trainable_names()
    assert all(torch.equal(loaded[n], t.cpu()) for n, t in sg.state_dict().items())
    sg.losses(batch)  # unchanged state: no new version
    assert engine.calls[-2:] == [("generate", 4), ("generate", 4)] and len(engine.calls) == 3
    for version, terms in enumerate(([(11, 0.5)], [(12, -0.3), (13, 0.2)]), start=1):
        sg.perturb(terms)
        n = len(engine.calls)
        torch.testing.assert_close(sg.losses(batch), expected_losses(sg, batch), rtol=0, atol=1e-12)
        # the new version is loaded before the old one goes; every request names the new one
        assert engine.calls[n:] == [("load", f"mezo-v{version}"), ("unload", f"mezo-v{version - 1}"),
                                    ("generate", 4)]
        assert {r["lora_path"] for r in engine.requests[-4:]} == {f"mezo-v{version}"}
    assert list(engine.adapters) == [sg.adapter_name] == ["mezo-v2"]
    stats = sg.stats()
    assert (stats.adapter_loads, stats.adapter_unloads, stats.adapter_version) == (3, 2, 2)
    assert stats.requests == stats.lookups == 16 and stats.generate_calls == 4
    assert stats.tokens_looked_up == 4 * sum(e.num_tokens for e in batch) and stats.target_tokens == 4 * 12


def test_choice_requests(scripted):
    sg, engine = scripted, scripted.engine
    sg.perturb([(5, 0.5)])
    prompts = [e.prompt_ids for e in examples(3, 5, 1, seed=2)]
    single = [(7,), (9,), (40,)]
    w = weight(sg)
    want = torch.tensor([[-scripted_logprob(c[0], len(p), w) for c in single] for p in prompts], dtype=torch.float64)
    torch.testing.assert_close(sg.choice_losses(prompts, single), want, rtol=0, atol=1e-12)
    # single-token choices: one request per prompt, the choices' logprobs at its first output position
    assert [r["input_ids"] for r in engine.requests] == [list(p) for p in prompts]
    assert [r["logprob_start_len"] for r in engine.requests] == [len(p) - 1 for p in prompts]
    assert all(r["token_ids_logprob"] == [7, 9, 40] for r in engine.requests)
    # multi-token choices: one request per (prompt, choice)
    multi = [(7, 8), (9,)]
    engine.requests.clear()
    got = sg.choice_losses(prompts, multi)
    assert [r["input_ids"] for r in engine.requests] == [list(p + c) for p in prompts for c in multi]
    batch = [Example(p, c) for p in prompts for c in multi]
    torch.testing.assert_close(got, expected_losses(sg, batch).view(3, 2), rtol=0, atol=1e-12)


def test_primes_shared_prefix(scripted):
    """A batch with a long common prefix sends one request first, so that the
    rest find the prefix in the radix cache; same losses."""
    sg, engine = scripted, scripted.engine
    prefix = tuple(range(10, 50))
    batch = examples(4, 5, 2, seed=6, shared_prefix=prefix)
    assert sg.prime_min_tokens == 0   # off by default
    assert SGLangBackend.shared_prefix_len([list(e.prompt_ids + e.target_ids) for e in batch],
                                           [len(e.prompt_ids) - 1 for e in batch]) >= len(prefix)
    sg.prime_min_tokens = 32
    primed = sg.losses(batch)
    assert [c for c in engine.calls if c[0] == "generate"] == [("generate", 1), ("generate", 3)]
    assert sg.stats().primed_batches == 1 and sg.stats().generate_calls == 2
    torch.testing.assert_close(primed, expected_losses(sg, batch), rtol=0, atol=1e-12)
    sg.prime_min_tokens = 0
    sg.reset_stats()
    torch.testing.assert_close(sg.losses(batch), primed, rtol=0, atol=0)
    assert engine.calls[-1] == ("generate", 4) and sg.stats().generate_calls == 1


def test_reset_cache_flushes_and_reset_stats_zeroes(scripted):
    sg, engine = scripted, scripted.engine
    sg.losses(examples(2, 5, 1, seed=8))
    sg.reset_cache()
    assert engine.calls[-1] == ("flush",)
    sg.reset_stats()
    stats = sg.stats()
    assert stats.requests == stats.lookups == stats.adapter_loads == 0 and stats.generate_s == 0.0
    assert stats.adapter_version == 0 and stats.hit_rate == 0.0   # a gauge keeps its value


def save_change_load(sg, tmp_path, atol):
    """Save a perturbed state, move away from it, load it back: its losses return."""
    batch = examples(2, 5, 2, seed=4)
    sg.perturb([(3, 0.7)])
    saved = sg.losses(batch)
    sg.save_adapter(tmp_path / "a")
    sg.perturb([(4, 0.7)])
    assert (sg.losses(batch) - saved).abs().max() > 1e-4
    sg.load_adapter(tmp_path / "a")
    torch.testing.assert_close(sg.losses(batch), saved, rtol=0, atol=atol)


@pytest.mark.parametrize("scripted", [{"adapter_transport": "disk"}], indirect=True)
def test_save_load_and_disk_transport(scripted, tmp_path):
    save_change_load(scripted, tmp_path, atol=1e-12)
    # three versions went to the engine as folders (v0, v1, the loaded v2); the unloaded ones' are gone
    assert sorted(p.name for p in Path(scripted._tmp).iterdir()) == ["mezo-v2"]


def loss_before_and_after_mezo(sg, batch, steps, run_seed, eps, lr):
    """Mean loss of ``batch`` before and after ``steps`` MeZO steps on it."""
    first = float(sg.losses(batch).mean())
    for step in range(steps):
        mezo_step(sg, batch, direction_seeds(run_seed, step, 1), eps=eps, lr=lr)
    return first, float(sg.losses(batch).mean())


def test_fake_engine_mezo_lowers_loss(llama):
    """End to end over FakeEngine (transformers + peft under SGLang's call shapes),
    with the production transport: seeds to the scheduler, both signs from its slots."""
    sg = SGLangBackend(make_config(llama), engine_factory=FakeEngine)
    first, last = loss_before_and_after_mezo(sg, examples(4, 6, 2, seed=5), 12, 0, 1e-3, 5e-3)
    assert last < first - 0.2, (first, last)
    assert sg.transport == "in_place" and sg.engine.calls.count(("rpc", "mezo_fill_slots")) == 12
    assert [c for c in sg.engine.calls if c[0] == "load_tensors"] == [("load_tensors", "mezo"),
                                                                     ("load_tensors", "mezo-minus")]
    sg.close()


# --------------------------------------------------------------------------------
# in_place: seeds to the scheduler, slots written there (worker.py over FakeScheduler)
# --------------------------------------------------------------------------------
@pytest.mark.parametrize("modules", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("gate_proj", "up_proj", "down_proj"), ("gate_proj", "o_proj")])
def test_slot_views_place_tensors_like_sglang(modules):
    """Every PEFT tensor's view of a slot holds exactly that tensor after SGLang's
    load (oracle: ``sglang_stacked``'s concatenation, not the views' offsets), and
    writing through the views into an empty slot rebuilds SGLang's slot bit for bit."""
    from sglang_support import FakeLoraManager
    from mezo_backend_sglang.worker import slot_views
    hidden, q_out, kv_out, inter, r, max_r = 12, 12, 4, 20, 3, 8
    out_in = {"q_proj": (q_out, hidden), "k_proj": (kv_out, hidden), "v_proj": (kv_out, hidden),
              "o_proj": (hidden, q_out), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    shapes = {}
    for layer in (0, 2):
        for m in modules:
            kind = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            base = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            shapes[f"{base}.lora_A.weight"] = (r, out_in[m][1])
            shapes[f"{base}.lora_B.weight"] = (out_in[m][0], r)
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    mgr = FakeLoraManager(shapes, max_r, slots=3)
    mgr.load("x", tensors)
    uid = next(iter(mgr.lora_refs))
    mgr.fetch_new_loras({uid})
    pool, names = mgr.memory_pool, sorted(shapes)
    slot = pool.uid_to_buffer_id[uid]
    views = slot_views(names, [shapes[n] for n in names], pool.A_buffer, pool.B_buffer, slot)
    for name, view in zip(names, views):
        assert torch.equal(view, tensors[name]), name
    empty = 2 if slot != 2 else 1
    for view, name in zip(slot_views(names, [shapes[n] for n in names], pool.A_buffer, pool.B_buffer, empty),
                          names):
        view.copy_(tensors[name])
    compared = [layer for bufs in (pool.A_buffer, pool.B_buffer) for layers in bufs.values()
                for layer in layers if layer is not None]
    assert compared    # the copy reached real buffers, and each now equals the loaded slot
    for layer in compared:
        assert torch.equal(layer[empty], layer[slot])


def test_slot_views_refuse_what_they_cannot_place():
    from mezo_backend_sglang.worker import slot_views
    with pytest.raises(ValueError, match="cannot place"):
        slot_views(["base_model.model.lm_head.lora_A.weight"], [(2, 4)], {}, {}, 0)
    a = {"qkv_proj": [torch.zeros(2, 6, 4)]}
    b = {"qkv_proj": [torch.zeros(2, 8, 2)]}
    with pytest.raises(ValueError, match="shape"):  # rank 3 does not fit a max rank of 2
        slot_views(["m.layers.0.self_attn.q_proj.lora_B.weight"], [(4, 3)], a, b, 0)
    with pytest.raises(ValueError, match="no LoRA buffer for 'o_proj'"):
        slot_views(["m.layers.0.self_attn.o_proj.lora_A.weight"], [(2, 4)], a, b, 0)


def worker_state(sg, tmp_path):
    from safetensors.torch import load_file
    sg._rpc("mezo_save", path=str(tmp_path / "worker.safetensors"))
    return load_file(str(tmp_path / "worker.safetensors"))


def test_in_place_sends_seeds_not_tensors(scripted, tmp_path):
    sg, engine = scripted, scripted.engine
    assert SGLangOptions().adapter_transport == "auto" and sg.transport == "in_place" and sg.paired
    # start: two pinned adapters from one folder, handed to the scheduler; 3 slots (plus, minus, base)
    assert engine.calls == [("load", "mezo"), ("load", "mezo-minus"), ("rpc", "mezo_attach"), ("flush",)]
    assert engine.kwargs["max_loras_per_batch"] == 3
    batch = examples(4, 6, 3, seed=1)
    torch.testing.assert_close(sg.losses(batch), expected_losses(sg, batch), rtol=0, atol=1e-9)
    n = len(engine.calls)
    sg.perturb([(11, 0.5)])
    sg.perturb([(12, -0.3), (13, 0.2)], decay=0.9)
    # one round trip per change, each flushing the radix cache; no adapter is loaded again
    assert engine.calls[n:] == [("rpc", "mezo_perturb"), ("flush",)] * 2
    torch.testing.assert_close(sg.losses(batch), expected_losses(sg, batch), rtol=0, atol=1e-9)
    assert {r["lora_path"] for r in engine.requests} == {"mezo"}
    # the scheduler's state is the driver's, bit for bit (same z on the same device type)
    mine = worker_state(sg, tmp_path)
    assert sorted(mine) == sg.trainable_names()
    assert all(torch.equal(mine[n], t.cpu()) for n, t in sg.state_dict().items())
    stats = sg.stats()
    assert stats.adapter_loads == 0 and stats.adapter_writes == 3 and stats.adapter_version == 2


def test_in_place_paired_signs_one_call(scripted, tmp_path):
    """Both signs in one generate call (rows 0..B-1 on the plus slot, B..2B-1 on the
    minus slot), with the losses of theta +- eps z computed here from z itself."""
    from mezo_core.perturb import z_like
    sg, engine = scripted, scripted.engine
    batch = examples(3, 5, 2, seed=3)
    theta = {n: t.clone() for n, t in sg.state_dict().items()}
    engine.requests.clear()
    n = len(engine.calls)
    plus, minus, offset = one_direction(sg, batch, 21, 0.25)
    assert offset == 0.25
    assert engine.calls[n:] == [("rpc", "mezo_perturb"), ("flush",), ("rpc", "mezo_fill_slots"), ("flush",),
                                ("generate", 6)]
    assert [r["lora_path"] for r in engine.requests] == ["mezo"] * 3 + ["mezo-minus"] * 3
    names = sg.trainable_names()
    for sign, got in ((1.0, plus), (-1.0, minus)):
        w = float(sum((theta[n].double() + sign * 0.25 * z_like(theta[n], 21, i).double()).sum()
                      for i, n in enumerate(names)))
        want = torch.tensor([-sum(scripted_logprob(t, len(e.prompt_ids) + j, w) for j, t in enumerate(e.target_ids))
                             / len(e.target_ids) for e in batch], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # choices ride along: one request per (prompt, slot)
    engine.requests.clear()
    prompts = [e.prompt_ids for e in batch]
    got = sg.choice_losses(prompts + prompts, [(7,), (9,)], adapters=[0, 0, 0, 1, 1, 1])
    assert [r["lora_path"] for r in engine.requests] == ["mezo"] * 3 + ["mezo-minus"] * 3
    torch.testing.assert_close(got[:3], sg.choice_losses(prompts, [(7,), (9,)]), rtol=0, atol=0)


def test_in_place_every_state_of_a_step_in_one_call(llama):
    """mezo.q = 3: the six states theta +/- eps z(seed_j) go to 2q pinned slots in one
    scheduler round trip and one generate call, and give the hf backend's losses of
    the plain sequence (FakeEngine serves each adapter from its memory-pool slot);
    theta is left (offset 0, ``applied`` taken off first). The one-sided states of
    fzoo/es likewise, leaving +eps z(last seed) as the sequential loop does."""
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.forwards import each_direction, one_sided
    sg = SGLangBackend(make_config(llama, **{"mezo.q": 3}), engine_factory=FakeEngine)
    hb = HFBackend(make_config(llama, **{"mezo.q": 3}))
    engine = sg.engine
    try:
        assert sg.side_by_side == 6 and engine.kwargs["max_loras_per_batch"] == 8
        for b in (sg, hb):
            b.perturb([(62, 0.5)])
        batch, seeds, eps = examples(5, 6, 2, seed=4), [201, 202, 203], 1e-2
        sg.perturb([(seeds[0], 0.25)])      # the previous update left 0.25 z(seeds[0]) on the weights
        n = len(engine.calls)
        pairs, offset = sg.population_losses(batch, seeds, eps, applied=0.25)
        assert offset == 0.0
        assert engine.calls[n:] == [("rpc", "mezo_perturb"), ("rpc", "mezo_fill_slots"), ("generate", 30)]
        want, hoffset = each_direction(hb, batch, seeds, eps)
        hb.perturb([(seeds[-1], -hoffset)])
        for (lp, lm), (hp, hm) in zip(pairs, want):
            # fp32: theta +/- eps z filled in one sum vs the sequence's moves differ in the last bits
            torch.testing.assert_close(lp, hp, rtol=0, atol=5e-5)
            torch.testing.assert_close(lm, hm, rtol=0, atol=5e-5)
            assert (lp - lm).abs().max().item() > 1e-3
        for t, h in zip(sg.trainable_tensors(), hb.trainable_tensors()):
            torch.testing.assert_close(t, h.detach(), rtol=0, atol=1e-6)
        n = len(engine.calls)
        got = one_sided(sg, batch, seeds, eps)
        assert [c for c in engine.calls[n:] if c[0] == "generate"] == [("generate", 15)]
        for g, w in zip(got, one_sided(hb, batch, seeds, eps)):
            torch.testing.assert_close(g, w, rtol=0, atol=5e-5)
        for t, h in zip(sg.trainable_tensors(), hb.trainable_tensors()):
            torch.testing.assert_close(t, h.detach(), rtol=0, atol=1e-6)
        # one direction keeps the paired path; more states than slots are refused
        plus, minus, offset = one_direction(sg, batch, 77, eps)
        assert offset == eps
        with pytest.raises(ValueError, match="slots"):
            sg.state_losses(batch, [[(1, eps)]] * 7)
        with pytest.raises(ValueError, match="adapter slots"):
            sg.losses(batch[:1], adapters=[7])
    finally:
        sg.close()


def test_in_place_training_matches_versioned_loads(llama, tmp_path):
    """MeZO steps with seeds sent to the scheduler (paired signs) and with a new
    adapter version per change (the sequential path) give the same losses and
    the same trained state; the scheduler's state stays the driver's."""
    runs = {}
    for transport in ("in_place", "tensors"):
        sg = SGLangBackend(make_config(llama, sglang={"adapter_transport": transport}),
                           engine_factory=ScriptedEngine)
        batch = examples(4, 5, 2, seed=9)
        results = [mezo_step(sg, batch, direction_seeds(3, step, 1), eps=1e-2, lr=1e-3) for step in range(4)]
        losses = [(r.loss_plus, r.loss_minus, r.grads[0]) for r in results]
        runs[transport] = (losses, sg.state_dict(), worker_state(sg, tmp_path) if transport == "in_place" else None)
        sg.close()
    (got, state, worker), (want, ref, _) = runs["in_place"], runs["tensors"]
    # fp32 state: theta+eps z-2 eps z vs theta-eps z differ in the last bits; g = dL/(2 eps) magnifies them 50x
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    assert all(abs(g) > 1e-3 for *_, g in want)  # the steps moved the state
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6)
        assert torch.equal(worker[name], tensor.cpu())


def test_in_place_load_and_restore_reach_the_scheduler(scripted, tmp_path):
    sg = scripted
    snap = snapshot(sg)
    save_change_load(sg, tmp_path, atol=1e-9)
    restore(sg, snap)
    mine = worker_state(sg, tmp_path)
    assert all(torch.equal(mine[n], snap[n]) for n in snap)


def test_in_place_without_the_plugin_says_how_to_fix(llama):
    class Bare(ScriptedEngine):
        def collective_rpc(self, method, **kwargs):
            raise AssertionError(f"'Scheduler' object has no attribute '{method}'")
    with pytest.raises(MezoError, match="sglang.srt.plugins.*adapter_transport=bucket"):
        SGLangBackend(make_config(llama, sglang={"adapter_transport": "in_place"}), engine_factory=Bare)


def test_sglang_plugin_entry_point_is_declared():
    """SGLang finds the worker through this entry point (pyproject and installed metadata)."""
    import tomllib
    from importlib.metadata import entry_points
    meta = tomllib.loads((Path(__file__).parents[1] / "backends/sglang/pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["sglang.srt.plugins"] == {"mezo": "mezo_backend_sglang.worker:register"}
    found = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert found.get("mezo") == "mezo_backend_sglang.worker:register"


# --------------------------------------------------------------------------------
# on a CUDA machine with SGLang
# --------------------------------------------------------------------------------
GPU_OPTIONS = {"mem_fraction_static": 0.3, "log_level": "error"}


@pytest.fixture(scope="module")
def gpu(llama):
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    from mezo_backend_hf.backend import HFBackend
    cfg = make_config(llama, device="cuda", dtype="bfloat16", sglang=GPU_OPTIONS)
    sg = SGLangBackend(cfg)
    hf32 = HFBackend(make_config(llama, device="cuda", dtype="float32"))
    yield sg, hf32
    sg.close()
    hf32.close()


def _restore(sg, hf, seed, coef):
    sg.perturb([(seed, -coef)])
    hf.perturb([(seed, -coef)])


@requires_sglang
def test_gpu_losses_agree_with_hf(gpu):
    sg, hf = gpu
    batch = examples(8, 24, 6, seed=11)
    # initial adapter (B = 0) and a perturbed one that moves the losses
    torch.testing.assert_close(sg.losses(batch), hf.losses(batch), rtol=0, atol=0.08)
    sg.perturb([(77, 0.05)])
    hf.perturb([(77, 0.05)])
    try:
        torch.testing.assert_close(sg.losses(batch), hf.losses(batch), rtol=0, atol=0.08)
    finally:
        _restore(sg, hf, 77, 0.05)
    torch.testing.assert_close(sg.losses(batch), hf.losses(batch), rtol=0, atol=0.08)


@requires_sglang
def test_gpu_lora_moves_losses_like_hf(gpu):
    """The adapter's effect, not just the base model: the change of the losses
    under a perturbation agrees between the engines."""
    sg, hf = gpu
    batch = examples(8, 24, 6, seed=12)
    s0, h0 = sg.losses(batch), hf.losses(batch)
    sg.perturb([(78, 0.05)])
    hf.perturb([(78, 0.05)])
    try:
        ds, dh = sg.losses(batch) - s0, hf.losses(batch) - h0
    finally:
        _restore(sg, hf, 78, 0.05)
    assert dh.abs().mean() > 0.05, "perturbation too small to test anything"
    assert (ds - dh).abs().max() < 0.05 + 0.1 * dh.abs().max(), (ds, dh)


@requires_sglang
def test_gpu_choice_losses_single_token(gpu):
    sg, hf = gpu
    prompts = [e.prompt_ids for e in examples(6, 20, 1, seed=13)]
    choices = [(20,), (33,), (250,)]
    fast = sg.choice_losses(prompts, choices)
    slow = Backend.choice_losses(sg, prompts, choices)  # generic path
    torch.testing.assert_close(fast, slow, rtol=0, atol=0.06)
    # single-token log-probs (no averaging over tokens) in bf16: within 0.1 nats
    torch.testing.assert_close(fast, hf.choice_losses(prompts, choices), rtol=0, atol=0.1)


@requires_sglang
def test_gpu_shared_prefix_is_cached(gpu):
    sg, _ = gpu
    prefix = tuple(examples(1, 200, 1, seed=14)[0].prompt_ids)
    batch = examples(8, 8, 2, seed=15, shared_prefix=prefix)
    sg.prime_min_tokens = 0                # one call per batch
    try:
        sg.losses(batch)                   # loads the state if needed
        sg.reset_cache()
        sg.reset_stats()
        plain = sg.losses(batch)
        sg.reset_stats()
        sg.losses(batch)                   # same adapter version: the prefix is in the radix tree
        stats = stats_of(sg)
        assert stats["tokens_reused"] >= 8 * len(prefix), stats
        assert stats["hit_rate"] == 1.0 and stats["token_reuse"] > 0.8
    finally:
        sg.prime_min_tokens = 32
    # priming: after a flush, one request goes first and the other 7 reuse its prefix
    sg.reset_cache()
    sg.reset_stats()
    primed = sg.losses(batch)
    stats = stats_of(sg)
    assert stats["primed_batches"] == 1 and stats["tokens_reused"] >= 7 * len(prefix), stats
    torch.testing.assert_close(primed, plain, rtol=0, atol=0.03)
    sg.prime_min_tokens = 0


@requires_sglang
def test_gpu_no_stale_prefix_after_change(gpu, tmp_path):
    """Loss after a change equals a freshly loaded adapter's (computed with no
    cache reuse at all), and no prefix of the old version was reused."""
    sg, _ = gpu
    prefix = tuple(examples(1, 150, 1, seed=16)[0].prompt_ids)
    batch = examples(6, 6, 3, seed=17, shared_prefix=prefix)
    before = sg.losses(batch)
    sg.losses(batch)                      # the old version's prefix is cached now
    sg.perturb([(79, 1.0)])
    sg.reset_stats()
    after = sg.losses(batch)
    first_cached = sg.stats().tokens_reused
    assert (after - before).abs().max() > 0.05
    sg.save_adapter(tmp_path / "fresh")
    from mezo_backend_sglang.backend import losses_under_folder
    fresh, outs = losses_under_folder(sg.engine, tmp_path / "fresh", batch)
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0.02)
    # the new version may reuse only what its own batch computed, never the old prefix
    assert first_cached <= (len(batch) - 1) * (len(prefix) + 6)
    sg.perturb([(79, -1.0)])


@requires_sglang
def test_gpu_mezo_run_lowers_loss(gpu):
    sg, _ = gpu
    first, last = loss_before_and_after_mezo(sg, examples(16, 16, 4, seed=18), 40, 1, 1e-2, 5e-3)
    assert last < first - 0.05, (first, last)


@requires_sglang
def test_gpu_in_place_slots_equal_sglangs_own_load(gpu, tmp_path):
    """The slots the scheduler writes from seeds equal, bit for bit, SGLang's own
    load of the same tensors from a PEFT folder; its state is the driver's."""
    from safetensors.torch import load_file

    from mezo_core.adapter import write_peft_adapter
    from mezo_core.perturb import apply_z
    sg, _ = gpu
    assert sg.in_place and sg.paired
    sg.perturb([(80, 0.3)])                       # B != 0: every tensor matters
    one_direction(sg, examples(4, 10, 3, seed=19), 81, 0.05)  # plus: theta + eps z, minus: theta - eps z
    names = sg.trainable_names()
    minus = [t.clone() for t in sg.trainable_tensors()]
    apply_z(minus, [(81, -0.1)], dist=sg.z_dist)  # the scheduler's arithmetic, here
    try:
        for role, state in (("plus", sg.state_dict()), ("minus", dict(zip(names, minus)))):
            write_peft_adapter(state, sg.lora, sg.model_dir, tmp_path / role)
            SGLangBackend._check(sg.engine.load_lora_adapter(f"ref-{role}", str(tmp_path / role)), "ref")
            try:
                sg._rpc("mezo_compare_slot", role=role, reference=f"ref-{role}")
            finally:
                sg.engine.unload_lora_adapter(f"ref-{role}")
        sg._rpc("mezo_save", path=str(tmp_path / "worker.safetensors"))
        worker = load_file(str(tmp_path / "worker.safetensors"))
        assert all(torch.equal(worker[n], t.cpu()) for n, t in sg.state_dict().items())
    finally:
        sg.perturb([(81, -0.05), (80, -0.3)])


@requires_sglang
def test_gpu_paired_signs_match_the_sequence(gpu):
    """Both signs in one generate call give the losses of the plain sequence
    (two calls, one state each), to bf16 batch-composition noise."""
    sg, _ = gpu
    batch = examples(8, 16, 4, seed=20)
    paired = one_direction(sg, batch, 82, 0.5)
    sg.perturb([(82, -0.5)])
    sg.paired = False
    try:
        plain = one_direction(sg, batch, 82, 0.5)
    finally:
        sg.paired = True
    sg.perturb([(82, 0.5)])
    assert (paired[2], plain[2]) == (0.5, -0.5)
    assert (plain[0] - plain[1]).abs().max() > 0.1, "perturbation too small to test anything"
    for got, want in zip(paired[:2], plain[:2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0.03)


@requires_sglang
def test_gpu_generate_agrees_with_hf_and_samples_reuse_their_prompt(gpu, tmp_path):
    """Greedy completions of the bf16 engine against fp32 hf under the same adapter (the
    engine's, trained by the tests before): the first token agrees wherever hf's top two
    logits are 0.3 apart (bf16 noise cannot flip those); with 8 samples per prompt, the
    engine reports its radix cache serving each sample's prompt."""
    sg, hf = gpu
    sg.save_adapter(tmp_path / "state")
    hf.load_adapter(tmp_path / "state")
    prompts = [e.prompt_ids for e in examples(8, 32, 1, seed=21)]
    got, want = sg.generate(prompts, 8), hf.generate(prompts, 8)
    with torch.no_grad():
        logits = hf.model(input_ids=torch.tensor(prompts, device="cuda")).logits[:, -1].float()
    top = logits.topk(2).values
    clear = [i for i in range(len(prompts)) if float(top[i, 0] - top[i, 1]) > 0.3]
    print(f"\ngreedy rows equal to hf's: {sum(g == w for g, w in zip(got, want))} of {len(prompts)}; "
          f"first tokens with a clear margin: {len(clear)}")
    assert clear and all(got[i][:1] == want[i][:1] for i in clear)
    sg.reset_cache()
    sg.reset_stats()
    rows = [p for p in prompts for _ in range(8)]
    sampled = sg.generate(rows, 8, temperature=1.0, seeds=list(range(len(rows))))
    s = sg.stats()
    print(f"8 samples of 8 prompts of 32 tokens: token reuse {s.token_reuse:.3f}, {s.generate_calls} calls")
    assert len(sampled) == 64 and s.primed_batches == 1 and s.token_reuse >= 0.8
