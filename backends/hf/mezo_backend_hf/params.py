"""The model and the tensors MeZO moves in it: a peft LoRA adapter (the
default), or base weights chosen by name (``hf.full_params``)."""
from __future__ import annotations

import re

import torch

from mezo_core import MezoError
from mezo_core.adapter import canonical_name, peft_lora_config
from mezo_core.models import torch_dtype


def load_model(cfg, opts, model_dir, device):
    """(model, {canonical name: trainable tensor}), the model in eval mode on
    ``device`` with autograd off everywhere (MeZO never needs it)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(cfg.model.dtype))
    base.to(device).eval()
    if opts.full_params is None:
        try:
            model = get_peft_model(base, peft_lora_config(cfg.lora, str(model_dir)),
                                   autocast_adapter_dtype=opts.lora_dtype == "float32")
        except ValueError as exc:
            raise MezoError(f"lora: {exc}") from None
        params = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    else:
        model, params = base, full_params(base, opts.full_params)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, params


def full_params(model, patterns):
    """hf.full_params: the base weights whose names match a pattern."""
    try:
        regexes = [re.compile(p) for p in patterns]
    except (re.error, TypeError) as exc:
        raise MezoError(f"hf.full_params: {exc}") from None
    params = {n: p for n, p in model.named_parameters() if any(r.fullmatch(n) for r in regexes)}
    if not params:
        raise MezoError(f"hf.full_params: no parameter name matches {list(patterns)} "
                        f"(names look like {next(iter(dict(model.named_parameters())))})")
    return params


@torch.no_grad()
def masters(tensors):
    """fp32 masters of an adapter the model holds in another dtype
    (``hf.lora_dtype=model``): MeZO moves these, the model's copy is rounded once per move."""
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t.float() for t in tensors]
