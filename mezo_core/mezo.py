"""The MeZO step (Malladi et al. 2023, Algorithm 1) over any Backend.

Per direction i with seed s_i:  theta += eps*z_i; L+;  theta -= 2*eps*z_i; L-;
g_i = (L+ - L-) / (2*eps). The restore of the last direction, weight decay,
the update and -- when the trainer passes ``next_direction`` -- the next
step's +eps'*z' are fused into a single pass over the weights:

    theta <- (1 - lr*wd) * (theta + eps*z_q) - lr/q * sum_i g_i z_i + eps'*z'

so a step with q = 1 reads and writes the weights twice instead of four times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .interfaces import Backend, Example
from .perturb import mix


def direction_seeds(run_seed: int, step: int, q: int) -> list[int]:
    """The z seeds of one step: a pure function of (run seed, step), so a resumed
    run draws exactly the directions of the uninterrupted one."""
    return [mix(run_seed, step, i) for i in range(q)]


@dataclass
class StepResult:
    seeds: list[int]
    grads: list[float]         # projected gradients g_i
    loss_plus: float           # mean over directions and examples
    loss_minus: float
    applied: float = 0.0       # multiple of z(next seed) left on the weights (fused schedule)

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


def mezo_step(backend: Backend, batch: Sequence[Example], seeds: Sequence[int],
              eps: float, lr: float, weight_decay: float = 0.0, reduce=None,
              applied: float = 0.0, next_direction: tuple[int, float] | None = None) -> StepResult:
    """One MeZO update of the backend's trainable tensors; returns what was measured.

    ``reduce`` sums [sum L+, sum L-, count] over data-parallel ranks
    (``distributed.sum_over_ranks``), so every rank takes the same step.
    ``next_direction = (seed, eps)`` of the next step's first direction folds its
    +eps*z into this step's last pass; pass the returned ``applied`` to that step.
    """
    grads, plus, minus = [], [], []
    pairs, offset = backend.population_losses(batch, seeds, eps, applied)
    for loss_plus, loss_minus in pairs:
        sums = [float(loss_plus.sum()), float(loss_minus.sum()), float(len(batch))]
        if reduce is not None:
            sums = reduce(sums)
        lp, lm = sums[0] / sums[2], sums[1] / sums[2]
        grads.append((lp - lm) / (2.0 * eps))
        plus.append(lp)
        minus.append(lm)
    decay = 1.0 - lr * weight_decay
    terms = [(seed, -lr * g / len(seeds)) for seed, g in zip(seeds, grads)]
    if offset:
        terms.append((seeds[-1], -decay * offset))
    if next_direction is not None:
        terms.append(next_direction)
    backend.perturb(terms, decay=decay)
    return StepResult(list(seeds), grads, sum(plus) / len(plus), sum(minus) / len(minus),
                      applied=0.0 if next_direction is None else float(next_direction[1]))
