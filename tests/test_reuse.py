"""The frozen-trunk cache against the plain computation, on fresh random inputs."""
import gc

import pytest
import torch

from mezo_core import Example
from mezo_core.config import load_config
from mezo_core.registry import get_registry
from mezo_core.forwards import one_direction
from mezo_core.stats import stats_of
from mezo_backend_hf.backend import HFBackend
from mezo_backend_hf.trunk import RadixCache
from tiny import seeded

TOL = 1e-5  # fp32 on CPU: batched layouts differ only in reduction order


def plain_backend(model_dir, arch, extra=()):
    """The oracle: no trunk cache, no trimmed last layer, no prefix sharing."""
    return backend(model_dir, arch, False, extra=["hf.trim_last_layer=false", *extra])


def backend(model_dir, arch, cache, layers="[2,3]", extra=()):
    mods = "[q_proj,v_proj]" if arch == "llama" else "[c_attn]"
    return HFBackend(load_config(None, [f"model.path={model_dir}", f"lora.layers={layers}",
                                        f"lora.target_modules={mods}", f"hf.trunk_cache={cache}", *extra]))


def random_batch(gen, n=6, shared_prefix=4, longest_body=8, short=0):
    """``n`` rows of random token ids: a ``shared_prefix``-token prefix, a body of 1 to
    ``longest_body`` tokens, a target of 1 or 2; the last ``short`` rows keep only the
    prefix's first 3 tokens (too few for a prefix group of 4)."""
    prefix = torch.randint(4, 250, (shared_prefix,), generator=gen).tolist()
    batch = []
    for k in range(n):
        body = torch.randint(4, 250, (int(torch.randint(1, longest_body + 1, (1,), generator=gen)),),
                             generator=gen).tolist()
        target = torch.randint(4, 250, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen).tolist()
        head = prefix if k < n - short else prefix[:3]
        batch.append(Example(tuple(head + body), tuple(target)))
    return batch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_losses_equal_uncached(arch, tiny_llama, tiny_gpt2):
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    plain, cached = plain_backend(model_dir, arch), backend(model_dir, arch, True)
    assert plain.trunk is None and cached.trunk.k0 == 2
    gen = torch.Generator().manual_seed(7)
    batches = [random_batch(gen) for _ in range(2)]
    for step in range(4):  # the adapter moves every step; trunk entries stay valid
        for b in (plain, cached):
            b.perturb([(step, 0.3)])
        for batch in batches:
            assert torch.allclose(plain.losses(batch), cached.losses(batch), atol=TOL, rtol=0)
            prompts = [e.prompt_ids for e in batch]
            assert torch.allclose(plain.choice_losses(prompts, [(5,), (9,)]),
                                  cached.choice_losses(prompts, [(5,), (9,)]), atol=TOL, rtol=0)
    stats = stats_of(cached)
    assert stats["hits"] > 0 and stats["invalidations"] == 0 and stats["layers_skipped"] == 2
    assert 0 < stats["token_reuse"] <= 1


def test_no_stale_hit_after_trunk_weights_change(tiny_llama):
    plain, cached = plain_backend(tiny_llama, "llama"), backend(tiny_llama, "llama", True)
    batch = random_batch(torch.Generator().manual_seed(3))
    cached.losses(batch)  # fill the cache
    assert cached.losses(batch).shape == (len(batch),) and stats_of(cached)["hits"] == len(batch)
    # change a weight BELOW k0 in place (as a mis-configured perturbation would)
    for b in (plain, cached):
        layer0 = b.trunk.layers[0] if b.trunk else b.model.base_model.model.model.layers[0]
        with torch.no_grad():
            layer0.mlp.up_proj.weight.add_(0.05)
    assert torch.allclose(plain.losses(batch), cached.losses(batch), atol=TOL, rtol=0)
    assert stats_of(cached)["invalidations"] == 1


def test_radix_tree_shares_prefixes_and_serves_prefixes():
    cache = RadixCache(1 << 30, get_registry().get("eviction_policies", "lru"))
    gen = torch.Generator().manual_seed(0)
    a, b = (1, 2, 3, 4, 5), (1, 2, 3, 9)
    ha, hb = torch.randn(5, 8, generator=gen), torch.randn(4, 8, generator=gen)
    hb[:3] = ha[:3]  # causal: a shared prefix has the same states
    cache.insert(a, ha)
    cache.insert(b, hb)
    assert cache.bytes == (5 + 1) * 8 * 4  # the 3-token prefix is stored once
    assert torch.equal(cache.lookup(a), ha) and torch.equal(cache.lookup(b), hb)
    assert torch.equal(cache.lookup((1, 2)), ha[:2])  # a prefix of a cached sequence is a hit
    assert cache.lookup((1, 2, 3, 4, 6)) is None and cache.lookup((7,)) is None


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "size"])
def test_budget_and_eviction(policy, tiny_llama):
    budget_tokens = 20
    extra = [f"hf.cache_policy={policy}", f"hf.cache_budget_mb={budget_tokens * 64 * 4 / 2**20}"]
    plain, cached = backend(tiny_llama, "llama", False), backend(tiny_llama, "llama", True, extra=extra)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        batch = random_batch(gen, n=4, shared_prefix=0)
        assert torch.allclose(plain.losses(batch), cached.losses(batch), atol=TOL, rtol=0)
        assert cached.trunk.cache.bytes <= budget_tokens * 64 * 4
    assert stats_of(cached)["evictions"] > 0


def test_all_layer_lora_has_no_trunk(tiny_llama):
    b = HFBackend(load_config(None, [f"model.path={tiny_llama}"]))
    assert b.trunk is None  # nothing is frozen below layer 0


@pytest.mark.parametrize("trunk,q", [(False, 1), (True, 1), (True, 3)])
def test_side_by_side_batch_equals_sequential_passes(trunk, q, tiny_llama):
    """hf.pm_batch: all 2q perturbed states in one batch == the q directions one by one."""
    seq = backend(tiny_llama, "llama", trunk)
    one = backend(tiny_llama, "llama", trunk, extra=["hf.pm_batch=true"])
    gen = torch.Generator().manual_seed(int(trunk) + 5 + q)
    plain = random_batch(gen)
    single = [Example(e.prompt_ids, (5,), ((5,), (9,))) for e in plain]       # single-token choices
    multi = [Example(e.prompt_ids, (5, 7), ((5, 7), (9,))) for e in plain]    # multi-token choices
    for step, batch in enumerate([plain, single, multi]):
        seeds, eps = [100 + 10 * step + i for i in range(q)], 1e-2
        pairs_a, off_a = seq.population_losses(batch, seeds, eps)
        pairs_b, off_b = one.population_losses(batch, seeds, eps)
        assert off_b == 0.0 and off_a == -eps
        for (lp_a, lm_a), (lp_b, lm_b) in zip(pairs_a, pairs_b):
            assert torch.allclose(lp_a, lp_b, atol=TOL, rtol=0) and torch.allclose(lm_a, lm_b, atol=TOL, rtol=0)
            assert not torch.allclose(lp_a, lm_a)  # the blocks really saw different adapters
        seq.perturb([(seeds[-1], -off_a)])  # back to theta
        for x, y in zip(seq.trainable_tensors(), one.trainable_tensors()):
            assert torch.allclose(x, y, atol=1e-6, rtol=0)
    # a whole MeZO step agrees too
    from mezo_core.mezo import mezo_step
    ra = mezo_step(seq, plain, [7 + i for i in range(q)], 1e-2, 1e-1)
    rb = mezo_step(one, plain, [7 + i for i in range(q)], 1e-2, 1e-1)
    assert ra.grads == pytest.approx(rb.grads, abs=1e-3)
    for x, y in zip(seq.trainable_tensors(), one.trainable_tensors()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,pm,trunk", [("llama", False, False), ("gpt2", False, False), ("llama", True, False),
                                           ("llama", False, True), ("gpt2", False, True), ("llama", True, True)])
def test_prefix_sharing_equals_plain(arch, pm, trunk, tiny_llama, tiny_gpt2):
    """hf.prefix_sharing: a shared prefix runs once per pass and its KV is forked;
    with the trunk cache, prefix and suffixes start at layer k0 from cached states."""
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    extra = ["hf.pm_batch=true"] if pm else []
    plain = plain_backend(model_dir, arch, extra=extra)
    shared = backend(model_dir, arch, trunk, extra=extra + ["hf.prefix_sharing=true", "hf.prefix_min_tokens=4"])
    assert (shared.trunk is not None and shared.trunk.k0 == 2) == trunk
    gen = torch.Generator().manual_seed(21)
    rows = random_batch(gen, n=7, shared_prefix=10, longest_body=5, short=2)  # two rows in no group
    multi = [Example(e.prompt_ids, (5, 7), ((5, 7), (9,))) for e in rows]
    before = None
    for step in range(2):  # the second step finds the trunk cache warm
        for b in (plain, shared):
            b.perturb([(step, 0.05)])  # a realistic adapter: fp32 noise stays far below TOL
        losses = plain.losses(rows)
        assert torch.allclose(losses, shared.losses(rows), atol=TOL, rtol=0)
        assert before is None or not torch.allclose(losses, before, atol=1e-4, rtol=0)  # the adapter moved
        before = losses
        prompts = [e.prompt_ids for e in rows]
        assert torch.allclose(plain.choice_losses(prompts, [(5,), (9,)]),
                              shared.choice_losses(prompts, [(5,), (9,)]), atol=TOL, rtol=0)
        pairs_a, _ = plain.population_losses(multi, [50 + step], 1e-2)
        pairs_b, _ = shared.population_losses(multi, [50 + step], 1e-2)
        for x, y in zip(pairs_a[0], pairs_b[0]):
            assert torch.allclose(x, y, atol=TOL, rtol=0)
        if not pm:  # sequential passes leave -eps applied
            for b in (plain, shared):
                b.perturb([(50 + step, 1e-2)])
    stats = stats_of(shared)
    assert stats["prefix_tokens_saved"] > 0
    if trunk:
        assert stats["hits"] > 0 and stats["invalidations"] == 0 and stats["layers_skipped"] == 2


def test_prefix_groups():
    from mezo_backend_hf.prefix import prefix_groups
    rows = [(1, 2, 3, 4, 5, 9), (7, 7, 7), (1, 2, 3, 4, 5, 8, 8), (1, 2, 3, 4, 6), (1, 2, 3, 4, 5, 9)]
    groups = {frozenset(m): p for p, m in prefix_groups(rows, [None] * 5, min_tokens=4, keep=1)}
    assert groups == {frozenset({0, 2, 3, 4}): (1, 2, 3, 4), frozenset({1}): (7, 7, 7)}
    # every member keeps `keep` tokens of suffix; different adapters never share
    groups = prefix_groups(rows, ["a", None, "b", "a", "a"], min_tokens=4, keep=2)
    for prefix, members in groups:
        assert len({["a", None, "b", "a", "a"][m] for m in members}) == 1
        assert all(len(rows[m]) - len(prefix) >= 2 for m in members) or len(members) == 1


# -- hf.cuda_graphs ------------------------------------------------------------------
class EagerGraphs:
    """Stands in for GraphedForward off the GPU: same inputs (widths padded to
    GRAPH_WIDTH, a prepared 4-D mask, trunk states injected), run eagerly."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, static=(), **tensors):
        self.last = static, {k: v.clone() for k, v in tensors.items()}  # as a graph's input buffers
        return self.replay_last()

    def replay_last(self):
        self.calls += 1
        return self.fn(self.last[0], **self.last[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("trunk", [False, True])
def test_graph_inputs_give_the_plain_losses(arch, trunk, tiny_llama, tiny_gpt2):
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    plain, graphed = plain_backend(model_dir, arch), backend(model_dir, arch, trunk)
    graphed.forwards.passes.graphs = EagerGraphs(graphed.forwards.passes.graph_forward)
    gen = seeded(101)
    batch = random_batch(gen, n=5)
    for step in range(2):
        for b in (plain, graphed):
            b.perturb([(step, 0.3)])
        assert torch.allclose(plain.losses(batch), graphed.losses(batch), atol=TOL, rtol=0)
        prompts = [e.prompt_ids for e in batch]
        assert torch.allclose(plain.choice_losses(prompts, [(5,), (9,)]),
                              graphed.choice_losses(prompts, [(5,), (9,)]), atol=TOL, rtol=0)
    assert graphed.forwards.passes.graphs.calls == 4
    assert (stats_of(graphed).get("hits", 0) > 0) == trunk


@pytest.mark.parametrize("trunk,graphs", [(False, False), (True, False), (False, True), (True, True)])
def test_second_pass_reuses_the_first_pass_inputs(trunk, graphs, tiny_llama, monkeypatch):
    """Both passes of a step build the batch's inputs once; the losses still
    follow the adapter (plain computation on fresh random batches of one shape,
    so a stale reuse across batches would show)."""
    plain, reusing = plain_backend(tiny_llama, "llama"), backend(tiny_llama, "llama", trunk)
    if graphs:
        reusing.forwards.passes.graphs = EagerGraphs(reusing.forwards.passes.graph_forward)
    built = []
    from mezo_backend_hf import forward
    build = forward.pass_inputs
    monkeypatch.setattr(forward, "pass_inputs", lambda *a: built.append(1) or build(*a))  # either backend's
    gen = seeded(102)
    shape = random_batch(gen, n=4)
    for step in range(3):
        batch = [Example(tuple(torch.randint(4, 250, (len(e.prompt_ids),), generator=gen).tolist()),
                         e.target_ids) for e in shape]
        want = one_direction(plain, batch, 10 + step, 0.05)
        before = len(built)
        got = one_direction(reusing, batch, 10 + step, 0.05)
        assert want[2] == got[2] == -0.05
        for x, y in zip(want[:2], got[:2]):
            assert x.device.type == "cpu" and torch.allclose(x, y, atol=TOL, rtol=0)
        assert not torch.allclose(got[0], got[1], atol=1e-4)   # the second pass saw -eps z
        assert len(built) - before == 1                        # one build per step
    if trunk:
        stats = stats_of(reusing)
        assert stats["lookups"] == 2 * 3 * len(shape) and stats["hits"] == 3 * len(shape)


@pytest.mark.parametrize("trunk", [False, True])
def test_compiled_layers_give_the_plain_losses(trunk, tiny_llama):
    """hf.compile: the compiled layers (inductor's fused kernels) against eager
    ones, with the graph inputs too, while the adapter moves."""
    plain = plain_backend(tiny_llama, "llama")
    compiled = backend(tiny_llama, "llama", trunk, extra=["hf.compile=true"])
    compiled.forwards.passes.graphs = EagerGraphs(compiled.forwards.passes.graph_forward)
    layers = compiled.trunk.top if trunk else compiled.model.base_model.model.model.layers
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers)
    gen = seeded(103)
    batch = random_batch(gen, n=5)
    for step in range(2):
        want = one_direction(plain, batch, 30 + step, 0.05)
        got = one_direction(compiled, batch, 30 + step, 0.05)
        for x, y in zip(want[:2], got[:2]):
            assert torch.allclose(x, y, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch,trunk,graphs", [("llama", False, False), ("llama", True, False), ("llama", True, True),
                                                ("gpt2", False, False), ("gpt2", True, True)])
def test_trimmed_last_layer_gives_the_plain_losses(arch, trunk, graphs, tiny_llama, tiny_gpt2):
    """hf.trim_last_layer: the last layer's MLP sees only the kept positions, the
    losses are the plain ones -- rows shorter than the kept window included."""
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    plain = plain_backend(model_dir, arch)
    trim = backend(model_dir, arch, trunk)  # on by default
    if graphs:
        trim.forwards.passes.graphs = EagerGraphs(trim.forwards.passes.graph_forward)
    widths = []  # of what the last layer's MLP sees
    trim.forwards.passes.stack.layers[-1].mlp.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    gen = seeded(104)
    batch = random_batch(gen, n=5) + [Example((7,), (9,)), Example((5, 6), (9, 10, 11))]  # keep = 4 > 2 tokens
    for step in range(2):
        want, got = one_direction(plain, batch, 40 + step, 0.05), one_direction(trim, batch, 40 + step, 0.05)
        for x, y in zip(want[:2], got[:2]):
            assert torch.allclose(x, y, atol=TOL, rtol=0)
        prompts = [e.prompt_ids for e in batch]
        assert torch.allclose(plain.choice_losses(prompts, [(5,), (9,)]), trim.choice_losses(prompts, [(5,), (9,)]),
                              atol=TOL, rtol=0)
    assert set(widths) == {4, 1}   # only the kept positions: the longest target + 1, or the last one


def test_trim_refuses_a_last_layer_that_bypasses_the_kv_cache(tiny_llama, monkeypatch):
    """A model whose last layer keeps keys and values some other way would get
    its kept positions attending to nothing: a clear error instead."""
    from mezo_core import MezoError
    from transformers import DynamicCache
    from mezo_backend_hf import passes
    b = backend(tiny_llama, "llama", True)
    monkeypatch.setattr(passes._KeysAndValuesOf, "update", DynamicCache.update)  # never stops the layer
    with pytest.raises(MezoError, match="hf.trim_last_layer"):
        b.losses(random_batch(torch.Generator().manual_seed(0), n=3))


def test_cuda_graphs_need_cuda(tiny_llama):
    from mezo_core import MezoError
    with pytest.raises(MezoError, match="hf.cuda_graphs"):
        backend(tiny_llama, "llama", True, extra=["hf.cuda_graphs=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trunk,compiled,trim", [(False, False, False), (True, False, False), (True, True, True)])
def test_cuda_graph_replays_equal_eager_passes(trunk, compiled, trim, tiny_llama):
    cuda = ["model.device=cuda"]
    eager = backend(tiny_llama, "llama", trunk, extra=cuda + ["hf.trim_last_layer=false"])
    graphed = backend(tiny_llama, "llama", trunk, extra=cuda + ["hf.cuda_graphs=true", f"hf.compile={compiled}",
                                                                f"hf.trim_last_layer={trim}"])
    gen = seeded(105)
    batches = [random_batch(gen, n=6) for _ in range(2)]
    previous = None
    gc.collect()
    gc.disable()  # what the captures leave behind is found below, not by a collection in between
    try:
        for step in range(3):   # in-place adapter updates must reach the replayed graph
            for b in (eager, graphed):
                b.perturb([(step, 0.3)])
            for batch in batches:
                want, got = eager.losses(batch), graphed.losses(batch)
                assert torch.allclose(want, got, atol=1e-4, rtol=0)
            assert previous is None or not torch.equal(previous, got)
            previous = got
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if type(o) in (torch.Tensor, torch.nn.Parameter) and o.is_cuda]  # no fakes
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert graphed.forwards.passes.graphs.captures >= 1 and graphed.forwards.passes.graphs.replays == 6
    assert not left   # device memory held by uncollected cycles (torch.compile's first call makes some)
