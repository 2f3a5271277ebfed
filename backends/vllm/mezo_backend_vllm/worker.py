"""Runs inside the vLLM worker (mixed into its class through ``worker_extension_cls``).

The worker holds the seeded state of ``mezo_core.engine_state`` (the fp32 master
copy, z regenerated from seeds on the worker's device, a second adapter for the
other sign): the driver only sends seeds, coefficients and the distribution of
z, never tensors, and nothing touches the disk. This module is vLLM's slot
layout: how a state reaches the adapter's slot.

The first time an adapter id is written (and whenever it changes slot), the PEFT
tensors are converted to vLLM's layout by vLLM's own
adapter code (``LoRAModel.from_lora_tensors``: PEFT names to vLLM modules;
``_create_merged_loras_inplace``: q/k/v and gate/up packing into qkv_proj /
gate_up_proj, ``lora_alpha / r`` folded into B) and copied into the adapter's GPU
slot with each layer's ``set_lora`` (padding to ``max_lora_rank``), which is what
vLLM does when it activates an adapter read from disk. The registered CPU-side
``LoRAModel`` is replaced as well, so that a later re-activation (LRU) brings
back the current weights, never the initial folder's. ``mezo_fill`` does the same
for a second adapter id from a perturbed *copy* of the state (the minus side of
``plus_minus_losses``); both adapters are pinned, so vLLM never reloads either
from the (stale) folder on disk -- or, with the fast writes below, a stale one.

After that first write, every later one goes straight into the slot
(``_mezo_fast_views``): each PEFT tensor's view of the packed ``lora_a_stacked``
/ ``lora_b_stacked`` (slice i of qkv_proj is q, k, v; of gate_up_proj gate, up),
written with ``copy_`` and, for B, the scaling multiplied in the slot's dtype --
vLLM's own arithmetic (``from_lora_tensors`` casts, ``optimize`` scales). The
views are used only if they hold, bit for bit, what vLLM's conversion has just
put there; otherwise every write keeps taking vLLM's path. A write is then a few
small copies instead of a LoRAModel rebuild.
"""
from __future__ import annotations

import inspect
import re

import torch

from mezo_core.engine_state import EngineState, SeededWorker


class MezoWorkerExtension(SeededWorker):
    """Methods reached with ``LLM.collective_rpc("mezo_...")``; the seeded-state
    ones (``mezo_perturb``, ``mezo_load``, ``mezo_state_bytes``, ``mezo_save``)
    come from ``SeededWorker``. Slots are named by LoRA id."""

    # -- state ---------------------------------------------------------------------
    def mezo_attach(self, lora_int_id: int, adapter_dir: str) -> list[str]:
        """Take the adapter registered as ``lora_int_id`` (loaded by vLLM from
        ``adapter_dir``) under mezo's control; returns the trainable names."""
        from vllm.lora.peft_helper import PEFTHelper

        wm = self.model_runner.lora_manager
        self._mezo_lora_id = int(lora_int_id)
        self._mezo_peft_helper = PEFTHelper.from_local_dir(adapter_dir, wm.max_position_embeddings)
        self._mezo = EngineState.from_folder(adapter_dir, self._mezo_device())
        self._mezo_write()
        return list(self._mezo.names)

    def mezo_fill(self, lora_int_id: int, terms, dist: str = "gaussian") -> None:
        """Adapter ``lora_int_id`` (not the trained one) <- theta + sum coef*z(seed, i),
        computed on copies: the minus side of a side-by-side +/- evaluation."""
        if int(lora_int_id) == self._mezo_lora_id:
            raise ValueError("mezo_fill: that is the trained adapter")
        self._mezo_write(int(lora_int_id), self._mezo.filled(terms, dist))

    def mezo_fill_slots(self, fills, dist: str = "gaussian") -> None:
        """``mezo_fill`` of each (lora_int_id, terms): the states of a step side by side."""
        for lora_int_id, terms in fills:
            self.mezo_fill(lora_int_id, terms, dist)

    def mezo_slot_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """vLLM's stacked (A, B) of the adapter's slot per LoRA layer (tests)."""
        mgr = self.model_runner.lora_manager._adapter_manager
        index = mgr.lora_index_to_id.index(self._mezo_lora_id)
        out = {}
        for name, module in mgr.modules.items():
            a, b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
            if a is None or b is None:
                continue
            out[name] = (tuple(x[index].detach().cpu().clone() for x in a),
                         tuple(x[index].detach().cpu().clone() for x in b))
        return out

    def mezo_fast_writes(self) -> dict[int, bool]:
        """Adapter id -> whether its writes go straight into the slot (tests, benchmarks)."""
        return {lora_id: views is not None for lora_id, (_, views) in getattr(self, "_mezo_fast", {}).items()}

    # -- helpers -------------------------------------------------------------------
    def _mezo_device(self) -> torch.device:
        dev = getattr(self, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    def _mezo_lora_model(self, lora_id: int, state: list[torch.Tensor]):
        """A vLLM LoRAModel of ``state`` (PEFT layout), built by vLLM's loader code."""
        from vllm.lora.lora_model import LoRAModel

        wm = self.model_runner.lora_manager
        mgr = wm._adapter_manager
        model = mgr.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        # the mapper without the q/k/v -> qkv fusion maps, so that the manager packs the
        # constituents itself (vLLM 0.32: get_rename_mapper, 0.26: get_unstacked_mapper)
        for view in ("get_rename_mapper", "get_unstacked_mapper"):
            if hasattr(mapper, view):
                mapper = getattr(mapper, view)()
                break
        device = self._mezo_device()
        # clones: vLLM scales lora_b in place (LoRALayerWeights.optimize)
        tensors = {n: t.detach().clone() for n, t in zip(self._mezo.names, state)}
        kwargs = dict(lora_model_id=lora_id, tensors=tensors,
                      peft_helper=self._mezo_peft_helper, device=str(device),
                      dtype=mgr.lora_config.lora_dtype, model_vocab_size=wm.vocab_size,
                      weights_mapper=mapper, skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        # keep to the arguments this vLLM version's loader takes (they vary by release)
        accepted = inspect.signature(LoRAModel.from_lora_tensors).parameters
        lora = LoRAModel.from_lora_tensors(**{k: v for k, v in kwargs.items() if k in accepted})
        if not lora.loras:
            raise ValueError("none of the adapter's tensors maps to a LoRA layer of the vLLM model")
        return lora

    def _mezo_fast_views(self, lora_id: int, state: list[torch.Tensor]):
        """Each tensor's (view of adapter ``lora_id``'s slot, scaling or None), if
        they hold ``state`` as vLLM has just written it; None otherwise."""
        mgr = self.model_runner.lora_manager._adapter_manager
        index = mgr.lora_index_to_id.index(lora_id)
        member_of = {m: (packed, i) for packed, members in getattr(mgr, "packed_modules_mapping", {}).items()
                     for i, m in enumerate(members)}
        scaling = float(self._mezo_peft_helper.vllm_lora_scaling_factor)
        views = []
        for name, tensor in zip(self._mezo.names, state):
            m = re.search(r"(?:^|\.)(model\.layers\.\d+\..*)\.(\w+)\.lora_([AB])\.weight$", name)
            if m is None:
                return None
            prefix, leaf, kind = m.groups()
            packed, i = member_of.get(leaf, (leaf, 0))
            module = mgr.modules.get(f"{prefix}.{packed}")
            stacked = getattr(module, "lora_a_stacked" if kind == "A" else "lora_b_stacked", None)
            if stacked is None or i >= len(stacked):
                return None
            view = stacked[i][index, 0, :tensor.shape[0], :tensor.shape[1]]
            s = None if kind == "A" or scaling == 1 else scaling
            if view.shape != tensor.shape or not torch.equal(view, self._mezo_cast(tensor, view.dtype, s)):
                return None
            views.append((view, s))
        return views

    @staticmethod
    def _mezo_cast(tensor, dtype, scaling):
        out = tensor.to(dtype, copy=True)
        return out if scaling is None else out.mul_(scaling)

    @torch.no_grad()
    def _mezo_write(self, lora_id: int | None = None, state: list[torch.Tensor] | None = None) -> None:
        """Register ``state`` (default: the trained state) as adapter ``lora_id``
        (default: the trained one), replacing its previous weights, and activate it
        (the same slot when it was active); straight into the slot once that is known
        to be exact (module docstring)."""
        mgr = self.model_runner.lora_manager._adapter_manager
        lora_id = self._mezo_lora_id if lora_id is None else lora_id
        state = self._mezo.tensors if state is None else state
        fast = self.__dict__.setdefault("_mezo_fast", {})  # lora id -> (slot, views or None)
        slot, views = fast.get(lora_id, (None, None))
        if views is not None and lora_id in mgr.lora_index_to_id and mgr.lora_index_to_id.index(lora_id) == slot:
            for (view, scaling), tensor in zip(views, state):
                view.copy_(tensor)
                if scaling is not None:
                    view.mul_(scaling)
            return
        lora = self._mezo_lora_model(lora_id, state)
        slots_before = list(mgr.lora_index_to_id)
        mgr.remove_adapter(lora_id)
        mgr.add_adapter(lora)            # packs qkv/gate_up, folds the scaling into B
        mgr.activate_adapter(lora_id)    # set_lora of every layer into a free slot
        if hasattr(mgr, "pin_adapter"):
            try:
                mgr.pin_adapter(lora_id)  # never evicted: a reload would read the stale folder
            except (NotImplementedError, ValueError):
                pass
        if list(mgr.lora_index_to_id) != slots_before:
            # the adapter moved slot: make the next step rebuild the punica mapping
            mgr._last_mapping = None
        fast[lora_id] = (mgr.lora_index_to_id.index(lora_id), self._mezo_fast_views(lora_id, state))
