"""Side-by-side adapters (``hf.pm_batch``): extra peft adapters, each holding
a perturbed copy theta +/- eps z of the trained one, so that all 2q perturbed
states of a step run in one batch: the frozen GEMMs once over all rows, each
block of rows adding the LoRA delta of its own adapter (peft's mixed-adapter batch)."""
from __future__ import annotations

import torch

from mezo_core.adapter import canonical_name
from mezo_core.perturb import apply_z


class SideAdapters:
    def __init__(self, model, lora_config, names, dist):
        """``lora_config()``: a peft LoraConfig like the trained adapter's; ``names``:
        its tensors' canonical names in z order; ``dist``: the distribution of z."""
        self.model, self.lora_config, self.names, self.dist = model, lora_config, names, dist
        self.tensors = {}   # adapter name -> its tensors in z order

    @torch.no_grad()
    def fill(self, name, source, terms):
        """Adapter ``name`` (added on first use) set to ``source`` + sum(coef * z(seed))."""
        if name not in self.tensors:
            self.model.add_adapter(name, self.lora_config())
            self.model.set_adapter("default")  # training still moves the default adapter only
            params = {canonical_name(n.replace(f".{name}.", ".default.")): p
                      for n, p in self.model.named_parameters() if f".{name}." in n}
            for p in params.values():
                p.requires_grad_(False)
            self.tensors[name] = [params[n] for n in self.names]
        side = self.tensors[name]
        for dst, src in zip(side, source):
            dst.copy_(src)
        apply_z(side, terms, dist=self.dist)
        return side
