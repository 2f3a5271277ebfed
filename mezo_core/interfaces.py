"""The three interfaces plugins implement: Backend, EvictionPolicy, Schedule.

Data flows one way: config -> registry -> backend -> trainer. The trainer only
talks to a backend through the methods below, so a backend may keep its model in
another process (vLLM, SGLang) as long as it can apply a seeded perturbation to
its trainable tensors in place (see ``mezo_core.perturb``).
"""
from __future__ import annotations

import abc
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from .errors import MezoError


@dataclass(frozen=True)
class Example:
    """One scored sequence: the loss is the mean cross-entropy of ``target_ids``
    given ``prompt_ids`` (prompt tokens are context only)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    #: classification (the verbalizer's words, shared by every row) and multiple choice
    #: (the row's own candidates): the candidate completions; the loss MeZO minimises is
    #: then the cross-entropy of ``target_ids`` among them (MeZO's train_as_classification)
    choices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if not self.target_ids or not self.prompt_ids:
            raise ValueError("an Example needs at least one prompt token and one target token")
        if self.choices is not None and self.target_ids not in self.choices:
            raise ValueError("Example target must be one of its choices")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass(frozen=True)
class BackendStats:
    """What a backend counted since it was built or since ``reset_stats``, in
    one vocabulary for every backend (None: this backend does not measure it).
    The reuse cache is the hf backend's frozen-trunk cache or an engine's prefix
    (radix) KV cache. ``bytes``, ``layers_skipped`` and ``adapter_version`` are
    gauges (a value now); every other number is a counter."""

    # -- the forwards
    forward_tokens: int | None = None       # tokens the model's forwards ran over (hf)
    prefix_tokens_saved: int | None = None  # prompt tokens not recomputed thanks to hf.prefix_sharing (hf)
    requests: int | None = None             # requests sent to the engine (vllm, sglang)
    computed_tokens: int | None = None      # tokens the engine computed: uncached prompt tokens + decode steps (vllm)
    target_tokens: int | None = None        # target tokens scored (sglang)
    generate_calls: int | None = None       # engine generate() calls (sglang)
    generate_s: float | None = None         # seconds spent in them (sglang)
    primed_batches: int | None = None       # batches whose shared prefix was sent ahead (sglang.prime_min_tokens)
    # -- the reuse cache
    lookups: int | None = None              # rows (hf) or requests (engines) looked up in the cache
    hits: int | None = None                 # lookups served from it (hf: the whole row; engines: any prefix)
    tokens_looked_up: int | None = None     # tokens of those lookups (engines: prompt tokens)
    tokens_reused: int | None = None        # of which served from the cache (engines: cached prompt tokens)
    evictions: int | None = None            # entries dropped for the byte budget (hf)
    invalidations: int | None = None        # cache emptied because a frozen weight changed (hf)
    bytes: int | None = None                # gauge: bytes the cache holds (hf)
    layers_skipped: int | None = None       # gauge: decoder layers a cached row skips (hf: k0)
    # -- the adapter inside an engine
    adapter_version: int | None = None      # gauge: versions of the adapter the engine has seen (vllm, sglang)
    adapter_loads: int | None = None        # adapter versions loaded into the engine (sglang)
    adapter_unloads: int | None = None      # and unloaded from it (sglang)
    adapter_load_s: float | None = None     # seconds spent loading and unloading (sglang)
    adapter_writes: int | None = None       # in-place writes of seeded perturbations into engine slots (sglang)
    adapter_write_s: float | None = None    # seconds spent in them, round trips included (sglang)

    @property
    def hit_rate(self) -> float | None:
        """hits / lookups (0.0 before any lookup; None without a cache)."""
        return None if self.lookups is None else self.hits / self.lookups if self.lookups else 0.0

    @property
    def token_reuse(self) -> float | None:
        """tokens_reused / tokens_looked_up (0.0 before any lookup; None without a cache)."""
        if self.tokens_looked_up is None:
            return None
        return self.tokens_reused / self.tokens_looked_up if self.tokens_looked_up else 0.0

    def as_dict(self) -> dict[str, float]:
        """The measured values, hit_rate and token_reuse included: the metrics log's columns."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.lookups is not None:
            out.update(hit_rate=self.hit_rate, token_reuse=self.token_reuse)
        return out


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


# A perturbation: theta <- decay * theta + sum(coef * z(seed)) over the terms.
Terms = Sequence[tuple[int, float]]


class Backend(abc.ABC):
    """Supplies per-example losses under the current adapter, and moves the
    adapter along seeded random directions.

    Subclasses set ``name`` and ``capabilities`` and are constructed as
    ``cls(cfg, registry)``: the whole run config (an OmegaConf node: ``model``,
    ``lora`` and the section named after the backend, e.g. ``cfg.hf``) and the
    ``mezo_core.registry.Registry`` of the run (eviction policies and other
    plugins come from there, never from a global lookup).
    """

    name: ClassVar[str]
    #: free-form tags shown by ``mezo-run backends`` (e.g. "cuda", "prefix-cache")
    capabilities: ClassVar[tuple[str, ...]] = ()
    #: the dataclass of the backend's config section (``cfg.<name>``), or None
    options: ClassVar[type | None] = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (engine not installed, no GPU), or None."""
        return None

    tokenizer: Any  # a transformers tokenizer for the loaded model

    @abc.abstractmethod
    def trainable_names(self) -> list[str]:
        """Canonical PEFT names of the trainable tensors, in z-index order
        (sorted). Tensor i of this list gets z(seed, i) in every backend."""

    @abc.abstractmethod
    def perturb(self, terms: Terms, decay: float = 1.0) -> None:
        """In place: theta <- decay*theta + sum(coef * z(seed)) (one pass)."""

    @abc.abstractmethod
    def losses(self, batch: Sequence[Example]) -> torch.Tensor:
        """Per-example mean cross-entropy over target tokens, float64, CPU, shape [B]."""

    def plus_minus_losses(self, batch: Sequence[Example], seed: int, eps: float, applied: float = 0.0):
        """L+ and L- of one SPSA direction.

        ``applied`` is the multiple of z(seed) already on the weights (the
        previous step's last pass may have applied +eps*z: ``mezo_step``'s
        fused schedule). Returns ``(loss_plus, loss_minus, offset)`` where
        ``offset`` is the multiple of z(seed) left applied on return, so the
        trainer can fuse the restore into the update. The plain sequence
        leaves the weights at theta - eps*z (offset = -eps); a backend that
        evaluates both signs side by side may return offset 0.
        """
        if eps != applied:
            self.perturb([(seed, eps - applied)])
        loss_plus = self.objective(batch)
        self.perturb([(seed, -2.0 * eps)])
        loss_minus = self.objective(batch)
        return loss_plus, loss_minus, -eps

    def population_losses(self, batch: Sequence[Example], seeds: Sequence[int], eps: float,
                          applied: float = 0.0):
        """L+ and L- of every direction of a step.

        ``applied``: the multiple of z(seeds[0]) already on the weights.
        Returns ``([(loss_plus, loss_minus), ...], offset)`` with ``offset`` the
        multiple of z(seeds[-1]) left applied to the weights. The default runs
        the directions one after another; a backend that can hold several
        perturbed states side by side evaluates them in one batch.
        """
        pairs, offset = [], 0.0
        for i, seed in enumerate(seeds):
            if offset:
                self.perturb([(seeds[i - 1], -offset)])  # restore before the next direction
            loss_plus, loss_minus, offset = self.plus_minus_losses(batch, seed, eps, applied if i == 0 else 0.0)
            pairs.append((loss_plus, loss_minus))
        return pairs, offset

    def objective(self, batch: Sequence[Example]) -> torch.Tensor:
        """The per-example losses MeZO minimises: ``losses`` for plain examples;
        for examples with ``choices``, the cross-entropy of the gold choice over
        the choices, each scored by its mean token loss (MeZO's length-normalised
        score, the one its evaluation ranks candidates by).

        A batch that shares one set of choices (a verbalizer) scores them with
        ``choice_losses``. Rows with candidates of their own (multiple-choice
        tasks) are scored by ``losses`` in one pass per candidate index, each
        over all rows of the batch: every pass keeps the batch's rows in order,
        so the per-row routing of a side-by-side batch (``BoundForwards``'
        adapters: ``hf.pm_batch``, vLLM's paired signs) still fits its rows."""
        with_choices = [e.choices is not None for e in batch]
        if not any(with_choices):
            return self.losses(batch)
        if not all(with_choices):
            raise ValueError("a batch mixes examples with and without choices")
        choices = batch[0].choices
        if all(e.choices == choices for e in batch):
            scores = self.choice_losses([e.prompt_ids for e in batch], choices)
            gold = torch.tensor([choices.index(e.target_ids) for e in batch], device=scores.device)
            return torch.nn.functional.cross_entropy(-scores, gold, reduction="none")
        width = max(len(e.choices) for e in batch)
        passes = []
        for j in range(width):  # a row with fewer candidates repeats its last one, masked below
            passes.append(self.losses([Example(e.prompt_ids, e.choices[min(j, len(e.choices) - 1)])
                                       for e in batch]))
        scores = torch.stack(passes, 1)
        device = scores.device  # the hf backend keeps a step's losses on its device
        n_choices = torch.tensor([len(e.choices) for e in batch], device=device)
        scores = scores.masked_fill(torch.arange(width, device=device)[None, :] >= n_choices[:, None], float("inf"))
        gold = torch.tensor([e.choices.index(e.target_ids) for e in batch], device=device)
        return torch.nn.functional.cross_entropy(-scores, gold, reduction="none")

    def generate(self, prompts: Sequence[tuple[int, ...]], max_new_tokens: int) -> list[tuple[int, ...]]:
        """Greedy continuations of ``prompts`` under the current adapter, at most
        ``max_new_tokens`` each, ending at (and without) the tokenizer's EOS; used
        for the exact-match metric of completion tasks. A backend that cannot
        generate keeps this default: evaluation then reports the loss only."""
        raise MezoError(f"backend {getattr(self, 'name', type(self).__name__)!r} cannot generate text")

    def choice_losses(self, prompts: Sequence[tuple[int, ...]],
                      choices: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Loss of every choice after every prompt, shape [len(prompts), len(choices)].
        Backends may override this with a faster exact path."""
        batch = [Example(p, c) for p in prompts for c in choices]
        return self.losses(batch).view(len(prompts), len(choices))

    def stats(self) -> BackendStats:
        """What this backend counted (see BackendStats); nothing by default."""
        return BackendStats()

    def get_stats(self) -> dict[str, float]:
        """``stats()`` as a flat dict of the measured values (the metrics log's columns)."""
        return self.stats().as_dict()

    def reset_stats(self) -> None:
        """Start the counters of ``stats()`` from zero (gauges keep their values)."""

    def reset_cache(self) -> None:
        """Drop every reusable entry (trunk states, KV prefixes): for
        measurements only, as a cache is never stale."""

    def base_losses(self, batch: Sequence[Example]) -> torch.Tensor:
        """``losses`` of the model without its trained adapter, by a plain forward
        that uses no cache: the baseline a benchmark compares a step with."""
        raise NotImplementedError(f"backend {self.name!r} does not evaluate the base model alone")

    @abc.abstractmethod
    def save_adapter(self, path: str) -> None:
        """Write the adapter as a PEFT folder (adapter_config.json + safetensors)."""

    @abc.abstractmethod
    def load_adapter(self, path: str) -> None:
        """Load adapter weights written by ``save_adapter`` (used by --resume)."""

    def close(self) -> None:
        """Release engines, processes and device memory."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copies of the trainable tensors by canonical name: the state the
        convergence guard rolls back to. The default goes through ``save_adapter``,
        so any backend has it; backends holding the tensors locally copy them."""
        from safetensors.torch import load_file
        with tempfile.TemporaryDirectory() as tmp:
            self.save_adapter(tmp)
            return {n: t.clone() for f in sorted(Path(tmp).glob("*.safetensors"))
                    for n, t in load_file(str(f)).items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Set the trainable tensors to a ``snapshot`` (through ``load_adapter`` by default:
        a folder of this backend's own layout, its tensors replaced)."""
        from safetensors.torch import load_file, save_file
        with tempfile.TemporaryDirectory() as tmp:
            self.save_adapter(tmp)
            for f in Path(tmp).glob("*.safetensors"):
                save_file({n: snapshot[n].contiguous() for n in load_file(str(f))}, str(f))
            self.load_adapter(tmp)


class BoundForwards:
    """A backend's ``losses``/``choice_losses`` with keyword arguments bound
    (e.g. per-example ``adapters`` of a side-by-side batch), so that
    ``Backend.objective``, which knows nothing of them, runs over that batch:
    the routing travels as arguments, never as state on the backend."""

    objective = Backend.objective

    def __init__(self, backend: Backend, **kwargs):
        self.backend, self.kwargs = backend, kwargs

    def losses(self, batch):
        return self.backend.losses(batch, **self.kwargs)

    def choice_losses(self, prompts, choices):
        return self.backend.choice_losses(prompts, choices, **self.kwargs)


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

    def perturb(self, terms: Terms, decay: float | Sequence[float] = 1.0) -> None:
        """``decay`` (and a term's coefficient) may be one value per trainable
        tensor, in ``trainable_names`` order: weight decay that exempts some."""
        from .perturb import apply_z
        apply_z(self._tensors, terms, decay, dist=self.z_dist)

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
    ``warmup_steps`` ramps linearly from 0 to ``start`` first. ``options`` are the
    schedule's own settings (``mezo.lr_schedule_options`` / ``eps_schedule_options``).

    Adaptive schedules read the run's signals: the trainer calls ``observe`` after
    the forwards of every step, then reads the lr of that step and the eps of the
    next one. Their state must survive a resume: ``state_dict``/``load_state_dict``
    (JSON values)."""

    #: the trainer measures the loss's forward noise once and passes it in Signals
    needs_noise: bool = False
    #: SPSA directions per step the schedule needs (mezo.q)
    min_directions: int = 1

    def __init__(self, start: float, end: float | None = None, warmup_steps: int = 0, **options):
        self.start = float(start)
        self.end = float(start if end is None else end)
        self.warmup_steps = int(warmup_steps)
        if options:
            raise ValueError(f"unknown option {sorted(options)[0]!r} (this schedule takes none)")

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
