"""Built-in estimators whose directions are not plain z: preconditioned (hizoo), masked
(sparse), low-rank (lozo). They move the tensors through ``LocalTensorsBackend.perturb
(direction=...)``, so they need a backend holding its tensors in this process (hf)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mezo_core import Estimator, MezoError
from mezo_core.config import setting
from mezo_core.forwards import objective
from mezo_core.mezo import StepResult, batch_means, measured, spsa_coefficients
from mezo_core.perturb import z_like
from mezo_core.philox import mix


@dataclass
class HiZOOOptions:
    alpha: float = setting(1e-4, "how fast the diagonal curvature estimate follows new measurements (0 < "
                                 "alpha < 1)")

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


class HiZOO(Estimator):
    """Two-sided SPSA along directions preconditioned by a diagonal curvature estimate,
    measured from the same forwards plus one at theta (HiZOO: Zhao et al. 2024,
    "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
    Optimizer", arXiv:2402.15173). With D the diagonal estimate (D = 1 at the start),
    s = D^(-1/2) and one direction u per step (mezo.q = 1):

        l_0 = L(theta),  l_+- = L(theta +- eps s*u)
        g = (l_+ - l_-) / (2 eps),   theta <- theta - lr * g * s*u
        h = |l_+ + l_- - 2 l_0| / (2 eps^2),   D <- (1 - alpha) D + alpha * h * D * u^2

    (* elementwise; the curvature update uses this step's u and is applied before the
    next step's forwards, so the update's restore uses the scales its forwards used).
    3 forwards a step. D is the estimator's state: as large as the trainable tensors,
    saved in every checkpoint, so a resume continues bitwise. Needs a backend holding
    its tensors in this process (hf): the scaled z is drawn tensor by tensor."""
    name = "hizoo"
    options = HiZOOOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.curvature = None      # D, one fp32 tensor per trainable tensor
        self.pending = None        # (seed, h) of the last step, folded into D before the next
        self.scales = None         # D^-1/2, derived from D

    def forwards(self, q):
        return 3

    def perturb(self, backend, terms, decay=1.0):
        if self.scales is None:   # s = D^-1/2, kept until D changes (fold_pending)
            self.scales = [d.rsqrt() for d in self.curvature]
        scales = self.scales
        backend.perturb(terms, decay, direction=lambda seed, i, t: z_like(t, seed, i, backend.z_dist).mul_(scales[i]))

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        if len(seeds) != 1 or not hasattr(backend, "trainable_tensors"):
            raise MezoError("mezo.estimator=hizoo needs mezo.q=1 and a backend holding its tensors in this "
                            "process (hf)")
        tensors = backend.trainable_tensors()
        if self.curvature is None:
            self.curvature = [torch.ones_like(t, dtype=torch.float32) for t in tensors]
        self.fold_pending(tensors, backend.z_dist)
        if applied:
            backend.perturb([(seeds[0], -applied)])
        seed = seeds[0]
        l0 = objective(backend, batch)
        self.perturb(backend, [(seed, eps)])
        plus = objective(backend, batch)
        self.perturb(backend, [(seed, -2.0 * eps)])
        minus = objective(backend, batch)
        lp, lm, l0 = batch_means([plus, minus, l0], len(batch), reduce)
        h = abs(lp + lm - 2.0 * l0) / (2.0 * eps * eps)
        self.pending = (int(seed), h) if math.isfinite(h) else None
        return StepResult([seed], [(lp - lm) / (2.0 * eps)], [lp], [lm], offset=-eps)

    def coefficients(self, result, lr):
        return spsa_coefficients(result, lr)

    def fold_pending(self, tensors, dist):
        """D <- (1 - alpha) D + alpha h D u^2 with the last step's (seed, h); the next probe
        does this first, so the update's restore used the scales its forwards used."""
        if self.pending is None:
            return
        seed, h = self.pending
        a = self.opts.alpha
        for i, (t, d) in enumerate(zip(tensors, self.curvature)):
            u = z_like(t, seed, i, dist).to(d.device)
            seen = d * u.square()            # the old D's, before it decays
            d.mul_(1.0 - a).add_(seen, alpha=a * h)
        self.pending, self.scales = None, None

    def state_dict(self):
        out = {"pending": list(self.pending) if self.pending else None}
        if self.curvature is not None:
            out.update({f"curvature.{i}": d for i, d in enumerate(self.curvature)})
        return out

    def load_state_dict(self, state):
        self.pending = tuple(state["pending"]) if state.get("pending") else None
        keys = sorted((k for k in state if k.startswith("curvature.")), key=lambda k: int(k.split(".")[1]))
        self.curvature = [state[k].clone() for k in keys] if keys else None
        self.scales = None


@dataclass
class SparseOptions:
    density: float = setting(0.75, "fraction of each tensor's entries perturbed and moved: those of smallest "
                                   "magnitude (0 < density <= 1)")

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def two_sided(estimator, backend, batch, seeds, eps, reduce=None) -> StepResult:
    """SPSA's forwards along the estimator's own directions (its ``perturb``): each move
    undoes the last direction (-eps) and applies this one (+eps); leaves -eps on the last."""
    pairs, previous = [], None
    for seed in seeds:
        estimator.perturb(backend, ([(previous, eps)] if previous is not None else []) + [(seed, eps)])
        loss_plus = objective(backend, batch)
        estimator.perturb(backend, [(seed, -2.0 * eps)])
        pairs.append((loss_plus, objective(backend, batch)))
        previous = seed
    return measured(pairs, seeds, eps, len(batch), reduce, offset=-eps)


def local_tensors(backend, name: str):
    """The backend's trainable tensors, or a refusal naming the estimator."""
    tensors = getattr(backend, "trainable_tensors", None)
    if tensors is None:
        raise MezoError(f"mezo.estimator={name} needs a backend holding its tensors in this process (hf)")
    return tensors()


class Sparse(Estimator):
    """Two-sided SPSA over directions masked to the small-magnitude weights (Sparse-MeZO:
    Liu et al. 2024, "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order
    LLM Fine-Tuning", arXiv:2402.15751). At the clean weights of each step,

        m = [|theta| <= the density-quantile of |theta|]  (per tensor),
        g_i = (L(theta + eps m*z_i) - L(theta - eps m*z_i)) / (2 eps),  theta <- theta - lr/q sum_i g_i m*z_i

    2q forwards a step. The mask is a function of the weights at the step's start, so a
    resume recomputes it: nothing is stored. Meant for hf.full_params, where large
    weights carry what pre-training learnt; needs a backend holding its tensors (hf)."""
    name = "sparse"
    options = SparseOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.masks = None

    def perturb(self, backend, terms, decay=1.0):
        masks = self.masks
        backend.perturb(terms, decay, direction=lambda seed, i, t: z_like(t, seed, i, backend.z_dist).mul_(masks[i]))

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        tensors = local_tensors(backend, self.name)
        if applied:
            backend.perturb([(seeds[0], -applied)])   # the mask is read at the clean weights
        self.masks = [self.mask(t) for t in tensors]
        return two_sided(self, backend, batch, seeds, eps, reduce)

    def coefficients(self, result, lr):
        return spsa_coefficients(result, lr)

    def mask(self, tensor):
        """1 where |theta| is among the ``density`` smallest of the tensor, else 0."""
        flat = tensor.detach().abs().flatten().float()
        k = max(1, int(round(self.opts.density * flat.numel())))
        threshold = flat.kthvalue(k).values if k < flat.numel() else flat.max()
        return (tensor.detach().abs() <= threshold).to(torch.float32)


@dataclass
class LOZOOptions:
    rank: int = setting(2, "rank r of the perturbation U V^T of every matrix")
    lazy_steps: int = setting(50, "steps that share one V (LOZO's lazy sampling); U is drawn anew every step")

    def __post_init__(self):
        if self.rank < 1 or self.lazy_steps < 1:
            raise ValueError(f"rank and lazy_steps must be >= 1, got {self.rank} and {self.lazy_steps}")


class LOZO(Estimator):
    """Two-sided SPSA along low-rank directions (LOZO: Chen et al. 2024, "Enhancing
    Zeroth-order Fine-tuning for Language Models with Low-rank Structures",
    arXiv:2410.07698). Every matrix W (m x n) of the trainable tensors moves along

        Z = U V^T / sqrt(r),  U (m x r) drawn from the direction's seed every step,
        V (n x r) from a seed kept for ``lazy_steps`` steps;   vectors along plain z,

    with g_i = (L(theta + eps Z_i) - L(theta - eps Z_i)) / (2 eps) and theta <- theta -
    lr/q sum_i g_i Z_i. U and V are the perturbation engine's Gaussian z of (seed, tensor
    index), so every device draws the same; V's seed and its age are the estimator's
    state (two numbers in the checkpoint). 2q forwards a step; meant for hf.full_params
    (the update of a matrix lives in an r-dimensional column space for lazy_steps)."""
    name = "lozo"
    options = LOZOOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.v_seed, self.age = None, 0

    def direction(self, seed, i, tensor):
        from mezo_core.perturb import z_range
        if tensor.dim() != 2:
            return z_like(tensor, seed, i, "gaussian")
        (m, n), r = tensor.shape, self.opts.rank
        u = z_range(seed, i, 0, m * r, tensor.device).view(m, r)
        v = z_range(self.v_seed, i, 0, n * r, tensor.device).view(n, r)
        return (u @ v.T).div_(r ** 0.5).to(tensor.dtype)

    def perturb(self, backend, terms, decay=1.0):
        backend.perturb(terms, decay, direction=self.direction)

    def probe(self, backend, batch, seeds, eps, applied=0.0, reduce=None):
        local_tensors(backend, self.name)
        if applied:
            backend.perturb([(seeds[0], -applied)])
        if self.v_seed is None or self.age % self.opts.lazy_steps == 0:
            self.v_seed = mix(seeds[0], 0x4C4F5A4F)   # a fresh V, a pure function of the step's seeds
        self.age += 1
        return two_sided(self, backend, batch, seeds, eps, reduce)

    def coefficients(self, result, lr):
        return spsa_coefficients(result, lr)

    def state_dict(self):
        return {"v_seed": self.v_seed, "age": self.age}

    def load_state_dict(self, state):
        self.v_seed, self.age = state.get("v_seed"), int(state.get("age", 0))
