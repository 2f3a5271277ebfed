"""The model and the tensors MeZO moves in it: a peft LoRA adapter (the
default), or base weights chosen by name (``hf.full_params``)."""
from __future__ import annotations

import re

import torch

from mezo_core import MezoError
from mezo_core.adapter import canonical_name, peft_lora_config
from mezo_core.models import load_pretrained, quiet_torchao_import, torch_dtype


def load_model(cfg, opts, model_dir, device):
    """(model, {canonical name: trainable tensor}), the model in eval mode on
    ``device`` with autograd off everywhere (MeZO never needs it)."""
    quiet_torchao_import()   # before peft imports it
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = load_pretrained(AutoModelForCausalLM, model_dir, dtype=torch_dtype(cfg.model.dtype))
    quantization = cfg.model.get("quantization")
    if quantization and opts.full_params is not None:
        raise MezoError("model.quantization: the base weights are frozen in 8 bits, so they cannot "
                        "be trained (hf.full_params)")
    if not quantization:
        base.to(device)
    base.eval()
    if opts.full_params is None:
        try:
            model = get_peft_model(base, peft_lora_config(cfg.lora, str(model_dir)),
                                   autocast_adapter_dtype=opts.lora_dtype == "float32")
        except ValueError as exc:
            raise MezoError(f"lora: {exc}") from None
        if quantization:  # the base linears under the adapter, block by block onto the device
            quantize_frozen(model, quantization, device)
            model.to(device)
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


#: torchao configs of model.quantization (why torchao: maintained by the PyTorch team, pure
#: PyTorch tensor subclasses that run on the CPU and CUDA and compose with torch.compile, and
#: peft's LoRA wraps its quantized linears unchanged -- the adapter stays a separate fp32/bf16
#: matmul; bitsandbytes' int8 needs CUDA and is not on the GPU host)
def _torchao_config(kind):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow)
    return {"int8": Int8WeightOnlyConfig, "fp8w": Float8WeightOnlyConfig,
            "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[kind]()


@torch.no_grad()
def quantize_frozen(model, kind: str, device) -> int:
    """model.quantization: the linear layers of the decoder blocks in 8 bits (embeddings, norms
    and the output head stay in the model's dtype), one block at a time on ``device``, so the
    full-precision model never sits on the device whole. Returns the number of linears."""
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise MezoError("model.quantization needs torchao: pip install torchao") from None
    device = torch.device(device)
    if kind == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise MezoError("model.quantization: fp8 arithmetic needs a GPU of compute capability >= 8.9 "
                        "(H100, L4, ...); int8 or fp8w store 8-bit weights anywhere")
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not blocks:
        raise MezoError("model.quantization: the model has no list of decoder layers to quantize")
    count = 0

    def linear(module, fqn):   # a frozen base linear, not a LoRA factor
        nonlocal count
        frozen = isinstance(module, torch.nn.Linear) and "lora_" not in fqn
        count += frozen
        return frozen
    for layer in max(blocks, key=len):
        layer.to(device)
        quantize_(layer, _torchao_config(kind), filter_fn=linear)
    if not count:
        raise MezoError("model.quantization: no torch.nn.Linear in the decoder layers to quantize")
    return count
