"""How SGLang's engine-side adapter follows the driver's trainable state
(``sglang.adapter_transport``):

* ``in_place`` (the default): seeds only. This package's
  SGLang plugin (``worker.py``, entry point ``sglang.srt.plugins``) gives the
  scheduler ``mezo_*`` methods; ``Engine.collective_rpc`` sends them (seed,
  coefficient) terms, and the scheduler regenerates the same z on its GPU and
  writes theta into a pinned adapter's memory-pool slot in place, flushing the
  radix cache (keyed by the adapter, which an in-place write keeps) so no prefix
  is ever served across states. A second slot holds theta - eps z: both signs of
  a step go in one ``generate`` call (``paired_signs``).
* ``bucket``, ``tensors``, ``disk``: whenever the state has changed and losses
  are asked for, it is loaded as a new adapter *version* under a new name
  (``load_lora_adapter_from_tensors`` or a PEFT folder) and the previous
  version is unloaded. SGLang's radix cache is keyed by the adapter's
  ``lora_id``, fresh per load, so a prefix computed under one version can never
  serve a request of another; the versioned name makes that guarantee ours.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import torch

from mezo_core import MezoError
from mezo_core.adapter import write_peft_adapter


def lora_config_dict(lora, base_model: str = "") -> dict[str, Any]:
    """The adapter_config.json content SGLang needs to accept an adapter."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora.r),
            "lora_alpha": float(lora.alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(lora.target_modules),
            "layers_to_transform": None if lora.layers is None else list(lora.layers),
            "use_dora": False, "use_rslora": False, "base_model_name_or_path": str(base_model)}


class AdapterTransport:
    """The engine side of the state, for ``SGLangBackend``: the in_place slots
    and their scheduler calls, or the versioned loads of the other transports.

    The backend holds what these methods read and write: ``engine``,
    ``transport``, ``in_place``, ``prefix`` (the adapter names' stem), ``lora``,
    ``model_dir``, the state (``_names``, ``_tensors``, ``state_dict()``,
    ``_config_dict``), the version bookkeeping (``_version``, ``_loaded``,
    ``_dirty``), ``_tmp`` (the folder of disk loads and in_place's start) and
    ``_stats`` (the ``adapter_*`` counters)."""

    # -- in_place: the scheduler holds the state in pinned adapter slots -----------------
    def _attach(self, extra: int = 1) -> None:
        """Load the initial state as pinned adapters (plus: the trained one; minus and
        s2..s<extra>: the perturbed states beside it) and hand them to the scheduler's
        mezo methods (``worker.py``)."""
        self._tmp = tempfile.mkdtemp(prefix="mezo-sglang-")
        folder = os.path.join(self._tmp, "initial")
        write_peft_adapter(self.state_dict(), self.lora, self.model_dir, folder)
        self._roles = ["plus", "minus"] + [f"s{k}" for k in range(2, extra + 1)]
        self._slot_names = [self.prefix] + [f"{self.prefix}-{role}" for role in self._roles[1:]]
        for name in self._slot_names:
            self._check(self.engine.load_lora_adapter(name, folder, pinned=True), f"loading adapter {name}")
        self._rpc("mezo_attach", slots=dict(zip(self._roles, self._slot_names)), adapter_dir=folder)
        self._loaded, self._dirty, self._version = self._slot_names[0], False, 1  # version 0 is in the engine

    def _rpc(self, method: str, **kwargs) -> None:
        t0 = time.perf_counter()
        try:
            self.engine.collective_rpc(method, **kwargs)
        except AssertionError as exc:  # SGLang asserts the scheduler's success flag
            text = str(exc)
            if "has no attribute 'mezo_" in text:
                text = ("the scheduler has no mezo methods: the mezo-backend-sglang package's SGLang "
                        "plugin (entry point group sglang.srt.plugins) is not installed where SGLang "
                        "runs; pip install it, or set sglang.adapter_transport=bucket")
            raise MezoError(f"sglang: {method} failed in the scheduler: {text}") from None
        if method != "mezo_attach":  # writes only: the one-time attach is not a write
            self._stats["adapter_write_s"] += time.perf_counter() - t0
            self._stats["adapter_writes"] += 1

    # -- the other transports: one adapter version per state ----------------------------
    @property
    def adapter_name(self) -> str:
        """The engine-side adapter that holds the current state (loading it if needed)."""
        return self._sync()

    def _sync(self) -> str:
        if self.in_place or (not self._dirty and self._loaded is not None):
            return self._loaded
        name = f"{self.prefix}-v{self._version}"
        self._version += 1
        t0 = time.perf_counter()
        if self.transport == "bucket":
            result = self.engine.load_lora_adapter_from_tensors(
                name, self._bucket(), dict(self._config_dict), load_format="flattened_bucket")
        elif self.transport == "tensors":
            tensors = {n: t.detach().to("cpu", torch.float32).contiguous()
                       for n, t in zip(self._names, self._tensors)}
            result = self.engine.load_lora_adapter_from_tensors(name, tensors, dict(self._config_dict))
        else:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="mezo-sglang-")
            folder = os.path.join(self._tmp, name)
            write_peft_adapter(self.state_dict(), self.lora, self.model_dir, folder)
            result = self.engine.load_lora_adapter(name, folder)
        self._check(result, f"loading adapter version {name}")
        old, self._loaded, self._dirty = self._loaded, name, False
        self._stats["adapter_loads"] += 1
        if old is not None:
            self._check(self.engine.unload_lora_adapter(old), f"unloading adapter version {old}")
            self._stats["adapter_unloads"] += 1
            if self._tmp is not None:
                shutil.rmtree(os.path.join(self._tmp, old), ignore_errors=True)
        self._stats["adapter_load_s"] += time.perf_counter() - t0
        return name

    def _bucket(self) -> str:
        """The state as SGLang's serialized flattened bucket: one fp32 CPU
        tensor (one shared-memory segment to pass between processes, where a
        dict of tensors costs one per tensor: 0.8 s a load at 120 tensors)."""
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
        flat = torch.cat([t.detach().reshape(-1) for t in self._tensors]).to("cpu", torch.float32)
        flat = flat.view(torch.uint8)
        metadata, start = [], 0
        for name, t in zip(self._names, self._tensors):
            nbytes = t.numel() * 4
            metadata.append(FlattenedTensorMetadata(name=name, shape=t.shape, dtype=torch.float32,
                                                    start_idx=start, end_idx=start + nbytes,
                                                    numel=nbytes))
            start += nbytes
        return MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metadata},
                                                   output_str=True)

    @staticmethod
    def _check(result, what: str) -> None:
        ok = getattr(result, "success", None)
        if ok is None and isinstance(result, dict):
            ok = result.get("success", True)
        if ok is False:
            msg = getattr(result, "error_message", None) or (
                result.get("error_message") if isinstance(result, dict) else None)
            raise MezoError(f"sglang: {what} failed: {msg}")
