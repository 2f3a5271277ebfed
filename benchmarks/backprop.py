"""The first-order reference for the accuracy benchmark: the same LoRA adapter,
examples, batches and objective as a MeZO run, trained by backprop + Adam.

MeZO's claim is to come close to fine-tuning by backprop at the memory of
inference; this measures the "close to" on the very problem MeZO solves. The
adapter is the hf backend's own (same rank, modules, layers and seeded initial
values), the batches are ``task.train_batch(cfg.seed, step, batch_size)``, the
loss is ``Backend.objective``'s (cross-entropy of the gold verbalizer choice,
each choice scored by its mean token loss) and the dev metrics come from the
same ``task.evaluate(backend, ...)``. Only the update differs.

    python -m benchmarks.backprop task.n_dev=200 --steps 40 --lr 1e-3
"""
from __future__ import annotations

import time

import torch

from mezo_core.adapter import canonical_name
from mezo_core.data import Task


def adapter_params(backend) -> list[torch.Tensor]:
    """The LoRA tensors the model's forward reads, in ``trainable_names`` order:
    the fp32 masters themselves, or (``hf.lora_dtype=model``) their copies in
    the model's dtype. Only the ``default`` adapter: MeZO's side adapters
    (``hf.pm_batch``) are not trained."""
    params = {canonical_name(n): p for n, p in backend.model.named_parameters()
              if ".lora_" in n and ".default." in n}
    names = backend.trainable_names()
    if set(params) != set(names):
        raise ValueError("backprop_reference trains a LoRA adapter: the backend's trainable tensors "
                         "are not the model's LoRA weights (hf.full_params?)")
    return [params[n] for n in names]


def _left_padded(rows, pad_id, device):
    """Ids, mask and positions (counting real tokens only) of left-padded rows,
    so that every row ends at the last position, as the hf backend pads them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
    start = width - torch.tensor([len(r) for r in rows])[:, None]
    column = torch.arange(width)[None, :]
    return ids.to(device), (column >= start).long().to(device), (column - start).clamp(min=0).to(device)


class FrozenBelow:
    """The hidden states entering the first adapted layer, per row. The layers
    below hold no adapter weight, so their outputs never change while the
    adapter trains: each training row's are computed once (as the hf
    backend's trunk cache does for MeZO) and the forward that backprop runs
    through starts at the first adapted layer. On SmolLM2 with the top 4 of
    30 layers adapted that skips most of the forward."""

    def __init__(self, backend, params):
        from mezo_backend_hf.passes import LayerStack
        self.stack = LayerStack(backend.model)
        layer_of = {id(p): i for i, layer in enumerate(self.stack.layers) for p in layer.parameters()}
        where = [layer_of.get(id(p)) for p in params]
        self.k0 = 0 if None in where else min(where)  # 0: an adapter weight outside the layers
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def hidden(self, rows, ids, mask, positions):
        """The rows' states entering layer k0, left-padded like ``ids`` (zeros
        under the padding, which the mask hides)."""
        width = ids.shape[1]
        missing = [i for i, r in enumerate(rows) if tuple(r) not in self.states]
        if missing:
            h = self.stack.run(None, 0, self.k0, input_ids=ids[missing], attention_mask=mask[missing],
                               position_ids=positions[missing], use_cache=False)
            for j, i in enumerate(missing):
                self.states[tuple(rows[i])] = h[j, width - len(rows[i]):]
        states = [self.states[tuple(r)] for r in rows]
        out = states[0].new_zeros((len(rows), width, states[0].shape[-1]))
        for i, state in enumerate(states):
            out[i, width - len(state):] = state
        return out


def _last_logits(backend, rows, keep, below=None):
    pad = backend.tokenizer.pad_token_id
    pad = pad if pad is not None else (backend.tokenizer.eos_token_id or 0)
    ids, mask, positions = _left_padded(rows, pad, backend.device)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep)
    if below is None or below.k0 == 0:
        out = backend.model(**inputs)
    else:
        out = below.stack.run(below.hidden(rows, ids, mask, positions), below.k0, None, **inputs)
    return out.logits.to(torch.promote_types(out.logits.dtype, torch.float32)), ids


def objective(backend, batch, below: FrozenBelow | None = None) -> torch.Tensor:
    """``Backend.objective`` as a differentiable function of the adapter: per
    example, the cross-entropy of the gold choice among the choices, each
    scored by its mean token loss. A forward of the peft model, from the
    states of ``below`` when given."""
    choices = batch[0].choices
    if choices is None or any(e.choices != choices for e in batch):
        raise ValueError("backprop_reference needs classification examples sharing their choices")
    prompts = [e.prompt_ids for e in batch]
    if all(len(c) == 1 for c in choices):  # one pass over the prompts scores every choice
        logits, _ = _last_logits(backend, prompts, 1, below)
        scores = -torch.log_softmax(logits[:, -1], -1)[:, [c[0] for c in choices]]
    else:  # a row per (prompt, choice); targets end at the last position
        rows = [p + c for p in prompts for c in choices]
        k = max(map(len, choices))
        logits, ids = _last_logits(backend, rows, k + 1, below)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, -k:], reduction="none")
        lengths = torch.tensor([len(c) for c in choices] * len(prompts), device=nll.device)
        is_target = torch.arange(k, device=nll.device)[None, :] >= (k - lengths)[:, None]
        scores = ((nll * is_target).sum(1) / lengths).view(len(prompts), len(choices))
    gold = torch.tensor([choices.index(e.target_ids) for e in batch], device=scores.device)
    return torch.nn.functional.cross_entropy(-scores, gold, reduction="none")


def backprop_reference(cfg, steps: int, lr: float = 1e-3, eval_every: int = 0, batch_size=None,
                       backend=None, log=print) -> dict:
    """Train the run's LoRA adapter by backprop + Adam for ``steps`` steps on
    MeZO's batches; dev accuracy zero-shot, every ``eval_every`` steps and at
    the end. ``backend``: an hf backend already built from ``cfg`` (else one is
    built); its adapter is restored to its initial values on return, so it can
    run MeZO next.

    Adam moves the fp32 masters (``trainable_tensors()``); with
    ``hf.lora_dtype=model`` the gradients come from the model-dtype copies
    and the copies are refreshed after each step. The frozen-trunk cache stays
    valid throughout: training never touches a trunk weight; the training
    forwards keep their own states below the first adapted layer
    (``FrozenBelow``).

    Returns ``steps``, ``lr``, ``batch_size``, ``curve`` (one row per
    evaluation: ``step``, ``train_loss`` = mean training loss of the steps
    since the previous row, None at step 0, ``dev_accuracy``, ``dev_loss``),
    ``train_losses`` (every step's batch loss, before its update),
    ``final_dev_accuracy``, ``best_dev_accuracy``, ``best_step``, ``seconds``
    (wall time, evaluations included) and ``train_seconds`` (steps only)."""
    start = time.perf_counter()
    if backend is None:
        from mezo_backend_hf import backend as hf
        backend = hf.HFBackend(cfg)
    batch_size = batch_size or cfg.mezo.batch_size
    task = Task(cfg.task, backend.tokenizer)
    masters, params = backend.trainable_tensors(), adapter_params(backend)
    initial = [t.detach().clone() for t in masters]
    below = FrozenBelow(backend, params)
    curve, losses, train_seconds = [], [], 0.0

    def evaluate(step):
        window = losses[curve[-1]["step"] if curve else 0:step]  # losses[i]: the batch of step i
        row = task.evaluate(backend, cfg.eval_batch_size)
        curve.append({"step": step, "train_loss": sum(window) / len(window) if window else None,
                      "dev_accuracy": row["dev_accuracy"], "dev_loss": row["dev_loss"]})
        log(f"backprop step {step}: train loss {curve[-1]['train_loss']}, "
            f"dev accuracy {row['dev_accuracy']:.4f}, dev loss {row['dev_loss']:.4f}")

    evaluate(0)
    optimizer = torch.optim.Adam(masters, lr=lr)
    try:
        for p in params:
            p.requires_grad_(True)
        for step in range(steps):
            t0 = time.perf_counter()
            with torch.enable_grad():
                loss = objective(backend, task.train_batch(cfg.seed, step, batch_size), below).mean()
                grads = torch.autograd.grad(loss, params)
            for m, g in zip(masters, grads):
                m.grad = g.to(m.dtype)
            optimizer.step()
            with torch.no_grad():
                for p, m in zip(params, masters):
                    if p is not m:
                        p.copy_(m)
            losses.append(float(loss.detach()))
            train_seconds += time.perf_counter() - t0
            if step + 1 < steps and eval_every and (step + 1) % eval_every == 0:
                evaluate(step + 1)
        if steps:
            evaluate(steps)
    finally:
        with torch.no_grad():
            for p, m, init in zip(params, masters, initial):
                m.grad = None
                m.copy_(init)
                p.requires_grad_(False)
                if p is not m:
                    p.copy_(init)
    best = max(curve, key=lambda r: r["dev_accuracy"])
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "curve": curve, "train_losses": losses,
            "final_dev_accuracy": curve[-1]["dev_accuracy"], "best_dev_accuracy": best["dev_accuracy"],
            "best_step": best["step"], "seconds": time.perf_counter() - start, "train_seconds": train_seconds}


def main(argv=None):
    import argparse
    import json
    from mezo_core.config import load_config
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    parser.add_argument("-c", "--config", default="conf/sst2.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the result (JSON) here")
    args = parser.parse_intermixed_args(argv)   # options may stand between the key=value overrides
    cfg = load_config(args.config, args.overrides)
    result = backprop_reference(cfg, args.steps, args.lr, args.eval_every, args.batch_size)
    from .common import environment
    result = {**environment(cfg.model.device), "overrides": args.overrides, **result}
    text = json.dumps({k: v for k, v in result.items() if k != "train_losses"}, indent=1)
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
