"""The MeZO step (Malladi et al. 2023, Algorithm 1) over any Backend.

Per direction i with seed s_i:  theta += eps*z_i; L+;  theta -= 2*eps*z_i; L-;
g_i = (L+ - L-) / (2*eps). The restore of the last direction, weight decay,
the update and -- when the trainer passes ``next_direction`` -- the next
step's +eps'*z' are fused into a single pass over the weights:

    theta <- (1 - lr*wd) * theta - lr/q * sum_i g_i z_i + eps'*z'

(theta the clean weights; tensors named in ``mezo.weight_decay_exempt`` keep 1
in place of 1 - lr*wd), so a step with q = 1 reads and writes the weights twice
instead of four times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .forwards import Example
from .interfaces import Backend
from .philox import mix


def direction_seeds(run_seed: int, step: int, q: int) -> list[int]:
    """The z seeds of one step: a pure function of (run seed, step), so a resumed
    run draws exactly the directions of the uninterrupted one."""
    return [mix(run_seed, step, i) for i in range(q)]


@dataclass
class StepResult:
    """What one step measured. ``offset`` is the multiple of z(seeds[-1]) still on
    the weights after the forwards (the update folds its restore in); ``applied``
    the multiple of z(next seed) left on them after the update (fused schedule)."""
    seeds: list[int]
    grads: list[float]         # projected gradients g_i
    losses_plus: list[float]   # per direction, mean over examples
    losses_minus: list[float]
    offset: float = 0.0
    applied: float = 0.0

    @property
    def loss_plus(self) -> float:
        return sum(self.losses_plus) / len(self.losses_plus)

    @property
    def loss_minus(self) -> float:
        return sum(self.losses_minus) / len(self.losses_minus)

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (*self.grads, *self.losses_plus, *self.losses_minus))


def batch_means(losses, count: int, reduce=None) -> list[float]:
    """The mean of each per-example loss tensor over the whole batch: their sums and the
    row ``count``, summed over data-parallel ranks by ``reduce``
    (``distributed.sum_over_ranks``) so that every rank measures the same step."""
    sums = [float(loss.sum()) for loss in losses] + [float(count)]
    if reduce is not None:
        sums = reduce(sums)
    return [s / sums[-1] for s in sums[:-1]]


def measured(pairs, seeds: Sequence[int], eps: float, count: int, reduce=None, offset: float = 0.0) -> StepResult:
    """A step's result from the (L+, L-) loss tensors of each direction: the means and
    the projected gradients (L+ - L-) / (2 eps)."""
    grads, plus, minus = [], [], []
    for loss_plus, loss_minus in pairs:
        lp, lm = batch_means([loss_plus, loss_minus], count, reduce)
        grads.append((lp - lm) / (2.0 * eps))
        plus.append(lp)
        minus.append(lm)
    return StepResult(list(seeds), grads, plus, minus, offset=offset)


def probe(backend: Backend, batch: Sequence[Example], seeds: Sequence[int], eps: float,
          reduce=None, applied: float = 0.0) -> StepResult:
    """The forwards of a step: L+ and L- of every direction and the projected gradients.

    ``reduce`` sums [sum L+, sum L-, count] over data-parallel ranks
    (``distributed.sum_over_ranks``), so every rank measures the same gradient.
    ``applied``: the multiple of z(seeds[0]) already on the weights.
    """
    pairs, offset = backend.population_losses(batch, seeds, eps, applied)
    return measured(pairs, seeds, eps, len(batch), reduce, offset)


def spsa_coefficients(result: StepResult, lr: float) -> list[float]:
    """SPSA's update: -lr/q * g_i of each direction."""
    return [-lr * g / len(result.seeds) for g in result.grads]


def decayed(names: Sequence[str], exempt: Sequence[str]) -> list[bool]:
    """Which tensors weight decay applies to: not those whose name contains one of
    ``exempt`` (``mezo.weight_decay_exempt``; MeZO's reference spares biases and
    layer norms, which decay would pull towards 0 rather than regularise)."""
    return [not any(pattern in name for pattern in exempt) for name in names]


def update(backend: Backend, result: StepResult, lr: float, weight_decay: float = 0.0,
           next_direction: tuple[int, float] | None = None, decay_mask: Sequence[bool] | None = None,
           coefficients: Sequence[float] | None = None, perturb=None) -> float:
    """theta <- decay*(theta - offset*z_q) - lr/q * sum g_i z_i [+ eps'*z'] in one pass
    (theta here carries offset*z_q; decay = 1 - lr*wd applies to the clean weights).

    ``lr = 0`` (a step the trainer rejects) only restores theta: no gradient term,
    no decay, so a non-finite g never touches the weights.
    ``next_direction = (seed, eps)`` of the next step's first direction folds its
    +eps*z into this pass; returns the multiple of it left applied.
    ``decay_mask``: per trainable tensor, whether it decays (``decayed``; None: all).
    ``coefficients``: the multiple of each z(seed) the step moves (an estimator's
    ``coefficients``); None: SPSA's -lr/q * g_i. ``perturb``: how the pass is applied
    (an estimator's ``perturb``); None: ``backend.perturb``.
    """
    decay = 1.0 - lr * weight_decay
    if decay != 1.0 and decay_mask is not None and not all(decay_mask):
        decay = [decay if d else 1.0 for d in decay_mask]   # per tensor, restore term too
    if coefficients is None:
        coefficients = spsa_coefficients(result, lr)
    terms = list(zip(result.seeds, coefficients)) if lr else []
    if result.offset:
        restore = ([-d * result.offset for d in decay] if isinstance(decay, list)
                   else -decay * result.offset)
        terms.append((result.seeds[-1], restore))
    if next_direction is not None:
        terms.append(next_direction)
    (perturb or backend.perturb)(terms, decay=decay)
    result.applied = 0.0 if next_direction is None else float(next_direction[1])
    return result.applied


def mezo_step(backend: Backend, batch: Sequence[Example], seeds: Sequence[int],
              eps: float, lr: float, weight_decay: float = 0.0, reduce=None,
              applied: float = 0.0, next_direction: tuple[int, float] | None = None,
              decay_mask: Sequence[bool] | None = None) -> StepResult:
    """One MeZO update of the backend's trainable tensors (``probe`` then ``update``);
    returns what was measured. Pass the returned ``applied`` to the next step."""
    result = probe(backend, batch, seeds, eps, reduce, applied)
    update(backend, result, lr, weight_decay, next_direction, decay_mask)
    return result
