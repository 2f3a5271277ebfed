"""``mezo.z``: the distribution of z reaches every perturbation of a run -- the hf
backend's own moves, its side-by-side adapters, a whole ``mezo-run train`` -- and
a bad value is refused with one line naming the field. (The definition of z
itself is tested in test_perturb.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mezo_backend_hf.backend import HFBackend
from mezo_core import Example
from mezo_core.cli import main
from mezo_core.config import load_config
from test_perturb import _rademacher_py, _seed
from tiny import write_run_config


def make_backend(model_dir, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", "lora.r=4", "lora.alpha=8",
                             "lora.target_modules=[q_proj,v_proj]", *overrides])
    return HFBackend(cfg)


def test_hf_rademacher_perturb_moves_every_element_by_exactly_coef(tiny_llama):
    backend = make_backend(tiny_llama, "mezo.z=rademacher")
    seed, coef = _seed(), 2.0 ** -7
    before = [t.detach().clone() for t in backend.trainable_tensors()]
    backend.perturb([(seed, coef)])
    for index, (name, old, new) in enumerate(zip(backend.trainable_names(), before,
                                                 backend.trainable_tensors())):
        signs = torch.tensor([_rademacher_py(seed, index, j) for j in range(old.numel())]).view(old.shape)
        assert torch.equal(new, old + coef * signs), name                 # theta + coef * z, fp32
        if ".lora_B." in name:                                            # B starts at 0: exactly +-coef
            assert torch.equal(new.abs(), torch.full_like(new, coef)), name
    # the default stays the Gaussian: values other than +-coef appear
    gaussian = make_backend(tiny_llama)
    b = [t for n, t in zip(gaussian.trainable_names(), gaussian.trainable_tensors()) if ".lora_B." in n][0]
    gaussian.perturb([(seed, coef)])
    assert len(b.abs().unique()) > 2


def test_hf_side_by_side_adapters_use_the_configured_distribution(tiny_llama):
    """hf.pm_batch moves extra adapters by z itself: their losses must be the
    sequential path's, which moves the trained adapter through ``perturb``."""
    side = make_backend(tiny_llama, "mezo.z=rademacher", "hf.pm_batch=true")
    plain = make_backend(tiny_llama, "mezo.z=rademacher")
    vocab = side.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(_seed())
    batch = [Example(tuple(torch.randint(3, vocab, (6,), generator=gen).tolist()),
                     tuple(torch.randint(3, vocab, (2,), generator=gen).tolist())) for _ in range(3)]
    for b in (side, plain):
        b.perturb([(5, 0.3)])                       # a non-zero B first, so z changes the losses
    seeds, eps = [11, 12], 0.05
    got, _ = side.population_losses(batch, seeds, eps)
    want, _ = plain.population_losses(batch, seeds, eps)
    for (gp, gm), (wp, wm) in zip(got, want):
        torch.testing.assert_close(gp, wp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gm, wm, rtol=1e-4, atol=1e-5)


def _run(tmp_path, tiny_llama, steps, *overrides):
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": steps, "checkpoint_every": 0})
    assert main(["train", "-c", str(cfg), "mezo.z=rademacher", *overrides]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_train_with_rademacher_z(tmp_path, tiny_llama, fresh_registry):
    # one step: B starts at 0 and moves by -lr * g * z, so with z = +-1 every element
    # of every B has the magnitude lr * |g| (a Gaussian z would spread them)
    rows, adapter = _run(tmp_path / "one", tiny_llama, 1)
    g, lr = rows[0]["grads"][0], rows[0]["lr"]
    assert g != 0
    for name, t in adapter.items():
        if "lora_B" in name:
            assert len(t.abs().unique()) == 1, name
            assert float(t.abs()[0, 0]) == pytest.approx(lr * abs(g), rel=1e-4), name
    # a few steps train: the loss moves, the adapter stays finite
    rows, adapter = _run(tmp_path / "four", tiny_llama, 4)
    assert len({r["loss"] for r in rows}) > 1
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_an_unknown_distribution_is_refused(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_run_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "mezo.z=uniform"]) == 2
    err = capsys.readouterr().err
    line = err[err.index("mezo-run: error: "):].strip()
    assert "\n" not in line and "'mezo.z'" in line and "gaussian" in line and "rademacher" in line, line
    assert not (tmp_path / "run").exists()


def test_vllm_perturbations_carry_the_distribution_to_the_worker():
    """The driver sends (terms, decay, dist); the worker regenerates that z. Checked
    on the two halves without an engine (the engine tests run in test_vllm_backend)."""
    from mezo_backend_vllm.backend import VLLMBackend
    from mezo_backend_vllm.worker import MezoWorkerExtension
    from mezo_core.engine_state import EngineState

    class Worker(MezoWorkerExtension):
        def __init__(self, tensors):
            self._mezo, self._mezo_lora_id, self.pushed = EngineState(tensors, "cpu"), 1, []

        def _mezo_write(self, lora_id=None, state=None):
            self.pushed.append((lora_id, state))

    worker = Worker({"a": torch.zeros(3000), "b": torch.zeros(4, 70)})

    class Engine:  # vllm.LLM.collective_rpc: the worker's method, called in the worker
        def collective_rpc(self, method, args=()):
            return [getattr(worker, method)(*args)]

    driver = object.__new__(VLLMBackend)      # no engine: only the perturbation path
    driver.llm, driver.z_dist, driver._version = Engine(), "rademacher", 0
    seed, coef = _seed(), 0.25
    driver.perturb([(seed, coef)])
    for index, t in enumerate(worker._mezo.tensors):
        want = torch.tensor([_rademacher_py(seed, index, j) for j in range(t.numel())]).view(t.shape) * coef
        assert torch.equal(t, want), index
    worker.mezo_fill(2, [(seed, -2 * coef)], "rademacher")    # the minus side: theta - coef z, on copies
    lora_id, state = worker.pushed[-1]
    assert lora_id == 2 and all(torch.equal(s, -t) for s, t in zip(state, worker._mezo.tensors))
