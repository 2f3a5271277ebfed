"""The ``hf`` config section: every option of the hf backend, its default, and
the combinations that cannot work together, checked here and nowhere else."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from mezo_core import MezoError
from mezo_core.interfaces import check_option_types
from mezo_core.schema import setting

LORA_DTYPES = ("float32", "model")


@dataclass
class HFOptions:
    trunk_cache: bool = setting(True, "cache hidden states below the first adapted layer")
    cache_budget_mb: float = setting(1024.0, "byte budget of that cache (MiB; fractions allowed)")
    cache_policy: str = setting("lru", "an eviction policy plugin")
    cache_device: Optional[str] = setting(None, "None: the model's device; \"cpu\": keep entries in (pinned) "
                                                "CPU memory")
    pm_batch: bool = setting(False, "run both signs of all q directions as one batch of 2qB rows")
    prefix_sharing: bool = setting(False, "rows of one pass sharing >= prefix_min_tokens compute that prefix "
                                          "once")
    prefix_min_tokens: int = setting(16, "the shortest prefix worth sharing")
    cuda_graphs: bool = setting(False, "replay each forward as a CUDA graph (CUDA only; widths padded to "
                                       "multiples of GRAPH_WIDTH tokens so that few shapes occur)")
    compile: bool = setting(False, "torch.compile the decoder layers a pass runs (fuses norms, rotary "
                                   "embeddings, activations; the first pass of each shape compiles)")
    lora_dtype: str = setting("float32", "dtype of the adapter the forwards use: \"float32\", or \"model\" (e.g. "
                                         "bf16: no fp32 casts around the LoRA GEMMs); MeZO always moves fp32 "
                                         "masters")
    trim_last_layer: bool = setting(True, "the last layer computes only keys and values for positions whose "
                                          "logits no loss reads (exact: those outputs reach no logit)")
    full_params: Optional[List[str]] = setting(None, "full-parameter MeZO: regexes of parameter names to train "
                                                     r'instead of LoRA, e.g. [".*"] or [".*layers\\.2[6-9]\\..*"]')

    def __post_init__(self):
        check_option_types(self, "hf")
        if self.full_params is not None and (not isinstance(self.full_params, (list, tuple))
                                             or not all(isinstance(p, str) for p in self.full_params)):
            raise MezoError(f"config field 'hf.full_params': expected a list of regexes, got {self.full_params!r}")
        if self.cache_device is not None and not isinstance(self.cache_device, str):
            raise MezoError(f"config field 'hf.cache_device': expected a device name, got {self.cache_device!r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise MezoError(f"config field 'hf.lora_dtype': {self.lora_dtype!r} is neither 'float32' nor 'model'")
        if not (math.isfinite(self.cache_budget_mb) and self.cache_budget_mb >= 0):
            raise MezoError(f"config field 'hf.cache_budget_mb': {self.cache_budget_mb} is not a size "
                            f"(a finite number of MiB >= 0)")
        if self.prefix_min_tokens < 1:
            raise MezoError(f"config field 'hf.prefix_min_tokens': {self.prefix_min_tokens} (at least 1)")
        if self.full_params is not None and self.pm_batch:
            raise MezoError("hf.pm_batch holds perturbed LoRA adapters side by side: it needs LoRA, "
                            "not hf.full_params")
        if self.full_params is not None and self.lora_dtype != "float32":
            raise MezoError("hf.lora_dtype sets the dtype of a LoRA adapter; hf.full_params trains the "
                            "base weights in the model's dtype: set only one of them")
