"""The hf backend's generation for reward tasks (#29): batched greedy decoding with a KV
cache against transformers' own ``generate`` on plain peft (one unpadded prompt at a
time), stopping at EOS; per-row adapters (hf.pm_batch's side adapters) against the same
states applied in place one after another; seeded sampling against the softmax of the
model's logits."""
from __future__ import annotations

import pytest
import torch

from mezo_core.config import load_config
from mezo_core.testing import corpus
from tiny import assert_samples_follow, commonest_inner_token

SEED = 29


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    from mezo_backend_hf.backend import HFBackend
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    tmp = tmp_path_factory.mktemp("gen")
    backend = HFBackend(load_config(None, [f"model.path={tiny_llama}", "lora.r=2", "lora.alpha=4",
                                           "hf.trunk_cache=false", "hf.pm_batch=true"]))
    backend.perturb([(SEED, 0.5)])          # an adapter that is not the zero one
    backend.save_adapter(tmp / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      str(tmp / "adapter")).eval()
    prompts = [tuple(backend.tokenizer(t)["input_ids"]) for t in corpus(6, seed=SEED)]
    assert len({len(p) for p in prompts}) > 1                          # left padding is exercised
    yield backend, plain, prompts
    backend.close()


def hf_generate(model, prompt, n, eos):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                         pad_token_id=eos, eos_token_id=eos)[0, len(prompt):].tolist()
    return tuple(out[:out.index(eos)] if eos in out else out)


def test_batched_greedy_is_transformers_greedy_with_eos(setup):
    from mezo_backend_hf.generation import generate
    backend, plain, prompts = setup
    n = 8
    free = [hf_generate(plain, p, n, eos=-1) for p in prompts]        # no EOS: n tokens each
    assert backend.generate(prompts, n) == free or backend.tokenizer.eos_token_id in sum(free, ())
    # an EOS that the model does emit mid-way on some rows: those rows stop there, the others run on
    eos = commonest_inner_token(free)
    want = [hf_generate(plain, p, n, eos) for p in prompts]
    got = generate(backend.model, prompts, n, pad_id=backend.forwards.pad_id, eos_id=eos, device="cpu")
    assert got == want
    assert any(len(w) < n for w in want) and any(len(w) == n for w in want)


def test_side_adapters_generate_as_the_states_applied_in_place(setup):
    backend, _, prompts = setup
    states = [[(7, 2.0)], [(7, -2.0)], [(8, 2.0)]]
    names = []
    for j, terms in enumerate(states):
        backend.side.fill(f"gen{j}", backend._tensors, terms)
        names.append(f"gen{j}")
    together = backend.generate(list(prompts) * len(states), 6, [name for name in names for _ in prompts])
    one_by_one = []
    for terms in states:
        backend.perturb(terms)
        one_by_one += backend.generate(prompts, 6)
        backend.perturb([(s, -c) for s, c in terms])
    assert together == one_by_one
    assert together[:len(prompts)] != together[len(prompts):2 * len(prompts)]   # the states differ


def test_sampling_follows_the_softmax_and_its_seeds(setup):
    from mezo_backend_hf.generation import generate
    backend, plain, prompts = setup
    prompt, temperature, n = prompts[0], 0.3, 3000
    with torch.no_grad():
        logits = plain(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    seeds = list(range(n))
    first = [row[0] for row in generate(backend.model, [prompt] * n, 1, pad_id=backend.forwards.pad_id, eos_id=None,
                                        device="cpu", temperature=temperature, seeds=seeds)]   # EOS kept
    assert_samples_follow(first, logits, temperature)
    # a row's sample is its seed's, whatever the other rows and their order
    rows = backend.generate(prompts, 5, temperature=1.0, seeds=[11, 12, 13, 14, 15, 16])
    again = backend.generate(prompts[::-1], 5, temperature=1.0, seeds=[16, 15, 14, 13, 12, 11])
    assert rows == again[::-1]
    assert backend.generate(prompts[:1], 5, temperature=1.0, seeds=[11]) == rows[:1]
    assert backend.generate(prompts, 5, temperature=1e-6, seeds=[1] * 6) == backend.generate(prompts, 5)
