"""Helpers for the SGLang backend's tests and GPU benchmark: a small random
Llama with a tokenizer trained here, a config for it, and ``FakeEngine``, a CPU
stand-in for ``sglang.Engine`` that follows SGLang 0.5's call shapes and
conventions (see below), so that the backend's plumbing -- adapter versions,
logprob bookkeeping, cache statistics -- is tested where SGLang cannot run."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import train_tokenizer  # noqa: E402


def build_llama(out_dir, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=None,
                vocab=None, init_std=0.1, max_positions=2048, seed=0, dtype=torch.float32):
    """Save a random Llama (tied embeddings) with the tiny trained tokenizer.

    ``init_std`` larger than transformers' 0.02 makes the next-token
    distributions peaked, so losses differ between examples and adapters and a
    comparison of two engines means something. ``vocab`` pads the embedding
    past the tokenizer's 300 ids (for timing shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=max(len(tok), vocab or 0), hidden_size=hidden,
                         intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         initializer_range=init_std, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).to(dtype).save_pretrained(out_dir)
    return out_dir


def make_config(model_dir, device="cpu", dtype="float32", seed=0, r=8, sglang=None, **extra):
    from omegaconf import OmegaConf

    from mezo_core.config import load_config
    cfg = load_config(None, [f"model.path={model_dir}", f"model.device={device}",
                             f"model.dtype={dtype}", f"seed={seed}", f"lora.r={r}",
                             f"lora.alpha={2 * r}"] + [f"{k}={v}" for k, v in extra.items()])
    if sglang:  # the typed section; keys that are not SGLangOptions' go to its engine dict
        from mezo_backend_sglang.options import SGLangOptions
        from mezo_core.testing import typed_section
        merged = {**OmegaConf.to_container(cfg.sglang), **sglang}
        cfg.sglang = typed_section(SGLangOptions, merged, "sglang")
    return cfg


def examples(n, prompt_len, target_len, vocab=300, seed=0, shared_prefix=()):
    """Random examples (ids >= 4: no special tokens), optionally behind a shared prefix."""
    from mezo_core import Example
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (prompt_len + target_len,), generator=gen).tolist()
        out.append(Example(tuple(shared_prefix) + tuple(ids[:prompt_len]), tuple(ids[prompt_len:])))
    return out


class WithScheduler:
    """The scheduler side of a stand-in engine: ``collective_rpc`` reaches a
    ``FakeScheduler``, created by the first adapter loaded from a folder (as
    SGLang's pinned adapters are), which every such adapter joins."""
    scheduler = None

    def collective_rpc(self, method, **kwargs):
        """Like SGLang: ``getattr(scheduler, method)(**kwargs)``, failures as an
        AssertionError with the error's text."""
        self.calls.append(("rpc", method))
        try:
            getattr(self.scheduler, method)(**kwargs)
        except Exception as exc:  # noqa: BLE001 -- SGLang turns any error into its text
            raise AssertionError(str(exc)) from None
        self.slots_written()

    def slots_written(self):
        """After every RPC: what the stand-in serves may have changed."""

    def to_scheduler(self, result, lora_name, tensors):
        """``result`` of loading ``lora_name`` from a folder; on success the
        adapter joins the scheduler's LoRA manager too."""
        if result["success"]:
            if self.scheduler is None:
                self.scheduler = FakeScheduler(self, {n: t.shape for n, t in tensors.items()},
                                               self.kwargs.get("max_lora_rank", 8),
                                               self.kwargs.get("max_loras_per_batch", 2))
            self.scheduler.manager.load(lora_name, tensors)
        return result


class FakeEngine(WithScheduler):
    """CPU stand-in for ``sglang.Engine`` (transformers + peft underneath).

    What it copies from SGLang 0.5.15:
    - adapters are loaded by name (``load_lora_adapter_from_tensors`` /
      ``load_lora_adapter``) and get a fresh ``lora_id`` per load; loading a
      name that is loaded already fails; ``unload_lora_adapter`` frees it;
    - ``generate(..., return_logprob=True, logprob_start_len=s)`` returns in
      ``meta_info["input_token_logprobs"]`` one ``(logprob, token_id, None)``
      per input position from ``s`` on, the first with logprob ``None``;
      ``token_ids_logprob`` adds ``output_token_ids_logprobs`` for the first
      output position; greedy log-probabilities are the raw log-softmax;
    - ``cached_tokens``: a radix cache keyed by ``lora_id`` that matches a
      prefix of at most ``logprob_start_len`` tokens of a request of an earlier
      call (requests of one call are prefilled together and share nothing,
      as seen on the GPU host);
    - ``collective_rpc`` reaches a scheduler (``FakeScheduler``, created by the
      first ``load_lora_adapter`` from a folder) that holds SGLang's LoRA memory
      pool; an adapter in a memory-pool slot is served from that slot (read back
      with ``sglang_unstacked``), so the in-place transport runs end to end.
    """

    def __init__(self, model_path, enable_lora=True, max_lora_rank=8, lora_target_modules=(),
                 **kwargs):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from mezo_core.adapter import canonical_name
        assert enable_lora
        self.kwargs = dict(kwargs, model_path=model_path, max_lora_rank=max_lora_rank,
                           lora_target_modules=list(lora_target_modules))
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.model = get_peft_model(base, LoraConfig(r=max_lora_rank, lora_alpha=max_lora_rank,
                                                     target_modules=list(lora_target_modules)))
        self.params = {canonical_name(n): p for n, p in self.model.named_parameters() if "lora_" in n}
        self.adapters = {}       # name -> (lora_id, tensors, scaling)
        self.cache = {}          # lora_id -> list of cached token sequences
        self.calls = []          # (method, args) log
        self.shut = False
        eos = base.config.eos_token_id  # the model's EOS ids: SGLang stops at each of them
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    # -- adapters ---------------------------------------------------------
    def load_lora_adapter_from_tensors(self, lora_name, tensors, config_dict, load_format=None):
        self.calls.append(("load_tensors", lora_name))
        if lora_name in self.adapters:
            return {"success": False, "error_message": f"{lora_name} is already loaded"}
        unknown = set(tensors) - set(self.params)
        if unknown:
            return {"success": False, "error_message": f"unknown tensors {sorted(unknown)[:2]}"}
        scaling = config_dict["lora_alpha"] / config_dict["r"]
        self.adapters[lora_name] = (uuid.uuid4().hex, {k: v.clone() for k, v in tensors.items()}, scaling)
        return {"success": True}

    def load_lora_adapter(self, lora_name, lora_path, pinned=False):
        import json

        from mezo_core.adapter import read_peft_adapter
        config = json.loads((Path(lora_path) / "adapter_config.json").read_text())
        tensors = read_peft_adapter(lora_path)
        return self.to_scheduler(self.load_lora_adapter_from_tensors(lora_name, tensors, config),
                                 lora_name, tensors)

    def unload_lora_adapter(self, lora_name):
        self.calls.append(("unload", lora_name))
        if lora_name not in self.adapters:
            return {"success": False, "error_message": f"{lora_name} is not loaded"}
        lora_id = self.adapters.pop(lora_name)[0]
        self.cache.pop(lora_id, None)
        return {"success": True}

    def flush_cache(self):
        self.cache.clear()
        return True

    def shutdown(self):
        self.shut = True

    # -- forward ----------------------------------------------------------
    @torch.no_grad()
    def _use(self, name):
        lora_id, tensors, scaling = self.adapters[name]
        if self.scheduler is not None:  # an adapter in a memory-pool slot is served from it
            tensors = self.scheduler.manager.slot_tensors(name) or tensors
        for key, p in self.params.items():
            p.copy_(tensors[key])
        for module in self.model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling["default"] = scaling
        return lora_id

    def _cached(self, lora_id, ids, start):
        best = 0
        for seq in self.cache.get(lora_id, []):
            n = 0
            for a, b in zip(seq, ids[:start]):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    @torch.no_grad()
    def generate(self, input_ids, sampling_params=None, return_logprob=False, logprob_start_len=None,
                 lora_path=None, token_ids_logprob=None, **unused):
        self.calls.append(("generate", len(input_ids)))
        if not return_logprob:
            return self._complete(input_ids, sampling_params, lora_path)
        assert sampling_params["max_new_tokens"] == 1
        if not isinstance(logprob_start_len, (list, tuple)):
            logprob_start_len = [logprob_start_len] * len(input_ids)
        outs, inserts = [], []
        for i, ids in enumerate(input_ids):
            start = logprob_start_len[i]
            assert 0 <= start < len(ids)
            lora_id = self._use(lora_path[i])
            cached = self._cached(lora_id, ids, start)
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            entries = [(None, ids[start], None)]
            entries += [(float(logp[p - 1, ids[p]]), ids[p], None) for p in range(start + 1, len(ids))]
            meta = {"prompt_tokens": len(ids), "cached_tokens": cached, "input_token_logprobs": entries,
                    "completion_tokens": 1}
            if token_ids_logprob is not None:
                meta["output_token_ids_logprobs"] = [[(float(logp[-1, t]), t, None)
                                                      for t in token_ids_logprob[i]]]
            inserts.append((lora_id, list(ids)))
            outs.append({"text": "", "meta_info": meta})
        # like SGLang, requests of one call are prefilled together: none of them
        # finds another's prefix; the radix tree holds them all afterwards
        for lora_id, ids in inserts:
            self.cache.setdefault(lora_id, []).append(ids)
        return outs


    @torch.no_grad()
    def _complete(self, input_ids, sampling_params, lora_path):
        """Generation as SGLang 0.5.15 answers it: ``output_ids`` up to and with the
        token it stopped at -- one of ``stop_token_ids`` or the model's EOS ids
        (``eos_token_ids``), none with ``ignore_eos`` -- and ``finish_reason``
        ``{"type": "stop", "matched": id}`` or ``{"type": "length", ...}``;
        temperature 0 is greedy (top_k = 1), else a request samples with a generator
        seeded by its ``sampling_seed``; a request reuses a cached prefix of at most
        its prompt less one token, and its prompt and output are cached after the call."""
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        outs, inserts = [], []
        for ids, sp, name in zip(input_ids, params, lora_path):
            lora_id = self._use(name)
            cached = self._cached(lora_id, ids, len(ids) - 1)
            temperature = sp.get("temperature", 1.0)
            gen = torch.Generator().manual_seed(int(sp.get("sampling_seed") or 42))
            stops = set() if sp.get("ignore_eos") else set(sp.get("stop_token_ids") or ()) | self.eos_token_ids
            seq, out = list(ids), []
            reason = {"type": "length", "length": sp["max_new_tokens"]}
            for _ in range(sp["max_new_tokens"]):
                logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                if temperature < 1e-6:
                    token = int(logits.argmax())
                else:
                    token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
                out.append(token)
                seq.append(token)
                if token in stops:
                    reason = {"type": "stop", "matched": token}
                    break
            inserts.append((lora_id, seq))
            outs.append({"text": "", "output_ids": out,
                         "meta_info": {"prompt_tokens": len(ids), "cached_tokens": cached,
                                       "completion_tokens": len(out), "finish_reason": reason}})
        for lora_id, seq in inserts:
            self.cache.setdefault(lora_id, []).append(seq)
        return outs


def scripted_logprob(token, position, weight):
    """What ``ScriptedEngine`` answers for ``token`` at ``position`` under an
    adapter whose tensors sum to ``weight``: any change of the adapter moves it."""
    import math
    return -(0.5 + ((7 * int(token) + 3 * int(position)) % 11) / 4 + 0.1 * math.sin(weight))


class ScriptedEngine(WithScheduler):
    """A stand-in for ``sglang.Engine`` with no model: the log-probability of a
    token is ``scripted_logprob`` of the token, its position and the adapter the
    request names (as loaded: the sum of its tensors). It records every call and
    request, so tests check what the backend itself does -- the input ids,
    ``logprob_start_len``, adapter names and versions, loads, unloads, flushes --
    and that it turns the engine's answers into the right losses. Requests under
    an adapter that is not loaded fail, as in SGLang."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.adapters = {}      # name -> sum of its tensors
        self.loaded = {}        # name -> the tensors as loaded
        self.calls = []         # ("load", name) / ("unload", name) / ("flush",) / ("generate", n requests)
                                # / ("rpc", method)
        self.requests = []      # one dict per request
        self.shut = False

    def slots_written(self):
        """The slots' sums are re-read after every RPC."""
        for name, weight in self.scheduler.manager.slot_sums().items():
            self.adapters[name] = weight

    def load_lora_adapter_from_tensors(self, lora_name, tensors, config_dict, load_format=None):
        self.calls.append(("load", lora_name))
        if lora_name in self.adapters:
            return {"success": False, "error_message": f"{lora_name} is already loaded"}
        self.loaded[lora_name] = {k: v.clone() for k, v in tensors.items()}
        self.adapters[lora_name] = float(sum(v.double().sum() for v in tensors.values()))
        return {"success": True}

    def load_lora_adapter(self, lora_name, lora_path, pinned=False):
        from mezo_core.adapter import read_peft_adapter
        tensors = read_peft_adapter(lora_path)
        return self.to_scheduler(self.load_lora_adapter_from_tensors(lora_name, tensors, {}), lora_name, tensors)

    def unload_lora_adapter(self, lora_name):
        self.calls.append(("unload", lora_name))
        if self.adapters.pop(lora_name, None) is None:
            return {"success": False, "error_message": f"{lora_name} is not loaded"}
        return {"success": True}

    def flush_cache(self):
        self.calls.append(("flush",))
        return True

    def shutdown(self):
        self.shut = True

    def generate(self, input_ids, sampling_params=None, return_logprob=False, logprob_start_len=None,
                 lora_path=None, token_ids_logprob=None, **unused):
        self.calls.append(("generate", len(input_ids)))
        outs = []
        for i, ids in enumerate(input_ids):
            start, name = logprob_start_len[i], lora_path[i]
            weight = self.adapters[name]
            self.requests.append({"input_ids": list(ids), "logprob_start_len": start, "lora_path": name,
                                  "sampling_params": dict(sampling_params), "return_logprob": return_logprob,
                                  "token_ids_logprob": None if token_ids_logprob is None else token_ids_logprob[i]})
            entries = [(None, ids[start], None)]
            entries += [(scripted_logprob(ids[p], p, weight), ids[p], None) for p in range(start + 1, len(ids))]
            meta = {"prompt_tokens": len(ids), "cached_tokens": 0, "input_token_logprobs": entries}
            if token_ids_logprob is not None:
                meta["output_token_ids_logprobs"] = [[(scripted_logprob(t, len(ids), weight), t, None)
                                                      for t in token_ids_logprob[i]]]
            outs.append({"text": "", "meta_info": meta})
        return outs


# -- SGLang's LoRA memory pool, as a stand-in for the scheduler side -------------------
#: SGLang's stacking of PEFT modules (LoRAAdapter.normalize_qkv_proj / normalize_gate_up_proj)
SGLANG_STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _split(name):
    import re
    m = re.search(r"layers\.(\d+)\.(?:.*\.)?([a-z_]+)\.lora_([AB])\.weight$", name)
    return int(m.group(1)), m.group(2), m.group(3)


def sglang_stacked(tensors):
    """{(layer, sglang module): (A, B)} as SGLang stacks an adapter's tensors: the
    parts of qkv_proj / gate_up_proj concatenated along dim 0 in that order, a
    missing part as zeros shaped like its sibling (k like v, up like gate)."""
    by = {}
    for name, t in tensors.items():
        layer, module, kind = _split(name)
        by.setdefault(layer, {})[(module, kind)] = t
    out = {}
    for layer, parts in by.items():
        modules = {m for m, _ in parts}
        for stack, members in SGLANG_STACKS.items():
            if modules & set(members):
                pieces = {}
                for kind in "AB":
                    have = [parts.get((m, kind)) for m in members]
                    like = next(t for t in reversed(have) if t is not None)
                    pieces[kind] = torch.cat([t if t is not None else torch.zeros_like(like) for t in have], 0)
                out[(layer, stack)] = (pieces["A"], pieces["B"])
                modules -= set(members)
        for m in modules:
            out[(layer, m)] = (parts[(m, "A")], parts[(m, "B")])
    return out


def sglang_unstacked(a_buffers, b_buffers, slot, shapes):
    """The inverse of ``sglang_stacked`` on slot ``slot`` of the buffers: each PEFT
    tensor (``shapes``: name -> shape) read back from the place SGLang's load puts
    it -- part p of a stack at A rows [p*r, (p+1)*r) and at B rows after the
    widths of the parts before it (a missing part as wide as its sibling)."""
    by = {}
    for name, shape in shapes.items():
        layer, module, kind = _split(name)
        by.setdefault(layer, {})[(module, kind)] = (name, tuple(shape))
    out = {}
    for layer, parts in by.items():
        for module, kind in list(parts):
            stack, members = next(((s, m) for s, m in SGLANG_STACKS.items() if module in m), (module, (module,)))
            p = members.index(module)
            name, shape = parts[(module, kind)]
            if kind == "A":
                r = shape[0]
                out[name] = a_buffers[stack][layer][slot, p * r:(p + 1) * r, :].clone()
                continue
            have = [parts.get((m, "B"), (None, None))[1] for m in members]
            like = next(s for s in reversed(have) if s is not None)
            start = sum((s or like)[0] for s in have[:p])
            out[name] = b_buffers[stack][layer][slot, start:start + shape[0], :shape[1]].clone()
    return out


class FakeLoraManager:
    """SGLang's LoRAManager as the mezo worker sees it: ``lora_refs`` (uid ->
    ref with ``lora_name``), ``fetch_new_loras`` and a ``memory_pool`` with
    ``A_buffer[module][layer]`` [slots, c*max_r, in], ``B_buffer[module][layer]``
    [slots, out, max_r] and ``uid_to_buffer_id``; a slot is filled from
    ``sglang_stacked`` (SGLang's load: A into [:c*r, :], B into [:, :r])."""

    def __init__(self, shapes, max_r, slots, dtype=torch.float32):
        from types import SimpleNamespace
        zeros = {n: torch.zeros(s) for n, s in shapes.items()}
        A, B = {}, {}
        n_layers = 1 + max(_split(n)[0] for n in shapes)
        for (layer, module), (a, b) in sglang_stacked(zeros).items():
            c = len(SGLANG_STACKS.get(module, (module,)))
            A.setdefault(module, [None] * n_layers)[layer] = torch.zeros(slots, c * max_r, a.shape[1], dtype=dtype)
            B.setdefault(module, [None] * n_layers)[layer] = torch.zeros(slots, b.shape[0], max_r, dtype=dtype)
        self.memory_pool = SimpleNamespace(A_buffer=A, B_buffer=B, uid_to_buffer_id={})
        self.slots, self.lora_refs, self.loras, self.tp_size = slots, {}, {}, 1

    def load(self, name, tensors):
        from types import SimpleNamespace
        uid = uuid.uuid4().hex
        self.lora_refs[uid] = SimpleNamespace(lora_id=uid, lora_name=name)
        self.loras[uid] = {n: t.clone() for n, t in tensors.items()}

    def fetch_new_loras(self, uids):
        pool = self.memory_pool
        for uid in uids:
            if uid in pool.uid_to_buffer_id:
                continue
            slot = min(set(range(self.slots)) - set(pool.uid_to_buffer_id.values()))
            for (layer, module), (a, b) in sglang_stacked(self.loras[uid]).items():
                pool.A_buffer[module][layer][slot].zero_()
                pool.A_buffer[module][layer][slot, :a.shape[0], :] = a
                pool.B_buffer[module][layer][slot].zero_()
                pool.B_buffer[module][layer][slot, :, :b.shape[1]] = b
            pool.uid_to_buffer_id[uid] = slot

    def slot_tensors(self, name):
        """The PEFT tensors of adapter ``name``'s memory-pool slot (None when it has none)."""
        pool = self.memory_pool
        uid = next((u for u, ref in self.lora_refs.items() if ref.lora_name == name), None)
        if uid not in pool.uid_to_buffer_id:
            return None
        shapes = {n: t.shape for n, t in self.loras[uid].items()}
        return sglang_unstacked(pool.A_buffer, pool.B_buffer, pool.uid_to_buffer_id[uid], shapes)

    def slot_sums(self):
        """name -> the sum of its slot's contents (what ScriptedEngine answers from)."""
        pool = self.memory_pool
        out = {}
        for uid, slot in pool.uid_to_buffer_id.items():
            total = sum(float(layer[slot].double().sum()) for bufs in (pool.A_buffer, pool.B_buffer)
                        for layers in bufs.values() for layer in layers if layer is not None)
            out[self.lora_refs[uid].lora_name] = total
        return out


class FakeScheduler:
    """The scheduler side of ``ScriptedEngine``: a ``FakeLoraManager`` behind
    ``tp_worker.model_runner.lora_manager``, a ``flush_cache`` that the engine
    records, and the mezo methods added as SGLang's plugin adds them."""

    def __init__(self, engine, shapes, max_r, slots):
        from types import SimpleNamespace

        from mezo_backend_sglang.worker import add_methods
        add_methods(FakeScheduler)
        self.engine = engine
        self.manager = FakeLoraManager(shapes, max_r, slots)
        self.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(lora_manager=self.manager))

    def flush_cache(self, empty_cache=True):
        return self.engine.flush_cache()
