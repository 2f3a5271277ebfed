"""transformers + peft forward passes for MeZO.

Rows are left-padded so that every target ends at the last position: the model
is then asked for logits of the last K+1 positions only (``logits_to_keep``),
which skips the vocabulary projection for prompt tokens -- on a small model with
a large tied head that is a fifth of the work per token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mezo_core import Example, LocalTensorsBackend, MezoError
from mezo_core.adapter import (canonical_name, initial_adapter, peft_lora_config, read_peft_adapter,
                               read_tensors, write_peft_adapter, write_tensors)
from mezo_core.models import resolve_model_dir, torch_dtype
from mezo_core.perturb import apply_z, configured_dist

from .trunk import common_prefix

FULL_PARAMS_FILE = "mezo_params.safetensors"
GRAPH_WIDTH = 16

OPTIONS = {  # cfg.hf: name -> default
    "trunk_cache": True,        # cache hidden states below the first adapted layer
    "cache_budget_mb": 1024.0,  # byte budget of that cache (MiB; fractions allowed)
    "cache_policy": "lru",      # an eviction policy plugin
    "cache_device": None,       # None: the model's device; "cpu": keep entries in (pinned) CPU memory
    "pm_batch": False,          # run both signs of all q directions as one batch of 2qB rows
    "prefix_sharing": False,    # rows of one pass sharing >= prefix_min_tokens compute that prefix once
    "prefix_min_tokens": 16,
    "cuda_graphs": False,       # replay each forward as a CUDA graph (CUDA only; widths padded to
                                # multiples of GRAPH_WIDTH tokens so that few shapes occur)
    "compile": False,           # torch.compile the decoder layers a pass runs (fuses norms, rotary
                                # embeddings, activations; the first pass of each shape compiles)
    "lora_dtype": "float32",    # dtype of the adapter the forwards use: "float32", or "model" (e.g. bf16:
                                # no fp32 casts around the LoRA GEMMs); MeZO always moves fp32 masters
    "trim_last_layer": True,    # the last layer computes only keys and values for positions whose
                                # logits no loss reads (exact: those outputs reach no logit)
    "full_params": None,        # full-parameter MeZO: regexes of parameter names to train
                                # instead of LoRA, e.g. [".*"] or ['.*layers\\.2[6-9]\\..*']
}


def backend_options(section, defaults, prefix):
    """The backend's config section over its defaults; unknown keys are errors,
    and so is a value of another type than its default (``trunk_cache=maybe``
    would otherwise count as true). A None default leaves the check to the option."""
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise MezoError(f"config field '{prefix}.{unknown[0]}': unknown option "
                        f"(known: {', '.join(sorted(defaults))})")
    for name, value in section.items():
        want = type(defaults[name])
        ok = (defaults[name] is None or want is float and type(value) is int
              or isinstance(value, want) and (want is bool or not isinstance(value, bool)))
        if not ok:
            raise MezoError(f"config field '{prefix}.{name}': expected a {want.__name__} "
                            f"(like the default {defaults[name]!r}), got {value!r}")
    return {**defaults, **section}


def prefix_groups(rows, adapters, min_tokens, keep):
    """[(prefix, member indices)]: rows of one adapter sorted so that shared
    prefixes are adjacent, grouped greedily while their common prefix stays >=
    ``min_tokens`` and leaves every member at least ``keep`` tokens of suffix."""
    order = sorted(range(len(rows)), key=lambda i: (str(adapters[i]), rows[i]))
    groups = []
    for i in order:
        if groups:
            prefix, members = groups[-1]
            common = common_prefix(prefix, rows[i])
            limit = min(len(rows[m]) for m in members + [i]) - keep
            if adapters[members[0]] == adapters[i] and min(common, limit) >= min_tokens:
                groups[-1] = (tuple(prefix[:min(common, limit)]), members + [i])
                continue
        groups.append((tuple(rows[i]), [i]))
    return groups


class HFBackend(LocalTensorsBackend):
    name = "hf"
    capabilities = ("cpu", "cuda", "fp32", "bf16", "lora", "full-params", "single-token-choices",
                    "frozen-trunk-cache", "side-by-side-directions")

    def __init__(self, cfg):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = resolve_model_dir(cfg.model.path)
        self.device = torch.device(cfg.model.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MezoError("model.device: cuda requested but no CUDA device is available")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.model.dtype))
        base.to(self.device).eval()
        self.model_dir, self.lora = model_dir, cfg.lora
        self.model_name = str(cfg.model.path)  # what saved adapters name: the user's model, not the cache
        self.z_dist = configured_dist(cfg)
        opts = backend_options(cfg.hf, OPTIONS, "hf")
        self.full_params = opts["full_params"]
        if opts["lora_dtype"] not in ("float32", "model"):
            raise MezoError(f"config field 'hf.lora_dtype': {opts['lora_dtype']!r} is neither 'float32' nor 'model'")
        if self.full_params is None:
            try:
                self.model = get_peft_model(base, peft_lora_config(cfg.lora, str(model_dir)),
                                            autocast_adapter_dtype=opts["lora_dtype"] == "float32")
            except ValueError as exc:
                raise MezoError(f"lora: {exc}") from None
            params = {canonical_name(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            self.model = base
            params = self._full_params(base, self.full_params)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # MeZO never needs autograd
        self._names = sorted(params)
        self._tensors = [params[n] for n in self._names]
        self._model_tensors = self._tensors   # the adapter inside the model, which the forwards read
        if self.full_params is None and any(t.dtype != torch.float32 for t in self._tensors):
            self._tensors = [t.float() for t in self._model_tensors]  # fp32 masters, rounded once per move
        if self.full_params is None:
            self._load_state(initial_adapter({n: p.shape for n, p in params.items()}, cfg.seed))
        elif opts["pm_batch"]:
            raise MezoError("hf.pm_batch holds perturbed LoRA adapters side by side: it needs LoRA, "
                            "not hf.full_params")
        self.trunk = self._make_trunk(opts)
        self.trim_last_layer = opts["trim_last_layer"]
        if self.trim_last_layer and self.trunk is None:
            from .trunk import LayerStack
            self.stack = LayerStack(self.model)
        else:
            self.stack = self.trunk
        self.pm_batch = opts["pm_batch"]
        self.prefix_sharing, self.prefix_min_tokens = opts["prefix_sharing"], opts["prefix_min_tokens"]
        if opts["compile"]:
            self._compile_layers()
        self.graphs = None
        if opts["cuda_graphs"]:
            if self.device.type != "cuda":
                raise MezoError("hf.cuda_graphs: CUDA graphs need model.device: cuda")
            from .graphs import GraphedForward
            self.graphs = GraphedForward(self._graph_forward)
        self.prefix_tokens_saved = 0
        self._side = {}            # adapter name -> its tensors, for side-by-side perturbed states
        self._row_adapters = None  # per-example adapter names while such a batch runs
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.forward_tokens = 0
        self._inputs_key, self._inputs = None, None  # the last batch's forward inputs (see _plain_last_logits)
        self._keep_on_device = False                 # losses stay on the device until a step reads them

    @staticmethod
    def _full_params(model, patterns):
        """Full-parameter MeZO: the base weights whose names match a pattern."""
        import re
        try:
            regexes = [re.compile(p) for p in patterns]
        except (re.error, TypeError) as exc:
            raise MezoError(f"hf.full_params: {exc}") from None
        params = {n: p for n, p in model.named_parameters() if any(r.fullmatch(n) for r in regexes)}
        if not params:
            raise MezoError(f"hf.full_params: no parameter name matches {list(patterns)} "
                            f"(names look like {next(iter(dict(model.named_parameters())))})")
        return params

    def _make_trunk(self, opts):
        if not opts["trunk_cache"]:
            return None
        from mezo_core.registry import get_registry
        from .trunk import FrozenTrunk, RadixCache
        policy = get_registry().get("eviction_policies", opts["cache_policy"])()
        cache = RadixCache(opts["cache_budget_mb"] * 2**20, policy, opts["cache_device"])
        try:
            trunk = FrozenTrunk(self.model, cache, self._model_tensors)
        except ValueError as exc:
            raise MezoError(f"hf.trunk_cache: {exc}; set hf.trunk_cache=false") from None
        return trunk if trunk.k0 > 0 else None  # nothing frozen below the first layer

    def _compile_layers(self):
        """torch.compile each decoder layer that a pass runs (those from k0 up with
        the trunk cache). Only ``forward`` is compiled, so the trunk's hooks stay
        outside; the layers share one compiled graph (same code, same shapes)."""
        from .trunk import decoder_layers
        layers = self.trunk.top if self.trunk is not None else decoder_layers(self.model)[2]
        for layer in layers:
            layer.forward = torch.compile(layer.forward)

    def _side_adapter(self, name):
        """The tensors of an extra adapter that holds a perturbed copy of the default one."""
        if name not in self._side:
            self.model.add_adapter(name, peft_lora_config(self.lora, str(self.model_dir)))
            self.model.set_adapter("default")  # training still moves the default adapter only
            params = {canonical_name(n.replace(f".{name}.", ".default.")): p
                      for n, p in self.model.named_parameters() if f".{name}." in n}
            for p in params.values():
                p.requires_grad_(False)
            self._side[name] = [params[n] for n in self._names]
        return self._side[name]

    @torch.no_grad()
    def population_losses(self, batch, seeds, eps, applied=0.0):
        """All 2q perturbed states in one batch of 2qB rows: the frozen GEMMs run
        once over all rows, each block of B rows adds the LoRA delta of its own
        adapter, theta +/- eps z_i (peft's mixed-adapter batch). The default
        adapter never moves, so the offset is 0."""
        if not self.pm_batch:
            return super().population_losses(batch, seeds, eps, applied)
        if applied:
            self.perturb([(seeds[0], -applied)])  # the side adapters start from theta itself
        names = []
        for i, seed in enumerate(seeds):
            for sign, name in ((1.0, f"mezo_p{i}"), (-1.0, f"mezo_m{i}")):
                side = self._side_adapter(name)
                for dst, src in zip(side, self._tensors):
                    dst.copy_(src)
                apply_z(side, [(seed, sign * eps)], dist=self.z_dist)
                names.append(name)
        self._row_adapters = [name for name in names for _ in batch]
        try:
            losses = self.objective(list(batch) * len(names)).view(len(names), len(batch))
        finally:
            self._row_adapters = None
        return [(losses[2 * i], losses[2 * i + 1]) for i in range(len(seeds))], 0.0

    # -- forward passes --------------------------------------------------------
    def _batch_tensors(self, rows: Sequence[Sequence[int]], multiple: int = 1):
        """Left-padded ids, mask and position ids (positions count real tokens only),
        ``multiple`` dividing the width; built on the host in one array, moved in one copy."""
        lengths = [len(r) for r in rows]
        width = -(-max(lengths) // multiple) * multiple
        host = np.full((3, len(rows), width), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            host[0, i, width - len(r):] = r
        host = torch.from_numpy(host)
        start = width - torch.tensor(lengths)[:, None]
        column = torch.arange(width)
        host[1] = column >= start
        host[2] = (column - start).clamp(min=0)
        if self.device.type == "cuda":
            host = host.pin_memory()
        ids, mask, positions = host.to(self.device, non_blocking=True)
        return ids, mask, positions

    def _last_logits(self, rows, keep: int, adapters=None) -> torch.Tensor:
        if self.prefix_sharing and len(rows) > 1:
            return self._shared_prefix_logits(rows, keep, adapters)
        return self._plain_last_logits(rows, keep, adapters)

    def _plain_last_logits(self, rows, keep, adapters=None, states=None):
        """Logits of the last ``keep`` positions and the padded ids. ``states``:
        the rows' trunk states when the caller has them already.

        The inputs of a whole batch under the default adapter are kept for the
        next call: the -eps pass of a step asks for the same rows, and then
        skips the lookups, the padding and (with CUDA graphs) the copies into
        the graph. The key holds everything the inputs depend on: the rows, the
        graph layout and the trunk cache's generation (a change of a trunk
        weight empties the cache and so changes the key)."""
        graphed = self.graphs is not None and adapters is None
        self.forward_tokens += sum(map(len, rows))
        generation = self._fresh_trunk_generation() if states is None else None  # before any lookup
        key = (tuple(rows), keep, graphed, generation) if adapters is None and states is None else None
        reused = key is not None and key == self._inputs_key
        if reused:
            if self.trunk is not None:
                self.trunk.cache.count_reuse(rows)
        else:
            self._inputs_key = self._inputs = None  # freed before the new inputs exist: no two batches held
            self._inputs, self._inputs_key = self._forward_inputs(rows, graphed, states), key
        inputs = self._inputs
        if graphed:  # a reused batch is still in the graph's input buffers
            logits = self.graphs.replay_last() if reused else self.graphs(static=keep, **inputs)
            self._inputs = {"input_ids": inputs["input_ids"]}  # the graph keeps its own copy of the rest
            return logits.to(torch.float32, copy=True), inputs["input_ids"]
        extra = {} if adapters is None else {"adapter_names": adapters}
        hidden = inputs.get("hidden")
        plain = {k: v for k, v in inputs.items() if k != "hidden"}
        out = self._forward(hidden, **plain, **extra, use_cache=False, logits_to_keep=keep)
        return out.logits.float(), inputs["input_ids"]

    def _forward_inputs(self, rows, graphed, states=None):
        """The tensors a forward over ``rows`` takes: ids, mask (4-D for a graph),
        positions and, with the trunk cache, the states entering layer k0."""
        ids, mask, positions = self._batch_tensors(rows, GRAPH_WIDTH if graphed else 1)
        if self.trunk is not None and states is None:
            states = self._trunk_states(rows)
        inputs = dict(input_ids=ids, attention_mask=self._causal_mask(mask, positions) if graphed else mask,
                      position_ids=positions)
        if states is not None:
            inputs["hidden"] = self._left_padded(states, ids.shape[1])
        return inputs

    def _fresh_trunk_generation(self):
        """Checks the trunk's weights (a change empties its cache) and returns the
        cache's generation, which changes whenever it was emptied (None: no trunk)."""
        if self.trunk is None:
            return None
        self.trunk.check_fresh()
        return self.trunk.cache.generation

    def _forward(self, hidden, **inputs):
        """The model's forward, from the trunk states (a padded batch) when there
        are any; with ``hf.trim_last_layer`` the last layer runs in full only for
        the positions whose logits are kept. Not when the caller wants the KV
        cache, nor for rows with per-row adapters: peft removes its per-row hooks
        only when a forward returns, and trimming stops one early."""
        keep = inputs.get("logits_to_keep")
        if (self.trim_last_layer and inputs.get("use_cache") is False and "adapter_names" not in inputs
                and isinstance(keep, int) and 0 < keep < inputs["input_ids"].shape[1]
                and (hidden is not None or len(self.stack.layers) > 1)):  # a 1-layer model: nothing below
            from .trunk import NoKeysAndValues
            try:
                return self.stack.last_positions(hidden, 0 if hidden is None else self.trunk.k0, **inputs)
            except NoKeysAndValues as exc:
                raise MezoError(f"hf.trim_last_layer: {exc}; set hf.trim_last_layer=false") from None
        if hidden is None:
            return self.model(**inputs)
        return self.trunk.forward_from_cache(hidden, **inputs)

    def _graph_forward(self, keep, input_ids, attention_mask, position_ids, hidden=None):
        """The forward that ``hf.cuda_graphs`` captures: every input a tensor of
        fixed shape, the mask already 4-D (building it from a 2-D mask reads
        values on the host, which a graph cannot)."""
        out = self._forward(hidden, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False, logits_to_keep=keep)
        return out.logits

    def _causal_mask(self, mask, positions):
        """transformers' own 4-D mask for these left-padded rows, as its attention
        implementation wants it."""
        from transformers.masking_utils import create_causal_mask
        dtype = self.model.get_input_embeddings().weight.dtype
        shape_only = torch.empty((*mask.shape, 0), dtype=dtype, device=self.device)  # shape, dtype, device are read
        return create_causal_mask(config=self.model.config, inputs_embeds=shape_only, attention_mask=mask,
                                  past_key_values=None, position_ids=positions, allow_is_causal_skip=False)

    def _shared_prefix_logits(self, rows, keep, adapters):
        """Rows (of one adapter) that share a prefix of at least ``prefix_min_tokens``
        run it once; its KV is repeated for each row, which then runs only its
        suffix. Exact: within one pass the adapter does not change. With the trunk
        cache, prefix and suffixes start at layer k0 from slices of the rows' states."""
        names = adapters or [None] * len(rows)
        groups = prefix_groups(rows, names, self.prefix_min_tokens, keep)
        states = None
        if self.trunk is not None:
            self._fresh_trunk_generation()
            states = self._trunk_states(rows)  # one capture for all misses

        def pick(members):
            return None if states is None else [states[i] for i in members]

        logits = [None] * len(rows)
        singles = [g[1][0] for g in groups if len(g[1]) == 1]
        if singles:
            out, _ = self._plain_last_logits([rows[i] for i in singles], keep,
                                             None if adapters is None else [names[i] for i in singles],
                                             pick(singles))
            for j, i in enumerate(singles):
                logits[i] = out[j]
        for prefix, members in groups:
            if len(members) == 1:
                continue
            logits_g = self._group_logits(prefix, [rows[i][len(prefix):] for i in members], keep,
                                          names[members[0]], pick(members))
            for j, i in enumerate(members):
                logits[i] = logits_g[j]
        ids, _, _ = self._batch_tensors(rows)
        return torch.stack(logits), ids

    def _group_logits(self, prefix, suffixes, keep, adapter, states=None):
        """``states``: the members' trunk states over prefix + suffix."""
        n, p = len(suffixes), len(prefix)
        extra = {} if adapter is None else {"adapter_names": [adapter]}
        ids_p = torch.tensor([prefix], device=self.device)
        past = self._forward(None if states is None else self._left_padded([states[0][:p]]), input_ids=ids_p,
                             position_ids=torch.arange(p, device=self.device)[None],
                             use_cache=True, logits_to_keep=1, **extra).past_key_values
        past.batch_repeat_interleave(n)
        ids, mask, positions = self._batch_tensors(suffixes)
        self.forward_tokens += p + sum(map(len, suffixes))
        self.prefix_tokens_saved += (n - 1) * p
        full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=mask.device), mask], dim=1)
        if adapter is not None:
            extra = {"adapter_names": [adapter] * n}
        out = self._forward(None if states is None else self._left_padded([s[p:] for s in states]),
                            input_ids=ids, attention_mask=full_mask, position_ids=positions + p,
                            past_key_values=past, use_cache=True, logits_to_keep=keep, **extra)
        return out.logits.float()

    def _trunk_states(self, rows):
        """Per row, the hidden states entering layer k0: cached, or computed once.
        The caller has checked the trunk (``_fresh_trunk_generation``)."""
        trunk = self.trunk
        states = [trunk.cache.lookup(r) for r in rows]
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            ids, mask, positions = self._batch_tensors([rows[i] for i in missing])
            hidden = trunk.capture(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            for j, i in enumerate(missing):
                states[i] = hidden[j, hidden.shape[1] - len(rows[i]):]
                trunk.cache.insert(rows[i], states[i])
        return states

    def _left_padded(self, states, width=None):
        """States of rows of different lengths as one batch, left-padded like the ids."""
        if len(states) == 1 and (width is None or width == len(states[0])):
            return states[0].to(self.device, non_blocking=True)[None]
        width = width or max(len(s) for s in states)
        out = states[0].new_zeros((len(states), width, states[0].shape[-1]), device=self.device)
        for i, s in enumerate(states):
            out[i, width - len(s):] = s
        return out

    @torch.inference_mode()
    def losses(self, batch: Sequence[Example]) -> torch.Tensor:
        rows = [e.prompt_ids + e.target_ids for e in batch]
        k = max(len(e.target_ids) for e in batch)
        logits, ids = self._last_logits(rows, k + 1, self._row_adapters)
        logits, labels = logits[:, :-1], ids[:, -k:]          # position t predicts t+1
        target_len = torch.tensor([len(e.target_ids) for e in batch], device=ids.device)
        is_target = torch.arange(k, device=ids.device)[None, :] >= (k - target_len)[:, None]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        per_example = (nll * is_target).sum(1) / target_len
        return self._to_host(per_example.double())

    @torch.inference_mode()
    def choice_losses(self, prompts, choices):
        if any(len(c) != 1 for c in choices):
            adapters = self._row_adapters
            if adapters is not None:  # one row per (prompt, choice)
                self._row_adapters = [a for a in adapters for _ in choices]
            try:
                return super().choice_losses(prompts, choices)
            finally:
                self._row_adapters = adapters
        # single-token choices: one pass over the prompts scores all of them
        logits, _ = self._last_logits(prompts, 1, self._row_adapters)
        logp = torch.log_softmax(logits[:, -1], dim=-1)
        return self._to_host((-logp[:, [c[0] for c in choices]]).double())

    def _to_host(self, losses):
        return losses if self._keep_on_device else losses.cpu()

    def plus_minus_losses(self, batch, seed, eps, applied=0.0):
        """The base class's sequence, with the losses read back once at the end:
        the -eps pass is queued while the +eps pass runs, so the device never
        waits for the host between the two."""
        self._keep_on_device = True
        try:
            loss_plus, loss_minus, offset = super().plus_minus_losses(batch, seed, eps, applied)
        finally:
            self._keep_on_device = False
        return loss_plus.cpu(), loss_minus.cpu(), offset

    # -- adapter files -------------------------------------------------------------
    def save_adapter(self, path):
        state = dict(zip(self._names, self._tensors))
        if self.full_params is None:
            write_peft_adapter(state, self.lora, self.model_name, path)
        else:  # trained base weights, by their transformers names
            write_tensors(state, path, FULL_PARAMS_FILE)

    def load_adapter(self, path):
        if self.full_params is None:
            self._load_state(read_peft_adapter(path), source=path)
        else:
            self._load_state(read_tensors(path, FULL_PARAMS_FILE), source=path)

    def restore(self, snapshot):
        self._load_state(snapshot, source="snapshot")

    @torch.no_grad()
    def _load_state(self, state, source="initial adapter"):
        missing = set(self._names) - set(state)
        if missing:
            raise MezoError(f"{source}: adapter lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for name, tensor in zip(self._names, self._tensors):
            tensor.copy_(state[name])
        self._sync_model_adapter()

    def perturb(self, terms, decay=1.0):
        super().perturb(terms, decay)
        self._sync_model_adapter()

    @torch.no_grad()  # peft's enable_adapters() turns requires_grad back on
    def _sync_model_adapter(self):
        """hf.lora_dtype=model: the model's adapter is the fp32 masters rounded once."""
        if self._model_tensors is not self._tensors:
            torch._foreach_copy_(self._model_tensors, self._tensors)

    def get_stats(self):
        stats = {"forward_tokens": self.forward_tokens}
        if self.prefix_sharing:
            stats["prefix_tokens_saved"] = self.prefix_tokens_saved
        if self.trunk is not None:
            c = self.trunk.cache
            stats.update(c.stats, bytes=c.bytes, hit_rate=c.stats["hits"] / max(1, c.stats["lookups"]),
                         token_reuse=c.stats["tokens_reused"] / max(1, c.stats["tokens_looked_up"]),
                         layers_skipped=self.trunk.k0)
        return stats

    def close(self):
        self.model = None
        self._tensors = self._model_tensors = []
