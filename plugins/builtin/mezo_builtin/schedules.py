"""Schedules from ``start`` to ``end`` over the steps after warm-up, and adaptive
ones that read the run's signals; an adaptive schedule's settings are its
``options`` dataclass (the run reads them from ``mezo.lr_schedule_options`` /
``mezo.eps_schedule_options``)."""
import math
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

from mezo_core import Schedule
from mezo_core.schema import setting


class Constant(Schedule):
    name = "constant"

    def value(self, progress):
        return self.start


class Linear(Schedule):
    name = "linear"

    def value(self, progress):
        return self.start + (self.end - self.start) * progress


class Cosine(Schedule):
    name = "cosine"

    def value(self, progress):
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * progress))


class Exponential(Schedule):
    """Geometric decay: start * (end/start)**progress (e.g. eps 1e-2 -> 1e-4)."""
    name = "exponential"

    def value(self, progress):
        if self.start <= 0 or self.end <= 0:
            raise ValueError("exponential schedule needs start > 0 and end > 0")
        return self.start * (self.end / self.start) ** progress


# -- adaptive schedules: they read the run's signals (Schedule.observe) -----------------
class _Adaptive(Schedule):
    """Built as ``cls(start, end, warmup_steps, options)`` with an instance of its
    ``options`` dataclass (None: the defaults); each option becomes an attribute, so
    the state (options and what the schedule learnt) is the instance's JSON values."""

    options: ClassVar[type]

    def __init__(self, start, end=None, warmup_steps=0, options=None):
        super().__init__(start, end, warmup_steps)
        options = self.options() if options is None else options
        for f in fields(options):
            setattr(self, f.name, getattr(options, f.name))

    def state_dict(self):
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state):
        vars(self).update(state)

    def value(self, progress):  # the adaptive ones override __call__
        return self.start


@dataclass
class SpallOptions:
    alpha: float = setting(0.602, "decay exponent of the step size a_k (Spall: 0.602)")
    gamma: float = setting(0.101, "decay exponent of the perturbation c_k (Spall: 0.101)")
    stability: float = setting(0.1, "the stability constant A as a fraction of the run's steps (Spall: "
                                    "~10 %)")
    target_step: Optional[float] = setting(None, "calibrate a so that a_0 x the median |g| of the probe steps "
                                                 "is this (null: a_0 = start)")
    probe_steps: int = setting(10, "steps whose |g| calibrate a (with target_step)")

    def __post_init__(self):
        step = self.target_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))):
            raise ValueError(f"target_step: expected a number or null, got {step!r}")


class Spall(_Adaptive):
    """SPSA gain sequences (Spall 1998, "Implementation of the simultaneous
    perturbation algorithm for stochastic optimization", IEEE TAES 34(3)):

        a_k = a / (k + 1 + A)^alpha      (step size, alpha = 0.602)
        c_k = c / (k + 1)^gamma          (perturbation, gamma = 0.101)

    with A = ``stability`` x the run's steps (Spall: ~10 %). As an lr schedule,
    a_0 = ``start`` unless ``target_step`` is given: then ``a`` is calibrated from
    the median |g| of the first ``probe_steps`` steps so that a_0 * |g| =
    target_step (Spall's rule: the first steps should move theta by a chosen
    amount); the probe steps use the uncalibrated a. As an eps schedule, c =
    ``start`` and the decay is c_k."""
    name = "spall"
    options = SpallOptions

    def __init__(self, start, end=None, warmup_steps=0, options=None):
        super().__init__(start, end, warmup_steps, options)
        self.gains = []      # |g| of the probe steps
        self.a = None        # calibrated numerator (None: a_0 = start)

    def observe(self, signals):
        if self.target_step is not None and self.a is None:
            self.gains.append(sum(abs(g) for g in signals.grads) / len(signals.grads))
            if len(self.gains) >= self.probe_steps:
                median = sorted(self.gains)[len(self.gains) // 2]
                self.a = float(self.target_step) / max(median, 1e-12)  # a_0 in units of the start

    def __call__(self, step, total_steps):
        big_a = self.stability * total_steps
        a0 = self.start if self.a is None else self.a
        return a0 * ((1 + big_a) / (step + 1 + big_a)) ** self.alpha

    def eps_at(self, step):
        return self.start / (step + 1) ** self.gamma


class SpallEps(Spall):
    """``spall`` for eps: c_k = c / (k + 1)^gamma (see Spall)."""
    name = "spall_eps"

    def __call__(self, step, total_steps):
        return self.eps_at(step)


@dataclass
class NoiseFloorOptions:
    ratio: float = setting(10.0, "|L+ - L-| kept at >= ratio x the forward's noise sigma")
    window: int = setting(20, "steps whose median |g| sets eps")
    max_eps: float = setting(0.1, "the largest eps it sets")


class NoiseFloor(_Adaptive):
    """eps kept where |L+ - L-| stands clearly above the noise of the forward.

    The trainer measures the noise sigma of the loss once (the same batch twice,
    rows in another order: in bf16 the kernels round differently); the projected
    gradient g = (L+ - L-) / (2 eps) says how the difference scales with eps, so

        eps_k = clip(max(start, ratio * sigma / (2 * median|g|)), start, max_eps)

    over the last ``window`` steps: |L+ - L-| ~ 2 eps |g| >= ratio * sigma. In fp32
    sigma is ~0 and eps stays at ``start``; in bf16 it rises as the gradient
    shrinks late in training, where a fixed eps would measure rounding noise
    (MeZO's appendix discusses the eps floor; cf. Spall's c_k >= noise advice)."""
    name = "noise_floor"

    needs_noise = True
    options = NoiseFloorOptions

    def __init__(self, start, end=None, warmup_steps=0, options=None):
        super().__init__(start, end, warmup_steps, options)
        self.recent = []
        self.eps = self.start

    def observe(self, signals):
        self.recent = (self.recent + [sum(abs(g) for g in signals.grads) / len(signals.grads)])[-self.window:]
        median = sorted(self.recent)[len(self.recent) // 2]
        sigma = signals.noise or 0.0
        wanted = self.ratio * sigma / (2.0 * max(median, 1e-12))
        self.eps = min(max(self.start, wanted), self.max_eps)

    def __call__(self, step, total_steps):
        return self.eps


@dataclass
class FZOOOptions:
    delta: float = setting(1e-8, "added to the spread of the projected gradients (no division by 0)")


class FZOO(_Adaptive):
    """Step normalised by the spread of the q projected gradients (FZOO: Dang et
    al. 2025, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language
    Models towards Adam-Scale Speed", arXiv:2506.09034, which divides the update
    by the standard deviation of the perturbed losses):

        lr_k = start / (std_i(g_i) + delta)

    so the move per direction is ~start whatever the loss scale. Needs mezo.q >= 2."""
    name = "fzoo"

    min_directions = 2
    options = FZOOOptions

    def __init__(self, start, end=None, warmup_steps=0, options=None):
        super().__init__(start, end, warmup_steps, options)
        self.scale = 1.0

    def observe(self, signals):
        g = signals.grads
        mean = sum(g) / len(g)
        std = (sum((x - mean) ** 2 for x in g) / (len(g) - 1)) ** 0.5
        self.scale = 1.0 / (std + self.delta)

    def __call__(self, step, total_steps):
        return Schedule.__call__(self, step, total_steps) * self.scale


@dataclass
class RMSOptions:
    beta: float = setting(0.99, "decay of the running second moment of g")
    delta: float = setting(1e-8, "added to its root (no division by 0)")


class RMS(_Adaptive):
    """A memory-free adaptive step: one running scalar second moment of the
    projected gradient (Adam's v for a single number; cf. ZO-AdaMU / the scalar
    "ZO-RMSprop" of Jiang et al. 2024, "ZO-AdaMU Optimizer", AAAI):

        v_k = beta v_{k-1} + (1 - beta) mean_i g_i^2,   lr_k = start / (sqrt(v_k / (1 - beta^(k+1))) + delta)

    A projected gradient that grows (a run heading for a sharper region) shrinks
    the step in proportion; no per-parameter state, so MeZO keeps its memory."""
    name = "rms"
    options = RMSOptions

    def __init__(self, start, end=None, warmup_steps=0, options=None):
        super().__init__(start, end, warmup_steps, options)
        self.v, self.seen = 0.0, 0

    def observe(self, signals):
        self.v = self.beta * self.v + (1 - self.beta) * sum(g * g for g in signals.grads) / len(signals.grads)
        self.seen += 1

    def __call__(self, step, total_steps):
        base = Schedule.__call__(self, step, total_steps)
        if not self.seen:
            return 0.0
        return base / ((self.v / (1 - self.beta ** self.seen)) ** 0.5 + self.delta)
