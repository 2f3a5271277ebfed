"""Built-in estimators: how a step's forward passes become an update direction."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mezo_core import Estimator
from mezo_core.config import setting
from mezo_core.forwards import holds_side_by_side, objective, one_sided
from mezo_core.mezo import StepResult, batch_means, probe, spsa_coefficients


class SPSA(Estimator):
    """Two-sided SPSA over q directions (MeZO: Malladi et al. 2023, "Fine-Tuning
    Language Models with Just Forward Passes", Algorithm 1):

        g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps),   theta <- theta - lr/q * sum_i g_i z_i

    2q forwards a step, both signs of a direction side by side where the backend
    can (``Backend.population_losses``)."""
    name = "mezo"
    fuses_next = True

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        return probe(backend, batch, seeds, eps, reduce=reduce, applied=applied)

    def coefficients(self, result, lr):
        return spsa_coefficients(result, lr)


@dataclass
class FZOOOptions:
    delta: float = setting(1e-8, "added to the spread of the perturbed losses (no division by 0)")


class FZOO(Estimator):
    """Batched one-sided estimate with a step normalised by the spread of the
    perturbed losses (FZOO: Dang et al. 2025, "FZOO: Fast Zeroth-Order Optimizer for
    Fine-Tuning Large Language Models towards Adam-Scale Speed", arXiv:2506.09034):

        l_0 = L(theta),  l_i = L(theta + eps u_i)  (i = 1..N, N = mezo.q),
        sigma = std_i(l_i),   theta <- theta - lr / (N (sigma + delta)) * sum_i (l_i - l_0) u_i

    N + 1 forwards a step (MeZO's two-sided step over q directions takes 2q). As
    (l_i - l_0) / sigma is dimensionless, every coordinate moves about lr whatever
    the loss scale (normalised SGD; the paper's "Adam-scale" steps): its mezo.lr is
    an Adam-like learning rate, not MeZO's. The paper draws Rademacher u_i:
    ``mezo.z=rademacher``. Logged: loss_plus = mean_i l_i, loss_minus = l_0, and
    g_i = (l_i - l_0) / eps. A backend that holds N + 1 states side by side (hf with
    hf.pm_batch, the engines' adapter slots) evaluates them in one call."""
    name = "fzoo"
    options = FZOOOptions
    min_directions = 2   # a spread needs two perturbed losses

    def forwards(self, q):
        return q + 1

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        if applied:
            backend.perturb([(seeds[0], -applied)])   # l_0 is measured at theta itself
        if holds_side_by_side(backend, len(seeds) + 1):   # theta and every perturbed state in one call
            losses, offset = backend.state_losses(batch, [[]] + [[(seed, eps)] for seed in seeds]), 0.0
        else:
            losses, offset = [objective(backend, batch)] + one_sided(backend, batch, seeds, eps), eps
        l0, *perturbed = batch_means(losses, len(batch), reduce)
        return StepResult(list(seeds), [(li - l0) / eps for li in perturbed], perturbed,
                          [l0] * len(perturbed), offset=offset)

    def coefficients(self, result, lr):
        l0, perturbed = result.losses_minus[0], result.losses_plus
        n = len(perturbed)
        mean = sum(perturbed) / n
        sigma = math.sqrt(sum((li - mean) ** 2 for li in perturbed) / (n - 1))
        return [-lr * (li - l0) / (n * (sigma + self.opts.delta)) for li in perturbed]


@dataclass
class ESOptions:
    normalize: str = setting("zscore", "how a population's rewards are normalised: zscore (minus the mean, over "
                                       "the standard deviation) or rank (centred ranks in [-0.5, 0.5])")
    antithetic: bool = setting(True, "evaluate both signs of every direction (2q forwards, the engines run each "
                                     "pair in one call) rather than theta + eps z alone (q forwards)")

    def __post_init__(self):
        if self.normalize not in ("zscore", "rank"):
            raise ValueError(f"normalize must be 'zscore' or 'rank', got {self.normalize!r}")


def normalized(values: list[float], how: str) -> list[float]:
    """z-scores (0 for a population without spread) or centred ranks in [-0.5, 0.5]
    (ties share their mean rank) of ``values``."""
    n = len(values)
    if how == "rank":
        order = sorted(range(n), key=lambda i: values[i])
        ranks = [0.0] * n
        i = 0
        while i < n:
            j = i
            while j + 1 < n and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranks[order[k]] = (i + j) / 2
            i = j + 1
        return [r / (n - 1) - 0.5 for r in ranks]
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


class ES(Estimator):
    """Evolution strategies over a population of q directions, rewards normalised across
    the population (OpenAI-ES, Salimans et al. 2017; "Evolution Strategies at Scale",
    Qiu et al. 2025, who fine-tune LLMs this way from rewards). The reward of a state is
    minus its loss (for reward tasks: the mean reward of its completions):

        antithetic:  R+_i = -L(theta + eps z_i), R-_i = -L(theta - eps z_i), normalised together,
                     theta <- theta + lr / (2q) * sum_i (R~+_i - R~-_i) z_i
        one-sided:   R_i = -L(theta + eps z_i), normalised,  theta <- theta + lr / q * sum_i R~_i z_i

    Normalising makes the step independent of the reward's scale and robust to outliers
    (rank). Logged g_i: (L+ - L-) / (2 eps) as for MeZO (one-sided: L_i / eps, and
    loss_minus repeats loss_plus)."""
    name = "es"
    options = ESOptions
    min_directions = 2   # a population needs a spread

    @property
    def fuses_next(self):
        return self.opts.antithetic   # its probe then starts at theta + eps z(seeds[0]), as MeZO's

    def forwards(self, q):
        return 2 * q if self.opts.antithetic else q

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        if self.opts.antithetic:
            return probe(backend, batch, seeds, eps, reduce=reduce, applied=applied)
        if applied:
            backend.perturb([(seeds[0], -applied)])
        means = batch_means(one_sided(backend, batch, seeds, eps), len(batch), reduce)
        # no second sign: loss_minus repeats loss_plus, so the logged loss is the population's mean
        return StepResult(list(seeds), [m / eps for m in means], means, list(means), offset=eps)

    def coefficients(self, result, lr):
        q = len(result.seeds)
        if not self.opts.antithetic:
            rewards = normalized([-loss for loss in result.losses_plus], self.opts.normalize)
            return [lr * r / q for r in rewards]
        rewards = normalized([-loss for loss in result.losses_plus + result.losses_minus], self.opts.normalize)
        return [lr * (rewards[i] - rewards[q + i]) / (2 * q) for i in range(q)]
