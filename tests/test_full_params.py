"""Full-parameter MeZO in the hf backend (hf.full_params): base weights moved in
place by the same perturbation engine, with the frozen trunk below them."""
import pytest
import torch

from mezo_core import Example, MezoError
from mezo_core.config import load_config
from mezo_core.mezo import direction_seeds, mezo_step
from mezo_core.stats import stats_of
from mezo_backend_hf.backend import HFBackend
from tiny import seeded

LAYER3 = "['.*layers\\.3\\..*']"


def backend(model_dir, *extra):
    return HFBackend(load_config(None, [f"model.path={model_dir}", *extra]))


def batch():
    gen = seeded(4)
    return [Example(tuple(torch.randint(4, 250, (n,), generator=gen).tolist()), (11, 12)) for n in (4, 6, 9, 5)]


def test_subset_trains_only_matching_weights_above_a_frozen_trunk(tiny_llama):
    cached = backend(tiny_llama, f"hf.full_params={LAYER3}")
    plain = backend(tiny_llama, f"hf.full_params={LAYER3}", "hf.trunk_cache=false", "hf.trim_last_layer=false")
    names = cached.trainable_names()
    assert names == sorted(names) and names and all(".layers.3." in n for n in names)
    assert not any("lora" in n for n in names) and cached.trunk.k0 == 3
    before = {n: t.clone() for n, t in zip(names, cached.trainable_tensors())}
    frozen = cached.model.model.layers[2].mlp.up_proj.weight.clone()
    for step in range(3):
        for b in (cached, plain):
            mezo_step(b, batch(), direction_seeds(1, step, 2), 1e-3, 1e-2, 0.01)
        assert torch.allclose(cached.losses(batch()), plain.losses(batch()), atol=1e-5, rtol=0)
    assert all(not torch.equal(before[n], t) for n, t in zip(names, cached.trainable_tensors()))
    assert torch.equal(frozen, cached.model.model.layers[2].mlp.up_proj.weight)
    assert stats_of(cached)["hits"] > 0


def test_all_parameters_leave_nothing_to_cache_and_mezo_lowers_the_loss(tiny_llama):
    b = backend(tiny_llama, "hf.full_params=['.*']")
    assert b.trunk is None
    assert any("embed_tokens" in n for n in b.trainable_names())
    data = batch()
    start = float(b.losses(data).mean())
    for step in range(60):
        mezo_step(b, data, direction_seeds(0, step, 1), 1e-3, 3e-4)
    assert float(b.losses(data).mean()) < start - 0.3


def test_save_and_load_full_weights(tiny_llama, tmp_path):
    a = backend(tiny_llama, f"hf.full_params={LAYER3}")
    a.perturb([(5, 0.1)])
    a.save_adapter(tmp_path / "w")
    assert (tmp_path / "w" / "mezo_params.safetensors").exists()
    b = backend(tiny_llama, f"hf.full_params={LAYER3}")
    b.load_adapter(tmp_path / "w")
    for x, y in zip(a.trainable_tensors(), b.trainable_tensors()):
        assert torch.equal(x, y)
    assert torch.equal(a.losses(batch()), b.losses(batch()))


@pytest.mark.parametrize("extra, message", [
    (["hf.full_params=['nothing_matches']"], "no parameter name matches"),
    (["hf.full_params=['(']"], "hf.full_params"),
    ([f"hf.full_params={LAYER3}", "hf.pm_batch=true"], "needs LoRA"),
])
def test_bad_full_params_config(tiny_llama, extra, message):
    with pytest.raises(MezoError, match=message):
        backend(tiny_llama, *extra)
