"""transformers + peft forward passes for MeZO: the Backend contract over the
modules that do the work, in the order a batch meets them -- ``forward`` (a
batch's way through the others, and the reuse of its inputs), ``prefix`` (shared
prefixes), ``trunk`` (the frozen-trunk cache), ``inputs`` (padding), ``passes``
(the model's passes and the target losses) -- and ``side`` (adapters side by
side), ``graphs`` (CUDA graphs, torch.compile), configured by ``options.HFOptions``."""
from __future__ import annotations

import functools
import sys
from typing import ClassVar, Sequence

import torch

from mezo_core import Example, LocalTensorsBackend, MezoError
from mezo_core.adapter import (check_adapter_tensors, initial_adapter, peft_lora_config, read_peft_adapter,
                               read_tensors, write_peft_adapter, write_tensors)
from mezo_core.config import options_from, plugin_options
from mezo_core.forwards import all_directions, each_direction, objective, plus_minus
from mezo_core.stats import BackendStats
from mezo_core.registry import or_installed
from mezo_core.models import load_pretrained, resolve_model_dir
from mezo_core.perturb import configured_dist

from .forward import Forwards
from .inputs import batch_tensors
from .options import HFOptions
from .params import load_model, masters
from .passes import target_losses

FULL_PARAMS_FILE = "mezo_params.safetensors"


class HFBackend(LocalTensorsBackend):
    name = "hf"
    capabilities = ("cpu", "cuda", "fp32", "bf16", "lora", "full-params", "single-token-choices",
                    "frozen-trunk-cache", "side-by-side-directions")
    options: ClassVar[type] = HFOptions

    def __init__(self, cfg, registry=None):
        from transformers import AutoTokenizer

        self.opts = opts = options_from(HFOptions, cfg.get("hf"), "hf")
        model_dir = resolve_model_dir(cfg.model.path)
        self.device = torch.device(cfg.model.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MezoError("model.device: cuda requested but no CUDA device is available")
        if opts.cuda_graphs and self.device.type != "cuda":
            raise MezoError("hf.cuda_graphs: CUDA graphs need model.device: cuda")
        self.tokenizer = load_pretrained(AutoTokenizer, model_dir)
        self.model_dir, self.lora = model_dir, cfg.lora
        self.model_name = str(cfg.model.path)  # what saved adapters name: the user's model, not the cache
        self.z_dist = configured_dist(cfg)
        self.model, params = load_model(cfg, opts, model_dir, self.device)
        self._names = sorted(params)
        self._model_tensors = [params[n] for n in self._names]  # the adapter inside the model, which the forwards read
        self._tensors = self._model_tensors if opts.full_params is not None else masters(self._model_tensors)
        if opts.full_params is None:
            self._load_state(initial_adapter({n: p.shape for n, p in params.items()}, cfg.seed))
        pad = self.tokenizer.pad_token_id
        self.forwards = Forwards(self.model, self.device, pad if pad is not None else (self.tokenizer.eos_token_id or 0),
                                 self._make_trunk(cfg, opts, or_installed(registry)), opts.trim_last_layer,
                                 opts.prefix_min_tokens if opts.prefix_sharing else None)
        self._configure_graphs(opts)
        #: perturbed states evaluated side by side in one call (state_losses): any number
        #: with hf.pm_batch (one side adapter each), none without
        self.side_by_side = sys.maxsize if opts.pm_batch else 0
        if opts.pm_batch:
            from .side import SideAdapters
            self.side = SideAdapters(self.model, self._lora_config, self._names, self.z_dist)

    def _lora_config(self):
        return peft_lora_config(self.lora, str(self.model_dir))

    def _make_trunk(self, cfg, opts, registry):
        if not opts.trunk_cache:
            return None
        from .trunk import FrozenTrunk, RadixCache
        policy = registry.get("eviction_policies", opts.cache_policy)
        if getattr(policy, "options", None):  # a policy that declares options is built with its section
            policy = functools.partial(policy, plugin_options(cfg, policy))
        cache = RadixCache(opts.cache_budget_mb * 2**20, policy, opts.cache_device)
        try:
            trunk = FrozenTrunk(self.model, cache, self._model_tensors)
        except ValueError as exc:
            raise MezoError(f"hf.trunk_cache: {exc}; set hf.trunk_cache=false") from None
        return trunk if trunk.k0 > 0 else None  # nothing frozen below the first layer

    def _configure_graphs(self, opts):
        """hf.compile: the layers a pass runs (from k0 up with the trunk cache);
        hf.cuda_graphs: every forward replayed as a CUDA graph."""
        from .graphs import GraphedForward, compile_layers
        from .passes import decoder_layers
        if opts.compile:
            compile_layers(self.trunk.top if self.trunk is not None else decoder_layers(self.model)[2])
        if opts.cuda_graphs:
            self.forwards.passes.graphs = GraphedForward(self.forwards.passes.graph_forward)

    @property
    def trunk(self):
        """The frozen-trunk cache's FrozenTrunk (None: no cache)."""
        return self.forwards.trunk

    # -- perturbed states ------------------------------------------------------------
    @torch.no_grad()
    def population_losses(self, batch, seeds, eps, applied=0.0):
        """hf.pm_batch: all 2q perturbed states in one batch of 2qB rows, each
        block of B rows under its own side adapter theta +/- eps z_i. The
        trained adapter never moves, so the offset is 0. Without it, the plain
        sequence with the losses read back once at the end: the -eps pass is
        queued while the +eps pass runs, so the device never waits for the host."""
        if not self.opts.pm_batch:
            return each_direction(self, batch, seeds, eps, applied, pair=self._plus_minus_on_device)
        return all_directions(self, batch, seeds, eps, applied)

    @torch.no_grad()
    def state_losses(self, batch, states):
        """hf.pm_batch: the losses under theta + sum(coef * z(seed)) of every state
        (a list of terms; [] is theta itself), shape [len(states), B], in one batch:
        block j of B rows runs under side adapter j. The trained adapter does not move."""
        names = [f"mezo_s{j}" for j in range(len(states))]
        for name, terms in zip(names, states):
            self.side.fill(name, self._tensors, terms)
        rows = objective(self, list(batch) * len(names), adapters=[name for name in names for _ in batch])
        return rows.view(len(names), len(batch))

    def _plus_minus_on_device(self, batch, seed, eps, applied):
        loss_plus, loss_minus, offset = plus_minus(self, batch, seed, eps, applied, on_device=True)
        return loss_plus.cpu(), loss_minus.cpu(), offset

    # -- forward passes --------------------------------------------------------
    @torch.inference_mode()
    def losses(self, batch: Sequence[Example], adapters=None, *, on_device=False) -> torch.Tensor:
        """``adapters``: a peft adapter name per example (None: the trained one);
        ``on_device``: leave the losses on the model's device (read them later)."""
        k = max(len(e.target_ids) for e in batch)
        logits, ids = self.forwards.last_logits([e.prompt_ids + e.target_ids for e in batch], k + 1, adapters)
        losses = target_losses(logits, ids, batch)
        return losses if on_device else losses.cpu()

    @torch.inference_mode()
    def choice_losses(self, prompts, choices, adapters=None, *, on_device=False):
        """``adapters``: a peft adapter name per prompt (None: the trained one)."""
        if any(len(c) != 1 for c in choices):  # one row per (prompt, choice)
            rows = None if adapters is None else [a for a in adapters for _ in choices]
            batch = [Example(p, c) for p in prompts for c in choices]
            return self.losses(batch, rows, on_device=on_device).view(len(prompts), len(choices))
        # single-token choices: one pass over the prompts scores all of them
        logits, _ = self.forwards.last_logits(prompts, 1, adapters)
        losses = (-torch.log_softmax(logits[:, -1], dim=-1)[:, [c[0] for c in choices]]).double()
        return losses if on_device else losses.cpu()

    @torch.inference_mode()
    def base_losses(self, batch):
        """The model without its adapter: one plain padded forward with full
        logits, no cache, no trimmed layer."""
        if self.opts.full_params is not None:
            raise NotImplementedError("hf.full_params: the base weights are the trained ones")
        ids, mask, positions = batch_tensors([e.prompt_ids + e.target_ids for e in batch], self.forwards.pad_id,
                                             self.device)
        with self.model.disable_adapter():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        for t in self._model_tensors:
            t.requires_grad_(False)  # peft's enable_adapters() turns requires_grad back on
        k = max(len(e.target_ids) for e in batch)
        return target_losses(logits[:, -(k + 1):], ids, batch).cpu()

    # -- adapter files -------------------------------------------------------------
    def save_adapter(self, path):
        state = dict(zip(self._names, self._tensors))
        if self.opts.full_params is None:
            write_peft_adapter(state, self.lora, self.model_name, path)
        else:  # trained base weights, by their transformers names
            write_tensors(state, path, FULL_PARAMS_FILE)

    def load_adapter(self, path):
        from pathlib import Path
        if self.opts.full_params is None:
            self._load_state(read_peft_adapter(path), source=Path(path) / "adapter_model.safetensors")
        else:
            self._load_state(read_tensors(path, FULL_PARAMS_FILE), source=Path(path) / FULL_PARAMS_FILE)

    def restore(self, snapshot):
        self._load_state(snapshot, source="snapshot")

    @torch.no_grad()
    def _load_state(self, state, source="initial adapter"):
        # names, exact shapes, floating dtypes: nothing broadcast or cast on the way in
        check_adapter_tensors(state, {n: t.shape for n, t in zip(self._names, self._tensors)}, source)
        for name, tensor in zip(self._names, self._tensors):
            tensor.copy_(state[name])
        self._sync_model_adapter()

    def perturb(self, terms, decay=1.0, direction=None):
        super().perturb(terms, decay, direction)
        self._sync_model_adapter()

    @torch.no_grad()  # peft's enable_adapters() turns requires_grad back on
    def _sync_model_adapter(self):
        """hf.lora_dtype=model: the model's adapter is the fp32 masters rounded once."""
        if self._model_tensors is not self._tensors:
            torch._foreach_copy_(self._model_tensors, self._tensors)

    # -- stats, caches, shutdown ---------------------------------------------------------
    def stats(self) -> BackendStats:
        f = self.forwards
        counts = dict(forward_tokens=f.forward_tokens)
        if self.opts.prefix_sharing:
            counts["prefix_tokens_saved"] = f.prefix_tokens_saved
        if self.trunk is not None:
            counts.update(self.trunk.cache.stats, bytes=self.trunk.cache.bytes, layers_skipped=self.trunk.k0)
        return BackendStats(**counts)

    def reset_stats(self):
        self.forwards.forward_tokens = self.forwards.prefix_tokens_saved = 0
        if self.trunk is not None:
            self.trunk.cache.stats = dict.fromkeys(self.trunk.cache.stats, 0)

    def reset_cache(self):
        self.forwards.last_inputs.clear()
        if self.trunk is not None:
            self.trunk.cache.clear()

    def close(self):
        self.model = self.forwards = None
        self._tensors = self._model_tensors = []

    def generate(self, prompts, max_new_tokens, adapters=None, *, temperature=0.0, seeds=None):
        """Continuations under the current adapter, or under ``adapters`` (a peft adapter
        name per row: hf.pm_batch's side adapters), in one batch with a KV cache, each
        ending at EOS: greedy, or sampled at ``temperature`` with row i's generator
        seeded by ``seeds[i]`` (``generation.generate``)."""
        from .generation import generate
        out = generate(self.model, prompts, max_new_tokens, pad_id=self.forwards.pad_id,
                       eos_id=self.tokenizer.eos_token_id, device=self.device, adapters=adapters,
                       temperature=temperature, seeds=seeds)
        # counted as the forwards count theirs: every prompt token once, every generated one once
        self.forwards.forward_tokens += sum(map(len, prompts)) + sum(map(len, out))
        return out
