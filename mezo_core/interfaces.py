"""The three interfaces plugins implement: Backend, EvictionPolicy, Schedule.

Data flows one way: config -> registry -> backend -> trainer. The trainer only
talks to a backend through ``Backend``'s ten methods (and the optional protocols
``Snapshots`` here and ``stats.Instrumented``), so a backend may keep its model in
another process (vLLM, SGLang) as long as it can apply a seeded perturbation to
its trainable tensors in place (see ``mezo_core.perturb``).
"""
from __future__ import annotations

import abc
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import torch

from .errors import MezoError
from .forwards import Example, Terms, each_direction


def check_option_types(options, prefix: str) -> None:
    """Every field of an options dataclass of the type of its default (``x=maybe``
    for a bool would otherwise count as true; an int is a float). A None default
    leaves the check to the options' own ``__post_init__``."""
    for f in fields(options):
        value, default = getattr(options, f.name), f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()   # e.g. a dict of pass-through engine arguments
        if default is None or default is MISSING:
            continue
        want = type(default)
        ok = (want is float and type(value) is int
              or isinstance(value, want) and (want is bool or not isinstance(value, bool)))
        if not ok:
            raise MezoError(f"config field '{prefix}.{f.name}': expected a {want.__name__} "
                            f"(like the default {default!r}), got {value!r}")


class Backend(abc.ABC):
    """Supplies per-example losses under the current adapter, and moves the
    adapter along seeded random directions: the whole contract a trainer needs.

    Subclasses set ``name`` and ``capabilities`` and are constructed as
    ``cls(cfg, registry)``: the whole run config (an OmegaConf node: ``model``,
    ``lora`` and the section named after the backend, e.g. ``cfg.hf``) and the
    ``mezo_core.registry.Registry`` of the run (eviction policies and other
    plugins come from there, never from a global lookup).

    Optional capabilities live in protocols of their own: counters and caches
    (``mezo_core.stats.Instrumented``), fast copies of the trainable state
    (``Snapshots``; ``snapshot``/``restore`` below fall back to adapter folders).
    """

    name: ClassVar[str]
    #: free-form tags shown by ``mezo-run backends`` (e.g. "cuda", "prefix-cache")
    capabilities: ClassVar[tuple[str, ...]] = ()
    #: the dataclass of the backend's config section (``cfg.<name>``), or None
    options: ClassVar[type | None] = None

    tokenizer: Any  # a transformers tokenizer for the loaded model

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (engine not installed, no GPU), or None."""
        return None

    # -- the forwards --------------------------------------------------------------
    @abc.abstractmethod
    def losses(self, batch: Sequence[Example]) -> torch.Tensor:
        """Per-example mean cross-entropy over target tokens, float64, shape [B]."""

    def choice_losses(self, prompts: Sequence[tuple[int, ...]],
                      choices: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Loss of every choice after every prompt, shape [len(prompts), len(choices)].
        Backends may override this with a faster exact path."""
        batch = [Example(p, c) for p in prompts for c in choices]
        return self.losses(batch).view(len(prompts), len(choices))

    def generate(self, prompts: Sequence[tuple[int, ...]], max_new_tokens: int) -> list[tuple[int, ...]]:
        """Greedy continuations of ``prompts`` under the current adapter, at most
        ``max_new_tokens`` each, ending at (and without) the tokenizer's EOS; used
        for the exact-match metric of completion tasks and the completions of reward
        tasks. A backend that cannot generate keeps this default: evaluation then
        reports the loss only. Reward tasks pass on a step's routing keywords (e.g.
        ``adapters``, one per prompt, as to ``losses``) and, for ``task.samples`` > 1,
        keyword-only ``temperature`` and ``seeds`` (one per prompt: row i samples
        from a generator seeded by ``seeds[i]``); a generate without ``seeds`` is
        told apart and refused for sampling (``rewards.Rewarder``)."""
        raise MezoError(f"backend {getattr(self, 'name', type(self).__name__)!r} cannot generate text")

    def population_losses(self, batch: Sequence[Example], seeds: Sequence[int], eps: float,
                          applied: float = 0.0):
        """L+ and L- of every direction of a step (``forwards.each_direction``):
        ``([(loss_plus, loss_minus), ...], offset)``, ``offset`` the multiple of
        z(seeds[-1]) left on the weights; ``applied`` the multiple of z(seeds[0])
        already on them. The default runs the directions and signs one after another;
        a backend that holds several perturbed states side by side evaluates them in
        one batch or one engine call."""
        return each_direction(self, batch, seeds, eps, applied)

    # -- the trainable state ------------------------------------------------------
    @abc.abstractmethod
    def trainable_names(self) -> list[str]:
        """Canonical PEFT names of the trainable tensors, in z-index order
        (sorted). Tensor i of this list gets z(seed, i) in every backend."""

    @abc.abstractmethod
    def perturb(self, terms: Terms, decay: float = 1.0) -> None:
        """In place: theta <- decay*theta + sum(coef * z(seed)) (one pass)."""

    @abc.abstractmethod
    def save_adapter(self, path: str) -> None:
        """Write the adapter as a PEFT folder (adapter_config.json + safetensors)."""

    @abc.abstractmethod
    def load_adapter(self, path: str) -> None:
        """Load adapter weights written by ``save_adapter`` (used by --resume)."""

    def close(self) -> None:
        """Release engines, processes and device memory."""


@runtime_checkable
class Snapshots(Protocol):
    """Optional: fp32 CPU copies of the trainable tensors by canonical name, taken
    and put back without a trip through files (``LocalTensorsBackend`` has it)."""

    def snapshot(self) -> dict[str, torch.Tensor]: ...

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None: ...


def snapshot(backend: Backend) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the trainable tensors by canonical name: the state the
    convergence guard rolls back to. Through ``save_adapter`` for a backend
    without ``Snapshots``."""
    if isinstance(backend, Snapshots):
        return backend.snapshot()
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as tmp:
        backend.save_adapter(tmp)
        return {n: t.clone() for f in sorted(Path(tmp).glob("*.safetensors"))
                for n, t in load_file(str(f)).items()}


def restore(backend: Backend, state: dict[str, torch.Tensor]) -> None:
    """Set the trainable tensors to a ``snapshot``: through ``load_adapter`` for a
    backend without ``Snapshots`` (a folder of its own layout, tensors replaced)."""
    if isinstance(backend, Snapshots):
        return backend.restore(state)
    from safetensors.torch import load_file, save_file
    with tempfile.TemporaryDirectory() as tmp:
        backend.save_adapter(tmp)
        for f in Path(tmp).glob("*.safetensors"):
            save_file({n: state[n].contiguous() for n in load_file(str(f))}, str(f))
        backend.load_adapter(tmp)


class LocalTensorsBackend(Backend):
    """A Backend whose trainable tensors live in this process: set ``_names``
    (sorted canonical names) and ``_tensors`` (same order), and ``z_dist`` from
    the config (``perturb.configured_dist(cfg)``), and the perturbation plumbing
    is done."""

    _names: list[str]
    _tensors: list[torch.Tensor]
    z_dist: str = "gaussian"   # the distribution of z (``mezo.z``)

    def trainable_names(self) -> list[str]:
        return list(self._names)

    def trainable_tensors(self) -> list[torch.Tensor]:
        return list(self._tensors)

    def perturb(self, terms: Terms, decay: float | Sequence[float] = 1.0, direction=None) -> None:
        """``decay`` (and a term's coefficient) may be one value per trainable
        tensor, in ``trainable_names`` order: weight decay that exempts some.
        ``direction(seed, index, tensor)``: the tensor a term's seed stands for, in
        place of z (an estimator's own directions: masked, preconditioned, low-rank);
        it is then drawn whole, tensor by tensor, not fused."""
        from .perturb import apply_z
        if direction is None:
            return apply_z(self._tensors, terms, decay, dist=self.z_dist)
        decays = decay if isinstance(decay, (list, tuple)) else [decay] * len(self._tensors)
        with torch.no_grad():
            for i, tensor in enumerate(self._tensors):
                if decays[i] != 1.0:
                    tensor.mul_(decays[i])
                for seed, coef in terms:
                    c = coef[i] if isinstance(coef, (list, tuple)) else coef
                    if c:
                        tensor.add_(direction(seed, i, tensor), alpha=c)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in zip(self._names, self._tensors)}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, tensor in zip(self._names, self._tensors):
            tensor.copy_(snapshot[name])


class EvictionPolicy(abc.ABC):
    """Chooses which cache entry to drop when a cache is over its byte budget.
    The cache calls ``insert``/``touch``/``remove`` as entries come and go. A
    policy with ``options`` (a dataclass: its config section, named after it) is
    built as ``cls(options)``, one without as ``cls()``."""

    @abc.abstractmethod
    def insert(self, key: Any, nbytes: int) -> None: ...

    @abc.abstractmethod
    def touch(self, key: Any) -> None: ...

    @abc.abstractmethod
    def remove(self, key: Any) -> None: ...

    @abc.abstractmethod
    def victim(self) -> Any:
        """The key to evict next (must be a key currently held)."""


@dataclass(frozen=True)
class Signals:
    """What a step measured, shown to every schedule before its values for the
    update (lr of this step, eps of the next) are read."""

    step: int                    # 0-based index of the step just measured
    total_steps: int
    eps: float                   # the eps this step's forwards used
    losses_plus: tuple[float, ...]   # per direction, mean over the batch
    losses_minus: tuple[float, ...]
    grads: tuple[float, ...]     # projected gradients (L+ - L-) / (2 eps)
    noise: float | None = None   # forward noise of the loss (Schedule.needs_noise)


class Schedule(abc.ABC):
    """A value over training steps (used for epsilon and for the learning rate).

    ``start`` is the peak value, ``end`` the final one (where the shape has one),
    ``warmup_steps`` ramps linearly from 0 to ``start`` first. A schedule with
    settings declares them as a dataclass, ``options``, and is built as
    ``cls(start, end, warmup_steps, options)`` with the instance the run reads from
    ``mezo.lr_schedule_options`` / ``mezo.eps_schedule_options``; one without as
    ``cls(start, end, warmup_steps)``.

    Adaptive schedules read the run's signals: the trainer calls ``observe`` after
    the forwards of every step, then reads the lr of that step and the eps of the
    next one. Their state must survive a resume: ``state_dict``/``load_state_dict``
    (JSON values)."""

    #: the trainer measures the loss's forward noise once and passes it in Signals
    needs_noise: bool = False
    #: SPSA directions per step the schedule needs (mezo.q)
    min_directions: int = 1
    #: the dataclass of its settings, or None
    options: ClassVar[type | None] = None

    def __init__(self, start: float, end: float | None = None, warmup_steps: int = 0):
        self.start = float(start)
        self.end = float(start if end is None else end)
        self.warmup_steps = int(warmup_steps)

    def observe(self, signals: Signals) -> None:
        """See one step's measurements (fixed schedules ignore them)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.start * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        return self.value(min(1.0, (step - self.warmup_steps) / span))

    @abc.abstractmethod
    def value(self, progress: float) -> float:
        """The value at ``progress`` in [0, 1] after warm-up."""
