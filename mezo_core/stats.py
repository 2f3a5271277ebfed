"""What a backend measured, in one vocabulary for every backend, and the optional
protocol through which it is read: a backend need not count anything.

``Instrumented`` is a capability, not part of ``Backend``: the trainer logs
``stats_of(backend)`` (empty for a backend without counters) and ``per_step`` turns
its cumulative counters into per-step columns.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, Sequence, runtime_checkable

import torch


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


@runtime_checkable
class Instrumented(Protocol):
    """Optional: a backend that counts its work and holds a reuse cache."""

    def stats(self) -> BackendStats:
        """What this backend counted since it was built or since ``reset_stats``."""

    def reset_stats(self) -> None:
        """Start the counters from zero (gauges keep their values)."""

    def reset_cache(self) -> None:
        """Drop every reusable entry (trunk states, KV prefixes): for measurements
        only, as a cache is never stale."""


@runtime_checkable
class HasBaseModel(Protocol):
    """Optional: the losses of the model without its adapter, by a plain forward
    that uses no cache (the baseline a benchmark compares a step with)."""

    def base_losses(self, batch: Sequence) -> torch.Tensor: ...


def stats_of(backend) -> dict[str, float]:
    """The backend's measured values as a flat dict (the metrics log's columns);
    empty for a backend that counts nothing."""
    return backend.stats().as_dict() if isinstance(backend, Instrumented) else {}


#: backend stats that are not counters: no per-step ``_step`` value
GAUGES = ("bytes", "layers_skipped", "adapter_version", "hit_rate", "token_reuse")


def per_step(stats: dict, before: dict) -> dict:
    """The backend's counters (cumulative since the process started, as named) and,
    beside each, ``<name>_step``: what this step alone counted."""
    out = dict(stats)
    for k, v in stats.items():
        if k not in GAUGES and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{k}_step"] = v - before.get(k, 0)
    return out
