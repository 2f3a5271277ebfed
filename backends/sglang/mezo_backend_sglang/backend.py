"""SGLang forward passes for MeZO, with LoRA and RadixAttention's prefix cache.

The engine (``sglang.Engine``) runs the model in its own processes. The driver
keeps the trainable state: an fp32 copy of the LoRA tensors in PEFT layout, on
``model.device`` (CUDA), so that ``perturb`` regenerates exactly the z of the
hf backend (``mezo_core.perturb`` draws z on the tensor's device). How the
engine follows it (``sglang.adapter_transport``: seeds to the scheduler's
adapter slots in place, or a new adapter version per change) is
``transport.py``.

Losses come from ``generate(input_ids, return_logprob=True,
logprob_start_len=len(prompt) - 1, max_new_tokens=1)``: the engine returns the
log-probabilities of the input tokens from ``logprob_start_len`` on (the first
entry is ``None``: nothing predicts the token at that position), i.e. of every
target token. The radix cache reuses a cached prefix only up to
``logprob_start_len``, so this start is also the longest prefix that can be
shared between examples (a few-shot context, a classification template).

Generation (reward tasks, the exact match of completion tasks): ``generate``
(``generation.py``) sends the completions of both signs in one call through the
same adapter names, the samples of a prompt reading its KV from the radix cache.

Options: the ``sglang`` section of the run config is ``SGLangOptions``
(``options.py``).
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from typing import Any, Callable, ClassVar, Sequence

import torch

from mezo_core import Example, LocalTensorsBackend, MezoError
from mezo_core.config import options_from
from mezo_core.engine_state import SlotStates
from mezo_core.stats import BackendStats
from mezo_core.adapter import (adapter_shapes, check_adapter_tensors, initial_adapter, read_peft_adapter,
                               write_peft_adapter)
from mezo_core.models import dtype_name, resolve_model_dir
from mezo_core.perturb import configured_dist

from .generation import generate
from .options import SGLangOptions, radix_eviction_policy
from .transport import AdapterTransport, lora_config_dict

#: what ``stats()`` counts (BackendStats' names): one lookup per request, a hit
#: when any prompt token was cached
COUNTERS = ("lookups", "hits", "tokens_reused", "tokens_looked_up", "target_tokens", "requests",
            "generate_calls", "generate_s", "primed_batches", "adapter_loads", "adapter_unloads", "adapter_load_s",
            "adapter_writes", "adapter_write_s")


def target_logprobs(meta_info: dict, example: Example, start: int) -> list[float]:
    """Log-probabilities of ``example.target_ids`` from one request's meta_info,
    where the request asked for input logprobs from position ``start``."""
    entries = meta_info.get("input_token_logprobs")
    if entries is None:
        raise MezoError("sglang: the engine returned no input_token_logprobs "
                        "(was return_logprob dropped?)")
    skip = len(example.prompt_ids) - start  # entries before the first target token
    got = entries[skip:]
    if len(got) != len(example.target_ids):
        raise MezoError(f"sglang: expected {len(example.target_ids)} target logprobs, got "
                        f"{len(got)} (logprob_start_len={start}, {len(entries)} entries)")
    values = []
    for (value, token, *_), want in zip(got, example.target_ids):
        # SGLang reports the last vocabulary id as 0 (it clips padded ids)
        if token != want and token != 0:
            raise MezoError(f"sglang: logprob entry is for token {token}, expected {want}")
        if value is None:
            raise MezoError("sglang: a target token has no logprob")
        values.append(float(value))
    return values


def losses_under_folder(engine, folder, batch: Sequence[Example], name: str = "fresh-check"):
    """Losses of ``batch`` under the PEFT folder ``folder`` loaded afresh into
    ``engine`` (scored from token 0, so no cached prefix can be served): the
    reference a versioned adapter must match. Returns (losses, generate outputs)."""
    result = engine.load_lora_adapter(name, str(folder))
    if not getattr(result, "success", True):
        raise RuntimeError(f"sglang could not load {folder}: {result}")
    try:
        outs = engine.generate(input_ids=[list(e.prompt_ids + e.target_ids) for e in batch],
                               sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                               return_logprob=True, logprob_start_len=0, lora_path=[name] * len(batch))
    finally:
        engine.unload_lora_adapter(name)
    losses = torch.tensor([-sum(v for v, *_ in o["meta_info"]["input_token_logprobs"][len(e.prompt_ids):])
                           / len(e.target_ids) for o, e in zip(outs, batch)], dtype=torch.float64)
    return losses, outs


class SGLangBackend(SlotStates, AdapterTransport, LocalTensorsBackend):
    name = "sglang"
    capabilities = ("cuda", "bf16", "fp16", "lora", "prefix-cache", "radix-cache",
                    "adapter-versions", "single-token-choices")
    options: ClassVar[type] = SGLangOptions
    generation = staticmethod(generate)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return ("sglang is not installed (it has no CPU build: install sglang>=0.5 on a "
                    "machine with an NVIDIA GPU)")
        if not torch.cuda.is_available():
            return "no CUDA device: SGLang runs on NVIDIA GPUs only"
        return None

    def __init__(self, cfg, registry=None, *, engine_factory: Callable[..., Any] | None = None):
        """``engine_factory(**engine_kwargs)`` builds the engine; by default
        ``sglang.Engine`` (tests pass a stand-in)."""
        self.cfg = cfg
        self.lora = cfg.lora
        self.model_name = str(cfg.model.path)  # what saved adapters name: the user's model, not the cache
        self.z_dist = configured_dist(cfg)
        self.opts = opts = options_from(SGLangOptions, cfg.get("sglang"), "sglang")
        self.transport = opts.adapter_transport
        if self.transport == "auto":
            self.transport = "in_place"
        self.in_place = self.transport == "in_place"
        self.paired = self.in_place and opts.paired_signs
        # in_place slots beside the trained one: the minus side of a paired step, or
        # every state of a step (2q) side by side (state_losses)
        extra = opts.extra_slots(int(cfg.mezo.q)) if self.in_place else 0
        self.side_by_side = extra
        self.prime_min_tokens = opts.prime_min_tokens  # see SGLangOptions (benchmarks change it on the fly)
        self.prefix = opts.name
        options = dict(opts.engine)
        policy = radix_eviction_policy(opts.eviction_policy)
        if policy is not None:
            options["radix_eviction_policy"] = policy

        self.device = torch.device(cfg.model.device)
        if engine_factory is None:
            reason = self.unavailable_reason()
            if reason:
                raise MezoError(f"backend sglang: {reason}")
            if self.device.type != "cuda":
                raise MezoError(f"model.device: the sglang backend runs on CUDA only "
                                f"(got {cfg.model.device!r}; set model.device=cuda)")
        dtype = dtype_name(cfg.model.dtype)

        self.model_dir = resolve_model_dir(cfg.model.path)
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

        # the trainable state: fp32, PEFT layout, on model.device (z is drawn there)
        try:
            shapes = adapter_shapes(self.model_dir, cfg.lora)
        except ValueError as exc:
            raise MezoError(f"lora: {exc}") from None
        self._names = sorted(shapes)
        init = initial_adapter(shapes, cfg.seed)
        self._tensors = [init[n].to(self.device, torch.float32).contiguous() for n in self._names]
        self._config_dict = lora_config_dict(cfg.lora, str(self.model_dir))

        engine_kwargs = dict(model_path=str(self.model_dir), dtype=dtype, enable_lora=True,
                             max_lora_rank=int(cfg.lora.r),
                             lora_target_modules=list(cfg.lora.target_modules),
                             # in_place: the trained slot, the extra ones (all pinned) and the base model
                             max_loras_per_batch=2 + extra if self.in_place else 2, attention_backend="triton",
                             random_seed=int(cfg.seed), log_level="error")
        if self.device.type == "cuda" and self.device.index is not None:
            engine_kwargs["base_gpu_id"] = self.device.index
        engine_kwargs.update(options)
        self.engine_kwargs = engine_kwargs
        if engine_factory is None:
            import sglang
            engine_factory = sglang.Engine
        try:
            self.engine = engine_factory(**engine_kwargs)
        except TypeError as exc:  # an unknown option in the sglang section
            raise MezoError(f"sglang: engine option rejected: {exc}") from None

        self._version = 0
        self._loaded: str | None = None     # adapter name the engine holds for the state
        self._dirty = True                  # state changed since the last load
        self._tmp = None                    # folder for adapter_transport=disk and in_place's start
        self.reset_stats()
        if self.in_place:
            self._attach(extra)

    # -- the trainable state --------------------------------------------------
    def perturb(self, terms, decay=1.0):
        super().perturb(terms, decay)
        if self.in_place:  # the scheduler applies the same terms to its copy and its plus slot
            self._rpc("mezo_perturb", terms=[(int(s), c) for s, c in terms], decay=decay, dist=self.z_dist)
            self._version += 1
        else:
            self._dirty = True  # the engine gets the new version before the next forward

    def _fill_slots(self, states):
        """``SlotStates``: the scheduler writes every state into its pinned slot in one round trip."""
        self._rpc("mezo_fill_slots", fills=[(self._roles[k], terms) for k, terms in enumerate(states, 1)],
                  dist=self.z_dist)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self._tensors))

    # -- forward passes ---------------------------------------------------------
    @staticmethod
    def shared_prefix_len(input_ids, starts) -> int:
        """Leading tokens common to every request, up to the shortest
        logprob_start_len (SGLang reuses a cached prefix only up to there)."""
        limit = min(starts)
        first = input_ids[0]
        n = 0
        while n < limit and all(ids[n] == first[n] for ids in input_ids[1:]):
            n += 1
        return n

    def _names_of(self, adapters, n: int) -> list[str]:
        """The engine adapter of each of n rows: slot 0 the state, 1 the minus slot,
        k state k of ``fill_slots``."""
        name = self._sync()
        if adapters is None:
            return [name] * n
        if len(adapters) != n:
            raise ValueError(f"sglang backend: {n} rows but {len(adapters)} adapters")
        slots = len(self._slot_names) if self.in_place else 1
        if any(not 0 <= int(a) < slots for a in adapters):
            raise ValueError(f"sglang backend: adapter slots {sorted(set(adapters))} (the engine has {slots}: "
                             f"sglang.paired_signs, sglang.all_directions, mezo.q with in_place)")
        return [self._slot_names[int(a)] if a else name for a in adapters]

    def _generate(self, input_ids, starts, adapters=None, **extra) -> list[dict]:
        """Input-token log-probabilities from ``starts`` on (one new token each)."""
        names = self._names_of(adapters, len(input_ids))
        # Requests sent together are prefilled together and do not share a
        # prefix computed in the same pass; send one first and the rest reuse it.
        split = 0
        if (self.prime_min_tokens > 0 and len(input_ids) > 1
                and self.shared_prefix_len(input_ids, starts) >= self.prime_min_tokens):
            split = 1
            self._stats["primed_batches"] += 1
        outs = []
        for lo, hi in ((0, split), (split, len(input_ids))):
            if hi > lo:
                outs += self._engine_call(input_ids[lo:hi], names[lo:hi],
                                          sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                                          return_logprob=True, logprob_start_len=starts[lo:hi],
                                          **{k: v[lo:hi] for k, v in extra.items()})
        return outs

    def _engine_call(self, input_ids, names, **request) -> list[dict]:
        """One ``engine.generate`` of these requests under these adapter names, its
        time and the radix cache's answers counted in ``stats()``."""
        t0 = time.perf_counter()
        got = self.engine.generate(input_ids=input_ids, lora_path=names, **request)
        self._stats["generate_s"] += time.perf_counter() - t0
        self._stats["generate_calls"] += 1
        outs = [got] if isinstance(got, dict) else list(got)
        if len(outs) != len(input_ids):
            raise MezoError(f"sglang: {len(input_ids)} requests, {len(outs)} answers")
        for out in outs:
            meta = out["meta_info"]
            cached = int(meta.get("cached_tokens", 0) or 0)
            self._stats["requests"] += 1
            self._stats["lookups"] += 1
            self._stats["hits"] += int(cached > 0)
            self._stats["tokens_reused"] += cached
            self._stats["tokens_looked_up"] += int(meta.get("prompt_tokens", 0) or 0)
        return outs

    @staticmethod
    def _start(prompt_ids) -> int:
        if not prompt_ids:
            raise MezoError("sglang backend: an example needs at least one prompt token "
                            "(nothing predicts the first token of a sequence)")
        return len(prompt_ids) - 1

    def losses(self, batch: Sequence[Example], adapters=None) -> torch.Tensor:
        if not batch:
            return torch.zeros(0, dtype=torch.float64)
        starts = [self._start(e.prompt_ids) for e in batch]
        outs = self._generate([list(e.prompt_ids) + list(e.target_ids) for e in batch], starts, adapters)
        result = torch.empty(len(batch), dtype=torch.float64)
        for i, (e, s, out) in enumerate(zip(batch, starts, outs)):
            values = target_logprobs(out["meta_info"], e, s)
            result[i] = -sum(values) / len(values)
            self._stats["target_tokens"] += len(values)
        return result

    def choice_losses(self, prompts, choices, adapters=None):
        if any(len(c) != 1 for c in choices) or not prompts:
            if adapters is None:
                return super().choice_losses(prompts, choices)
            batch = [Example(p, c) for p in prompts for c in choices]
            rows = [a for a in adapters for _ in choices]
            return self.losses(batch, rows).view(len(prompts), len(choices))
        # single-token choices: one request per prompt, the choices' logprobs
        # at its first output position (greedy: raw log-softmax of the logits)
        ids = [c[0] for c in choices]
        starts = [self._start(p) for p in prompts]
        outs = self._generate([list(p) for p in prompts], starts, adapters,
                              token_ids_logprob=[list(ids) for _ in prompts])
        result = torch.empty(len(prompts), len(choices), dtype=torch.float64)
        for i, out in enumerate(outs):
            rows = out["meta_info"].get("output_token_ids_logprobs")
            if not rows or rows[0] is None:
                raise MezoError("sglang: the engine returned no output_token_ids_logprobs")
            got = {int(token): float(value) for value, token, *_ in rows[0]}
            for j, token in enumerate(ids):
                if token not in got:
                    raise MezoError(f"sglang: no logprob for choice token {token}")
                result[i, j] = -got[token]
        return result

    # -- adapter files ----------------------------------------------------------
    def load_adapter(self, path):
        state = read_peft_adapter(path)
        # names, exact shapes, floating dtypes: nothing broadcast or cast on the way in
        check_adapter_tensors(state, {n: t.shape for n, t in zip(self._names, self._tensors)}, path)
        with torch.no_grad():
            for name, tensor in zip(self._names, self._tensors):
                tensor.copy_(state[name])
        self._dirty = True
        if self.in_place:
            self._rpc("mezo_load", adapter_dir=str(path))
            self._version += 1

    def restore(self, snapshot):
        super().restore(snapshot)
        if self.in_place:  # a roll-back (rare): through a folder, as load_adapter
            with tempfile.TemporaryDirectory() as tmp:
                write_peft_adapter(self.state_dict(), self.lora, self.model_dir, tmp + "/state")
                self._rpc("mezo_load", adapter_dir=tmp + "/state")
            self._version += 1

    # -- stats and shutdown ----------------------------------------------------------
    def stats(self) -> BackendStats:
        return BackendStats(**self._stats, adapter_version=self._version - 1)

    def reset_stats(self):
        self._stats = {k: 0.0 if k.endswith("_s") else 0 for k in COUNTERS}

    def reset_cache(self):
        """Drop every cached prefix in the engine (for measurements)."""
        self._check(self.engine.flush_cache(), "flushing the radix cache")

    def close(self):
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            try:
                engine.shutdown()
            finally:
                if self._tmp is not None:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp = None
        self._tensors = []
