"""The backprop + Adam reference of the accuracy benchmark, on the tiny Llama:
its loss is the backend's own objective, its gradient matches finite
differences, it trains, evaluation sees the trained adapter, and the backend
gets its initial adapter back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mezo_core import Example
from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.forwards import objective as backend_objective
from mezo_backend_hf.backend import HFBackend
from tiny import write_run_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.backprop import FrozenBelow, adapter_params, backprop_reference, objective  # noqa: E402

SEED = 0  # the config's seed: the initial adapter; examples drawn from SEED + 1


def make_backend(tmp_path, model, *overrides):
    # LoRA on the top two of four layers: the trunk cache holds layers 0-1
    cfg = load_config(write_run_config(tmp_path, model), [f"seed={SEED}", "lora.layers=[2,3]", *overrides])
    return cfg, HFBackend(cfg)


def random_batch(vocab, choices, n=5, seed=SEED + 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 15, (1,), generator=g))
        prompt = tuple(torch.randint(4, vocab, (k,), generator=g).tolist())
        out.append(Example(prompt, choices[i % len(choices)], tuple(choices)))
    return out


@pytest.mark.parametrize("frozen_below", [False, True], ids=["whole-model", "from-layer-2"])
@pytest.mark.parametrize("choices", [((20,), (31,)), ((20,), (31, 42), (50, 7, 9))], ids=["single", "multi"])
def test_loss_is_the_backends_objective(tmp_path, tiny_llama, choices, frozen_below):
    print("seed", SEED)
    cfg, backend = make_backend(tmp_path, tiny_llama)
    below = FrozenBelow(backend, adapter_params(backend)) if frozen_below else None
    assert below is None or below.k0 == 2
    batch = random_batch(len(backend.tokenizer), choices)
    for _ in range(2):  # at the initial adapter (LoRA B = 0), then moved away from it
        with torch.no_grad():
            ours = objective(backend, batch, below).double()
        torch.testing.assert_close(ours, backend_objective(backend, batch), rtol=1e-5, atol=1e-5)
        backend.perturb([(SEED + 7, 0.5)])
    if below is not None:  # reordered, in other batches: the stored states of each row serve
        with torch.no_grad():
            ours = torch.cat([objective(backend, batch[::-1][:2], below), objective(backend, batch[::-1][2:], below)])
        torch.testing.assert_close(ours.double(), backend_objective(backend, batch[::-1]), rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences(tmp_path, tiny_llama):
    print("seed", SEED)
    cfg, backend = make_backend(tmp_path, tiny_llama, "hf.trunk_cache=false")
    # float64 in place (the adapter tensors stay the backend's); Llama's RMSNorm still
    # rounds through float32, hence h = 1e-3 and a 1 % tolerance
    backend.model.double()
    backend.perturb([(SEED + 7, 0.5)])  # B != 0, so that A has a gradient too
    batch = random_batch(len(backend.tokenizer), ((20,), (31, 42)))
    params = adapter_params(backend)
    assert params[0].dtype == torch.float64
    for p in params:
        p.requires_grad_(True)
    below = FrozenBelow(backend, params)  # the training forward: from the states entering layer 2
    grads = torch.autograd.grad(objective(backend, batch, below).mean(), params)
    names = backend.trainable_names()
    h = 1e-3
    checked = 0
    for i in (0, 1, len(params) - 1):  # lora_A and lora_B tensors of the lowest and top layer
        flat, g = params[i].data.view(-1), grads[i].view(-1)
        for j in (0, flat.numel() // 2, flat.numel() - 1):
            with torch.no_grad():
                old = float(flat[j])
                flat[j] = old + h
                up = float(objective(backend, batch, below).mean())
                flat[j] = old - h
                down = float(objective(backend, batch, below).mean())
                flat[j] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - float(g[j])) <= 1e-5 + 1e-2 * abs(fd), (names[i], j, fd, float(g[j]))
            checked += abs(fd) > 1e-6
    assert checked >= 6  # the comparisons were not all 0 == 0


def test_trains_and_restores(tmp_path, tiny_llama):
    """The dev set is the training set (all 8 examples, batch 8: one fixed batch),
    so the backend's own evaluation measures what was trained."""
    print("seed", SEED)
    train = tmp_path / "data" / "train.jsonl"
    cfg, backend = make_backend(tmp_path, tiny_llama, "task.k_per_class=null", f"task.dev={train}")
    initial = [t.clone() for t in backend.trainable_tensors()]
    task = Task(cfg.task, backend.tokenizer)
    zero_shot = task.evaluate(backend, cfg.eval_batch_size)

    result = backprop_reference(cfg, steps=20, lr=1e-2, eval_every=10, batch_size=8, backend=backend, log=print)

    losses = result["train_losses"]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    assert [r["step"] for r in result["curve"]] == [0, 10, 20]
    start, end = result["curve"][0], result["curve"][-1]
    assert start["dev_loss"] == pytest.approx(zero_shot["dev_loss"], abs=1e-9)   # step 0: untrained
    assert start["train_loss"] is None
    assert result["curve"][1]["train_loss"] == pytest.approx(sum(losses[:10]) / 10)
    assert abs(end["dev_loss"] - zero_shot["dev_loss"]) > 1e-2    # evaluation saw the trained adapter
    assert zero_shot["dev_accuracy"] < 1.0 and end["dev_accuracy"] == 1.0
    assert result["final_dev_accuracy"] == 1.0 == result["best_dev_accuracy"]
    # the initial adapter is back, trainable only by MeZO again
    for t, t0, p in zip(backend.trainable_tensors(), initial, adapter_params(backend)):
        assert torch.equal(t, t0) and not p.requires_grad and t.grad is None
    again = task.evaluate(backend, cfg.eval_batch_size)
    assert again["dev_loss"] == pytest.approx(zero_shot["dev_loss"], abs=1e-9)


def test_bf16_model_dtype_adapter(tmp_path, tiny_llama):
    """bf16 forwards reading a bf16 copy of the adapter (hf.lora_dtype=model):
    Adam moves the fp32 masters and the copy follows them."""
    print("seed", SEED)
    cfg, backend = make_backend(tmp_path, tiny_llama, "model.dtype=bfloat16", "hf.lora_dtype=model")
    masters, params = backend.trainable_tensors(), adapter_params(backend)
    assert masters[0].dtype == torch.float32 and params[0].dtype == torch.bfloat16
    batch = Task(cfg.task, backend.tokenizer).train_batch(cfg.seed, 0, 4)
    with torch.no_grad():
        torch.testing.assert_close(objective(backend, batch).double(), backend_objective(backend, batch),
                                   rtol=2e-2, atol=2e-2)
    initial = [t.clone() for t in masters]
    result = backprop_reference(cfg, steps=6, lr=1e-2, batch_size=6, backend=backend, log=print)
    assert result["train_losses"][-1] < result["train_losses"][0]
    assert result["curve"][-1]["dev_loss"] != result["curve"][0]["dev_loss"]
    for m, p, m0 in zip(masters, params, initial):
        assert torch.equal(m, m0) and torch.equal(p, m0.to(torch.bfloat16))
