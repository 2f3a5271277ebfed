"""Runs inside SGLang's scheduler process: MeZO's perturbations applied to the
engine's LoRA buffers in place, from seeds.

How it gets there. SGLang loads *general plugins* (entry-point group
``sglang.srt.plugins``) early in every process it starts, the scheduler
included; this package declares ``register`` there, which adds the ``mezo_*``
methods below to SGLang's ``Scheduler``. The driver reaches them with
``Engine.collective_rpc("mezo_...", **kwargs)`` (the scheduler runs
``getattr(self, method)(**kwargs)`` between batches and answers success or the
error's text). Nothing but seeds, coefficients and names crosses the process
boundary; nothing touches the disk per step.

The state. The scheduler holds the seeded state of ``mezo_core.engine_state``
(the fp32 master copy, z regenerated from seeds on its GPU). Adapters loaded
once from a PEFT folder and pinned are its *slots*: ``plus`` holds theta,
``minus`` a perturbed copy (the other sign of a step, evaluated in the same
engine call), ``s2``..``s<2q>`` the other perturbed states of a step when all of
them go in one call. This module is SGLang's slot layout and how its scheduler
is reached.

Writing a slot. SGLang keeps every loaded adapter in a memory-pool slot:
``A_buffer[module][layer][slot, :c*r, :]`` and ``B_buffer[module][layer][slot,
:, :r]`` (model dtype), where q/k/v are stacked into ``qkv_proj`` (A: rows of r
in the order q, k, v; B: output rows q, k, v) and gate/up into ``gate_up_proj``,
and the scaling alpha/r is applied at run time (SGLang's
``LoRAAdapter.normalize_*`` and ``LoRAMemoryPool.load_lora_weight_to_buffer``).
``slot_views`` maps each PEFT tensor to its view of the slot once; a write is one
``copy_`` per tensor (rounding to the buffer's dtype, as SGLang's own load
does). Rows no PEFT tensor owns (k of a q/v adapter) stay as SGLang's load left
them: zero. The GPU test checks a written slot against SGLang's own load of the
same tensors, bit for bit.

Prefix cache. SGLang keys its radix cache by the adapter's ``lora_id``, which an
in-place write does not change; so every write flushes the cache (cheap: the
radix tree and the KV allocator are reset, no memory is released). A prefix
computed under one state is never served to another; prefixes are still shared
within a state, e.g. by ``prime_min_tokens``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from mezo_core.adapter import read_peft_adapter
from mezo_core.engine_state import EngineState, SeededWorker

#: PEFT module -> (SGLang's stacked module, position in the stack, stack size)
STACKED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
           "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}

_NAME = re.compile(r"\.layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])\.weight$")


def parse_name(name: str) -> tuple[int, str, str]:
    """(layer, PEFT module, "A" or "B") of a canonical PEFT tensor name."""
    m = _NAME.search(name)
    if m is None:
        raise ValueError(f"sglang in-place: cannot place {name!r} (only per-layer LoRA "
                         f"tensors model.layers.N.<module>.lora_A/B.weight are supported)")
    return int(m.group(1)), m.group(2), m.group(3)


def slot_views(names, shapes, a_buffers, b_buffers, slot: int) -> list[torch.Tensor]:
    """For each PEFT tensor (``names``/``shapes``), the view of memory-pool slot
    ``slot`` it occupies in SGLang's layout (see the module docstring).
    ``a_buffers[module][layer]`` is a [slots, c*max_r, in] tensor,
    ``b_buffers[module][layer]`` a [slots, out, max_r] one."""
    parsed = [parse_name(n) for n in names]
    b_rows = {}  # (layer, peft module) -> output rows of its B
    for (layer, module, kind), shape in zip(parsed, shapes):
        if kind == "B":
            b_rows[(layer, module)] = int(shape[0])
    views = []
    for name, (layer, module, kind), shape in zip(names, parsed, shapes):
        target, part, parts = STACKED.get(module, (module, 0, 1))
        buffers = a_buffers if kind == "A" else b_buffers
        if target not in buffers:
            raise ValueError(f"sglang in-place: {name}: the engine has no LoRA buffer for "
                             f"{target!r} (its buffers: {sorted(buffers)})")
        buf = buffers[target][layer][slot]
        if kind == "A":
            r = int(shape[0])
            view = buf[part * r:(part + 1) * r, :]
        else:
            r, rows = int(shape[1]), int(shape[0])
            if target == "qkv_proj" and module != "q_proj":
                # k and v have equal widths; q takes the rest
                kv = rows
                start = buf.shape[0] - (3 - part) * kv
            else:
                start = part * (buf.shape[0] // parts)
            view = buf[start:start + rows, :r]
        if tuple(view.shape) != tuple(shape):
            raise ValueError(f"sglang in-place: {name} has shape {tuple(shape)} but its place in "
                             f"SGLang's {target} buffer of layer {layer} is {tuple(view.shape)}")
        views.append(view)
    return views


def _manager(scheduler):
    mgr = getattr(scheduler.tp_worker.model_runner, "lora_manager", None)
    if mgr is None:
        raise RuntimeError("mezo: the engine runs without LoRA (enable_lora=True is needed)")
    return mgr


def _uid(mgr, name: str) -> str:
    for uid, ref in mgr.lora_refs.items():
        if ref.lora_name == name:
            return uid
    raise RuntimeError(f"mezo: no LoRA adapter named {name!r} is loaded")


def _flush(scheduler) -> None:
    if not scheduler.flush_cache(empty_cache=False):
        raise RuntimeError("mezo: the radix cache could not be flushed (requests in flight)")


class SchedulerMethods(SeededWorker):
    """The ``mezo_*`` methods that ``add_methods`` grafts onto SGLang's Scheduler
    (``self`` is the scheduler); the seeded-state ones come from ``SeededWorker``.
    Slots are named by role: ``plus`` (the trained adapter), ``minus``, ``s<k>``."""

    def mezo_attach(self, slots: dict, adapter_dir: str) -> None:
        """Take the adapters named in ``slots`` (role -> adapter name; loaded from
        ``adapter_dir`` and pinned) under mezo's control: the state is the folder's
        tensors, each role's slot views are mapped."""
        mgr = _manager(self)
        if getattr(mgr, "tp_size", 1) != 1:
            raise RuntimeError("mezo: in-place adapter updates need tp_size=1 "
                               "(use sglang.adapter_transport=bucket)")
        uids = {role: _uid(mgr, name) for role, name in slots.items()}
        mgr.fetch_new_loras(set(uids.values()))  # into memory-pool slots (pinned: they stay there)
        pool = mgr.memory_pool
        state = read_peft_adapter(Path(adapter_dir))
        names = sorted(state)
        shapes = [tuple(state[n].shape) for n in names]
        slots = {role: pool.uid_to_buffer_id[uid] for role, uid in uids.items()}
        self._mezo_views = {role: slot_views(names, shapes, pool.A_buffer, pool.B_buffer, slot)
                            for role, slot in slots.items()}  # role -> one view per tensor
        self._mezo = EngineState(state, next(iter(self._mezo_views.values()))[0].device)
        self._mezo_uids, self._mezo_slots = uids, slots   # the views hold these slots
        self._mezo_write()

    @torch.no_grad()
    def _mezo_write(self, role: str = "plus", tensors=None, flush: bool = True) -> None:
        pool = _manager(self).memory_pool
        if pool.uid_to_buffer_id.get(self._mezo_uids[role]) != self._mezo_slots[role]:
            # pinned adapters are never evicted nor moved; make sure, the views hold that slot
            raise RuntimeError(f"mezo: adapter {role!r} left its memory-pool slot")
        for view, tensor in zip(self._mezo_views[role], self._mezo.tensors if tensors is None else tensors):
            view.copy_(tensor)
        if flush:
            _flush(self)

    def mezo_fill_slots(self, fills, dist: str = "gaussian") -> None:
        """Each (role, terms): that slot <- theta + sum coef*z(seed, i), computed on
        copies; one cache flush for all (the minus side of a direction, or every state
        of a step side by side)."""
        for role, terms in fills:
            self._mezo_write(role, self._mezo.filled(terms, dist), flush=False)
        _flush(self)

    def mezo_compare_slot(self, role: str, reference: str) -> None:
        """Raise unless the ``role`` slot equals, bit for bit over every mapped view,
        the slot SGLang filled itself when it loaded adapter ``reference`` (tests)."""
        mgr = _manager(self)
        pool = mgr.memory_pool
        uid = _uid(mgr, reference)
        mgr.fetch_new_loras({uid, *self._mezo_uids.values()})
        names = self._mezo.names
        shapes = [tuple(t.shape) for t in self._mezo.tensors]
        theirs = slot_views(names, shapes, pool.A_buffer, pool.B_buffer, pool.uid_to_buffer_id[uid])
        for name, mine, ref in zip(names, self._mezo_views[role], theirs):
            if not torch.equal(mine, ref):
                diff = (mine.float() - ref.float()).abs().max().item()
                raise AssertionError(f"mezo: slot {role!r} differs from SGLang's load of {reference!r} "
                                     f"at {name} (max |diff| {diff:g})")
        slot, ref_slot = self._mezo_slots[role], pool.uid_to_buffer_id[uid]
        for module, layers in pool.A_buffer.items():  # rows no tensor owns are equal too
            for a_layer, b_layer in zip(layers, pool.B_buffer[module]):
                if not (torch.equal(a_layer[slot], a_layer[ref_slot])
                        and torch.equal(b_layer[slot], b_layer[ref_slot])):
                    raise AssertionError(f"mezo: slot {role!r} differs from {reference!r} in {module}")


def add_methods(cls) -> None:
    """Give ``cls`` (SGLang's Scheduler, or a stand-in) the mezo methods."""
    for klass in reversed(SchedulerMethods.__mro__):
        for name, func in vars(klass).items():
            if name.startswith(("mezo_", "_mezo_")):
                setattr(cls, name, func)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: runs in every SGLang process."""
    try:
        from sglang.srt.managers.scheduler import Scheduler
    except ImportError:  # an SGLang without that module: the driver reports it on attach
        return
    add_methods(Scheduler)
