"""The hf backend on tiny random Llama and GPT-2 models: losses against a plain
transformers/peft reference, padding, the single-token choice fast path, the
classification objective, perturbation, PEFT adapter folders, LoRA options."""
from __future__ import annotations

import json

import pytest
import torch

from mezo_core import Backend, Example, MezoError
from mezo_core.config import load_config
from mezo_core.forwards import objective, one_direction
from mezo_core.stats import stats_of
from mezo_backend_hf.backend import HFBackend
from tiny import seeded

TARGETS = {"llama": "[q_proj,v_proj]", "gpt2": "[c_attn,c_fc]"}
ARCHS = ["llama", "gpt2"]


@pytest.fixture
def model_dir(request, tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


def make_backend(model_dir, arch, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", "lora.r=4", "lora.alpha=8",
                             f"lora.target_modules={TARGETS[arch]}", *overrides])
    return HFBackend(cfg)


def random_examples(vocab, n=6, seed=0, choices=None):
    """Prompts and targets of different lengths, from fresh random token ids."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return tuple(torch.randint(4, vocab, (k,), generator=g).tolist())

    out = []
    for i in range(n):
        prompt = ids(1, 20)
        if choices is None:
            out.append(Example(prompt, ids(1, 6)))
        else:
            out.append(Example(prompt, choices[i % len(choices)], tuple(choices)))
    return out


def reference_losses(model, batch):
    """Mean cross-entropy over the target tokens, one unpadded sequence at a
    time, with full logits from a plain forward of ``model``."""
    out = []
    with torch.no_grad():
        for e in batch:
            ids = torch.tensor([e.prompt_ids + e.target_ids])
            logits = model(input_ids=ids).logits[0].double()
            p, t = len(e.prompt_ids), len(e.target_ids)
            pred = logits[p - 1:p + t - 1]               # position k predicts token k+1
            out.append(float(torch.nn.functional.cross_entropy(pred, torch.tensor(e.target_ids))))
    return torch.tensor(out, dtype=torch.float64)


def load_base(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def nudge(backend, seed=1, coef=0.5):
    """Move the adapter away from its init (LoRA B = 0) so that it matters."""
    backend.perturb([(seed, coef)])


# -- losses -----------------------------------------------------------------------
@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_losses_match_the_base_model_at_init(model_dir, arch):
    backend = make_backend(model_dir, arch)
    batch = random_examples(len(backend.tokenizer), seed=1)
    got = backend.losses(batch)
    assert got.dtype == torch.float64 and got.shape == (len(batch),) and got.device.type == "cpu"
    # LoRA B = 0 at init: the adapter is the identity
    torch.testing.assert_close(got, reference_losses(load_base(model_dir), batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_losses_are_padding_aware_and_match_a_peft_reference(model_dir, arch, tmp_path):
    from peft import PeftModel
    backend = make_backend(model_dir, arch)
    nudge(backend)
    vocab = len(backend.tokenizer)
    batch = random_examples(vocab, n=8, seed=2)
    batched = backend.losses(batch)
    one_by_one = torch.cat([backend.losses([e]) for e in batch])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    # the same LoRA weights in a plain peft model
    backend.save_adapter(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load_base(model_dir), tmp_path / "adapter").eval()
    ref = reference_losses(peft_model, batch)
    torch.testing.assert_close(batched, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, reference_losses(load_base(model_dir), batch), atol=1e-4)
    # and merged into the weights of an un-wrapped transformers model
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(batched, reference_losses(merged, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_single_token_choice_fast_path_equals_the_generic_path(model_dir, arch):
    backend = make_backend(model_dir, arch)
    nudge(backend, seed=3)
    vocab = len(backend.tokenizer)
    prompts = [e.prompt_ids for e in random_examples(vocab, n=5, seed=4)]
    choices = [(7,), (100,), (vocab - 1,)]
    fast = backend.choice_losses(prompts, choices)
    generic = Backend.choice_losses(backend, prompts, choices)
    assert fast.shape == (5, 3)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    # multi-token choices fall back to the generic path
    multi = [(7, 8), (100,)]
    torch.testing.assert_close(backend.choice_losses(prompts, multi),
                               Backend.choice_losses(backend, prompts, multi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
@pytest.mark.parametrize("choices", [((11,), (12,)), ((11, 13), (12,), (40, 41, 42))])
def test_objective_with_choices_is_the_cross_entropy_among_choices(model_dir, arch, choices):
    backend = make_backend(model_dir, arch)
    nudge(backend, seed=5)
    batch = random_examples(len(backend.tokenizer), n=4, seed=6, choices=choices)
    got = objective(backend, batch)
    for i, e in enumerate(batch):
        scores = [float(backend.losses([Example(e.prompt_ids, c)])[0]) for c in choices]
        gold = choices.index(e.target_ids)
        logz = torch.logsumexp(-torch.tensor(scores, dtype=torch.float64), 0)
        assert float(got[i]) == pytest.approx(float(scores[gold] + logz), rel=1e-5, abs=1e-5)
    # plain examples: objective is losses
    plain = random_examples(len(backend.tokenizer), n=3, seed=7)
    torch.testing.assert_close(objective(backend, plain), backend.losses(plain))
    # rows with choices of their own (multiple choice; tests/test_tasks.py checks the numbers)
    own = Example((5,), (11,), ((11,), (99,)))
    mixed = objective(backend, [batch[0], own])
    torch.testing.assert_close(mixed[:1], got[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], objective(backend, [own]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mixes examples with and without choices"):
        objective(backend, [batch[0], plain[0]])


# -- perturbation --------------------------------------------------------------------
@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_perturb_changes_losses_and_restoring_returns_them(model_dir, arch):
    backend = make_backend(model_dir, arch)
    nudge(backend, seed=8, coef=0.1)
    batch = random_examples(len(backend.tokenizer), n=4, seed=9)
    before = backend.losses(batch)
    start = [t.clone() for t in backend.trainable_tensors()]
    backend.perturb([(42, 1e-2)])
    moved = backend.losses(batch)
    assert (moved - before).abs().max() > 1e-5
    backend.perturb([(42, -2e-2)])
    other = backend.losses(batch)
    assert (other - before).abs().max() > 1e-5 and (other - moved).abs().max() > 1e-5
    backend.perturb([(42, 1e-2)])
    for t, t0 in zip(backend.trainable_tensors(), start):     # see test_perturb for the bound
        torch.testing.assert_close(t, t0, rtol=0, atol=1e-7)
    torch.testing.assert_close(backend.losses(batch), before, rtol=1e-6, atol=1e-6)
    # the default plus_minus_losses leaves theta - eps z applied
    lp, lm, offset = one_direction(backend, batch, 42, 1e-2)
    assert offset == -1e-2
    torch.testing.assert_close(lp, moved, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm, other, rtol=1e-6, atol=1e-6)


def test_trainable_tensors_are_the_lora_weights_in_name_order(tiny_llama):
    backend = make_backend(tiny_llama, "llama")
    names = backend.trainable_names()
    assert names == sorted(names) and len(names) == 4 * 2 * 2   # 4 layers, q/v, A/B
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)
    assert all(".default" not in n for n in names)
    assert all(not t.requires_grad for t in backend.trainable_tensors())
    params = dict(backend.model.named_parameters())
    for n, t in zip(names, backend.trainable_tensors()):
        assert params[n.replace(".weight", ".default.weight")] is t
    for n, t in zip(names, backend.trainable_tensors()):
        assert (t == 0).all() == (".lora_B." in n)
    assert stats_of(backend)["forward_tokens"] == 0
    batch = random_examples(len(backend.tokenizer), n=3)
    backend.losses(batch)
    assert stats_of(backend)["forward_tokens"] == sum(e.num_tokens for e in batch)


def test_initial_adapter_depends_on_the_run_seed(tiny_llama):
    a, b = make_backend(tiny_llama, "llama"), make_backend(tiny_llama, "llama")
    c = make_backend(tiny_llama, "llama", "seed=1")
    ta, tb, tc = a.trainable_tensors(), b.trainable_tensors(), c.trainable_tensors()
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert not torch.equal(ta[0], tc[0])


def test_bf16_backend(tiny_llama, tmp_path):
    """A bf16 model against the plain fp32 peft computation of the same adapter,
    within bf16's rounding; the perturbation moves the losses by far more."""
    from peft import PeftModel
    backend = make_backend(tiny_llama, "llama", "model.dtype=bfloat16")
    batch = random_examples(len(backend.tokenizer), n=6, seed=10)
    refs = []
    for step, terms in enumerate(([(1, 0.5)], [(3, 1.0)])):
        backend.perturb(terms)
        backend.save_adapter(tmp_path / str(step))   # the fp32 masters
        peft_model = PeftModel.from_pretrained(load_base(tiny_llama), tmp_path / str(step)).eval()
        refs.append(reference_losses(peft_model, batch))
        got = backend.losses(batch)
        print(f"bf16 vs fp32: max |diff| {float((got - refs[-1]).abs().max()):.4f}")
        torch.testing.assert_close(got, refs[-1], rtol=0, atol=2e-2)   # measured: < 7e-3
    print(f"the perturbation moves the losses by {float((refs[1] - refs[0]).abs().max()):.4f}")
    assert (refs[1] - refs[0]).abs().max() > 0.1   # measured: 0.116


# -- adapter folders ------------------------------------------------------------------
@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_save_adapter_writes_a_peft_folder(model_dir, arch, tmp_path):
    from safetensors.torch import load_file
    backend = make_backend(model_dir, arch)
    nudge(backend)
    out = tmp_path / "adapter"
    backend.save_adapter(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["peft_type"] == "LORA"
    assert sorted(conf["target_modules"]) == sorted(TARGETS[arch].strip("[]").split(","))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(tensors) == backend.trainable_names()
    for name, t in zip(backend.trainable_names(), backend.trainable_tensors()):
        assert torch.equal(tensors[name], t)
    # saving again replaces the folder atomically (no temp folders left behind)
    backend.perturb([(2, 0.1)])
    backend.save_adapter(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert not torch.equal(load_file(str(out / "adapter_model.safetensors"))[backend.trainable_names()[1]],
                           tensors[backend.trainable_names()[1]])


@pytest.mark.parametrize("model_dir, arch", [(a, a) for a in ARCHS], indirect=["model_dir"])
def test_load_adapter_round_trip(model_dir, arch, tmp_path):
    a = make_backend(model_dir, arch)
    nudge(a, seed=12)
    batch = random_examples(len(a.tokenizer), n=4, seed=13)
    a.save_adapter(tmp_path / "ad")
    b = make_backend(model_dir, arch)
    assert not torch.equal(b.losses(batch), a.losses(batch))
    b.load_adapter(tmp_path / "ad")
    assert all(torch.equal(x, y) for x, y in zip(a.trainable_tensors(), b.trainable_tensors()))
    assert torch.equal(a.losses(batch), b.losses(batch))


def test_load_adapter_errors(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    backend = make_backend(tiny_llama, "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MezoError, match="not a PEFT adapter folder"):
        backend.load_adapter(tmp_path / "empty")
    backend.save_adapter(tmp_path / "ad")
    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(tmp_path / "ad" / "adapter_model.safetensors"))
    with pytest.raises(MezoError, match="adapter lacks 1 tensors"):
        backend.load_adapter(tmp_path / "ad")


# -- LoRA options -----------------------------------------------------------------------
def test_lora_layers_limit_the_trainable_tensors(tiny_llama, tiny_gpt2):
    llama = make_backend(tiny_llama, "llama", "lora.layers=[1,3]")
    names = llama.trainable_names()
    assert len(names) == 2 * 2 * 2
    assert {n.split(".layers.")[1].split(".")[0] for n in names} == {"1", "3"}
    gpt2 = make_backend(tiny_gpt2, "gpt2", "lora.layers=[0]")
    names = gpt2.trainable_names()
    assert len(names) == 1 * 2 * 2 and all(".h.0." in n for n in names)


def test_lora_rank_sets_the_shapes(tiny_llama):
    backend = make_backend(tiny_llama, "llama", "lora.r=3")
    for n, t in zip(backend.trainable_names(), backend.trainable_tensors()):
        assert (t.shape[0] if ".lora_A." in n else t.shape[1]) == 3


def test_bad_lora_target_module_is_a_mezo_error(tiny_llama):
    with pytest.raises(MezoError, match="lora:.*nope"):
        make_backend(tiny_llama, "llama", "lora.target_modules=[nope]")


def test_bad_model_path_or_dtype(tiny_llama, tmp_path):
    with pytest.raises(MezoError, match="model.path: model not found"):
        make_backend(tmp_path / "nothing", "llama")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MezoError, match="without config.json"):
        make_backend(tmp_path / "folder", "llama")
    with pytest.raises(MezoError, match="unknown dtype 'float8'"):
        make_backend(tiny_llama, "llama", "model.dtype=float8")


def test_example_checks():
    with pytest.raises(ValueError):
        Example((1,), ())
    with pytest.raises(ValueError):
        Example((1,), (2,), ((3,), (4,)))
    assert Example((1, 2), (3,)).num_tokens == 3


def test_lora_dtype_model_moves_fp32_masters_and_forwards_in_bf16(tiny_llama, tmp_path):
    """hf.lora_dtype=model on a bf16 model: the adapter inside the model is bf16
    (no fp32 casts around the LoRA GEMMs) and always equals the fp32 masters
    rounded once; MeZO moves the masters, so a +eps, -2eps, +eps round trip
    comes back at fp32 precision, and the files hold the fp32 values."""
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.config import load_config
    common = [f"model.path={tiny_llama}", "model.dtype=bfloat16", "lora.layers=[2,3]", "hf.trunk_cache=false"]
    fast = HFBackend(load_config(None, common + ["hf.lora_dtype=model"]))
    ref = HFBackend(load_config(None, common))                     # fp32 adapter, the default
    assert {t.dtype for t in fast._model_tensors} == {torch.bfloat16}
    assert {t.dtype for t in fast.trainable_tensors()} == {torch.float32}
    start = [t.clone() for t in fast.trainable_tensors()]
    for a, b in zip(start, ref.trainable_tensors()):
        assert torch.equal(a, b)                                   # the same initial adapter
    gen = seeded(11)
    batch = [Example(tuple(torch.randint(4, 250, (9,), generator=gen).tolist()), (7,)) for _ in range(4)]
    for seed, coef in ((3, 0.5), (4, -0.25)):
        for b in (fast, ref):
            b.perturb([(seed, coef)])
        for master, inside in zip(fast.trainable_tensors(), fast._model_tensors):
            assert torch.equal(master.to(torch.bfloat16), inside)
        torch.testing.assert_close(fast.losses(batch), ref.losses(batch), rtol=0, atol=3e-2)  # bf16 level
    for seed, coef in ((4, 0.25), (3, -0.5)):                      # back to the start
        fast.perturb([(seed, coef)])
    for a, b in zip(fast.trainable_tensors(), start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)        # fp32, not bf16, precision
    fast.perturb([(9, 0.1)])
    fast.save_adapter(tmp_path / "a")
    again = HFBackend(load_config(None, common + ["hf.lora_dtype=model"]))
    again.load_adapter(tmp_path / "a")
    for a, b, inside in zip(again.trainable_tensors(), fast.trainable_tensors(), again._model_tensors):
        assert torch.equal(a, b) and torch.equal(inside, b.to(torch.bfloat16))


def test_one_layer_model_without_trunk_cache(tmp_path):
    """A model with a single decoder layer has nothing below its last layer: the trimmed
    path is skipped and the losses equal those of the untrimmed forward."""
    from tiny import build_model, write_run_config
    from mezo_core.config import load_config
    from mezo_core.registry import get_registry
    from mezo_core.data import Task
    model = build_model(tmp_path / "one", "llama", layers=1)
    losses = []
    for trim in ("true", "false"):
        cfg = load_config(write_run_config(tmp_path / trim, model),
                          ["hf.trunk_cache=false", f"hf.trim_last_layer={trim}"])
        backend = get_registry().get("backends", "hf")(cfg)
        task = Task(cfg.task, backend.tokenizer)
        losses.append(objective(backend, task.train_examples[:4]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_hf_options_are_validated_in_one_place():
    from mezo_backend_hf.options import HFOptions
    from mezo_core.config import options_from
    assert HFBackend.options is HFOptions
    assert options_from(HFOptions, None, "hf") == HFOptions()
    assert options_from(HFOptions, {"cache_budget_mb": 2}, "hf").cache_budget_mb == 2   # an int is a float
    cases = [({"trunk_cache": "maybe"}, "'hf.trunk_cache': expected a bool"),
             ({"prefix_min_tokens": True}, "'hf.prefix_min_tokens': expected a int"),
             ({"lora_dtype": "bf16"}, "'hf.lora_dtype'"),
             ({"nonsense": 1}, "'hf.nonsense': unknown option .*trunk_cache"),
             ({"pm_batch": True, "full_params": [".*"]}, "hf.pm_batch .* hf.full_params"),
             ({"lora_dtype": "model", "full_params": [".*"]}, "hf.lora_dtype .* hf.full_params"),
             ({"prefix_min_tokens": 0}, "hf.prefix_min_tokens")]
    for section, message in cases:
        with pytest.raises(MezoError, match=message):
            options_from(HFOptions, section, "hf")


def test_backend_stats_record(tiny_llama):
    import dataclasses
    from mezo_core.stats import BackendStats
    assert BackendStats().as_dict() == {} and BackendStats().hit_rate is None   # nothing measured
    s = BackendStats(lookups=4, hits=1, tokens_looked_up=10, tokens_reused=5, bytes=64)
    assert s.as_dict() == {"lookups": 4, "hits": 1, "tokens_looked_up": 10, "tokens_reused": 5, "bytes": 64,
                           "hit_rate": 0.25, "token_reuse": 0.5}
    assert BackendStats(lookups=0, tokens_looked_up=0).hit_rate == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hits = 2
    # the hf backend: counters, a reset, and a cache reset that the next lookups miss
    backend = make_backend(tiny_llama, "llama", "lora.layers=[2,3]")
    batch = random_examples(len(backend.tokenizer), n=3, seed=12)
    backend.losses(batch)
    backend.losses(batch)
    assert backend.stats().hits == 3 and backend.stats().layers_skipped == 2 and backend.stats().bytes > 0
    backend.reset_stats()
    assert backend.stats().lookups == backend.stats().forward_tokens == 0 and backend.stats().bytes > 0
    backend.reset_cache()
    backend.losses(batch)
    assert backend.stats().hits == 0 and backend.stats().lookups == 3
    nudge(backend)   # base_losses leaves the adapter out
    base = reference_losses(load_base(tiny_llama), batch)
    torch.testing.assert_close(backend.base_losses(batch), base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(backend.losses(batch), base, atol=1e-4)
    assert not any(t.requires_grad for t in backend.trainable_tensors())
