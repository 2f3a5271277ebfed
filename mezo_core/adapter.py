"""The LoRA adapter as plain tensors: its names, its seeded initial values and
its PEFT folder. Every backend starts from the same adapter for the same seed,
whatever engine holds the weights, so their losses and trajectories compare."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from .perturb import mix


def peft_lora_config(lora, base_model: str = ""):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(lora.target_modules),
                      layers_to_transform=None if lora.layers is None else list(lora.layers),
                      task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def canonical_name(param_name: str) -> str:
    """peft parameter name -> the key peft writes to adapter_model.safetensors."""
    return param_name.replace(".default", "")


def adapter_shapes(model_dir, lora) -> dict[str, torch.Size]:
    """Names and shapes of the LoRA tensors, from the model's config alone
    (the model is built on the meta device: no weights are read)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_lora_config(lora))
    return {canonical_name(n): p.shape for n, p in model.named_parameters() if p.requires_grad}


def initial_adapter(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """LoRA init as in peft (A: kaiming-uniform with a=sqrt(5), B: zeros), drawn
    per tensor from (seed, index) so that it does not depend on module order."""
    state = {}
    for index, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        if ".lora_B." in name:
            state[name] = torch.zeros(shape)
            continue
        bound = 1.0 / math.sqrt(shape[-1])  # kaiming_uniform_(a=sqrt(5)) on fan_in
        gen = torch.Generator().manual_seed(mix(seed, index, 0x1A17))
        state[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return state


def check_finite(tensors, what: str) -> None:
    """Refuse NaN/inf (``tensors``: name -> tensor): a non-finite adapter is never
    written, nor loaded to resume or evaluate from."""
    from .errors import MezoError
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise MezoError(f"{what}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) "
                            f"of {tensor.numel()}")


def write_peft_adapter(state: dict[str, torch.Tensor], lora, base_model: str, out: str | Path) -> Path:
    """Write a PEFT adapter folder atomically (temp folder, then rename).
    ``base_model`` is written as ``base_model_name_or_path``: pass the model the
    user named (model.path: a folder, hub id or .gguf), not a converted copy in a
    cache, so that the adapter still says what it adapts on another machine."""
    return write_tensors(state, out, "adapter_model.safetensors",
                         lambda tmp: peft_lora_config(lora, str(base_model)).save_pretrained(tmp))


def read_peft_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, "adapter_model.safetensors", "a PEFT adapter folder")


def write_tensors(state: dict[str, torch.Tensor], out: str | Path, filename: str, extra=None) -> Path:
    """A folder holding ``filename`` (fp32 safetensors), written to a temp folder
    and renamed into place; ``extra(tmp)`` may add files first."""
    from safetensors.torch import save_file
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    if extra is not None:
        extra(tmp)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, tmp / filename)
    replace_dir(tmp, out)
    return out


def read_tensors(path: str | Path, filename: str, what: str = "a mezo-run adapter folder") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .errors import MezoError
    path = Path(path)
    f = path / filename
    if not f.exists():
        raise MezoError(f"{path}: not {what} (no {filename})")
    try:
        state = load_file(str(f))
    except Exception as exc:  # safetensors' own error types: a truncated or foreign file
        raise MezoError(f"{f}: not a readable safetensors file ({exc})") from None
    check_finite(state, f"{f} (refused)")   # never resume or evaluate a NaN/inf adapter
    return state


def _remove_tree(path: Path) -> None:
    """Remove a folder of ours, or unlink whatever else is there (a symlink: never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old ``dst`` is swapped out first. A
    symlink at ``dst`` is refused (runfiles.py: the run folder is a boundary)."""
    from .runfiles import refuse_link
    dst = Path(dst)
    refuse_link(dst)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        _remove_tree(old)
        dst.rename(old)
    src.rename(dst)
    _remove_tree(old)


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically, never through a symlink (runfiles.replace_file)."""
    from .runfiles import replace_file
    replace_file(path, json.dumps(obj, indent=1))
