"""An exponential moving average of the trained weights: what the run evaluates,
selects and saves, while MeZO keeps stepping the raw weights.

With a constant step size SPSA's iterate does not settle: it wanders around a
good region with a spread that grows with the step size, so two evaluations
250 steps apart can differ by several points (SST-2 dev, all layers, lr 1e-3:
84.3 % then 74.2 %, benchmarks/results/accuracy-gpu-devlike-val-*). Averaging
the iterates cancels that wander (Polyak & Juditsky 1992; for SPSA, Spall,
"Introduction to Stochastic Search and Optimization", 2003, sec. 7.7) and costs
no forward pass. The average is taken every ``every`` steps on clean weights,
in fp32 on the CPU:

    avg <- d * avg + (1 - d) * theta,   d = min(0.5 ** (every / half_life), (1 + n) / (10 + n))

``n`` the number of updates so far: the second term (as in TensorFlow's
``ExponentialMovingAverage(num_updates=...)``) keeps the first updates from
being dominated by the starting weights. A pure function of the weights the run
visits, so a resume that restores it continues the same trajectory.

Measured (benchmarks/RESULTS.md, the weight average): on SST-2 with LoRA on every
layer it was within noise of the raw weights (ahead in 3 of 4 pairs at step
2500, behind at 500), so ``mezo.ema_half_life`` stays 0 by default.
"""
from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, half_life: int):
        self.half_life = half_life
        self.every = max(1, half_life // 20)   # ~20 updates per half-life: cheap, and smooth enough
        self.decay = 0.5 ** (self.every / half_life) if half_life else 0.0
        self.updates = 0
        self.tensors: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.half_life > 0

    def due(self, step: int) -> bool:
        """Whether the average takes the weights after ``step`` steps."""
        return self.enabled and step % self.every == 0

    def reset(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Start over from these weights (the run's start, a guard roll-back)."""
        self.tensors = {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in snapshot.items()}

    def update(self, snapshot: dict[str, torch.Tensor]) -> None:
        if self.tensors is None:
            return self.reset(snapshot)
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, avg in self.tensors.items():
            avg.mul_(d).add_(snapshot[name].to(torch.float32), alpha=1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        self.updates = state["updates"]
        self.tensors = tensors
