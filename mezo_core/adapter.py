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

from .philox import mix


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


#: adapter_config.json fields of PEFT LoRA variants that the backends do not apply: an adapter
#: using one would be evaluated, trained or merged as another adapter. field -> its plain value
UNSUPPORTED_LORA = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                    "rank_pattern": {}, "alpha_pattern": {}}


def read_lora_config(conf: str | Path) -> dict:
    """``{"r", "alpha", "target_modules", "layers"}`` of a PEFT adapter's
    ``adapter_config.json``, every field checked before use (one line naming the file
    and the field): ``peft_type`` LORA (others are refused, not half-applied), ``r``
    an integer in [1, MAX_LORA_R], ``lora_alpha`` a finite number in (0, 1e6] (as the
    config's lora.r and lora.alpha), module names, layer indices >= 0, and none of
    the variants of UNSUPPORTED_LORA."""
    from .config import MAX_LORA_R
    from .errors import MezoError
    where = f"--adapter: {conf}"
    try:
        data = json.loads(Path(conf).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:   # UnicodeDecodeError is a ValueError
        raise MezoError(f"--adapter: cannot read {conf}: {(str(exc).splitlines() or [type(exc).__name__])[0][:120]}"
                        ) from None
    if not isinstance(data, dict):
        raise MezoError(f"--adapter: cannot read {conf}: not a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise MezoError(f"{where}: peft_type {str(peft_type)[:40]!r} is not supported (mezo-run reads, trains and "
                        f"merges LoRA adapters: peft_type 'LORA')")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise MezoError(f"--adapter: {conf} has no {key!r} field")
    r, alpha, modules, layers = data["r"], data["lora_alpha"], data["target_modules"], data.get("layers_to_transform")

    def bad(key, value, what):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise MezoError(f"--adapter: cannot read {conf}: field {key!r}: {shown} {what}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_LORA_R:
        bad("r", r, f"is not an integer in [1, {MAX_LORA_R}]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and 0 < alpha <= 1e6):
        bad("lora_alpha", alpha, "is not a finite number in (0, 1e6] (the adapter's scale is lora_alpha / r)")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        bad("target_modules", modules, "is not a list of module names")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1_000_000 for i in layers)):
        bad("layers_to_transform", layers, "is not a list of layer indices >= 0 (or null: every layer)")
    for key, plain in UNSUPPORTED_LORA.items():
        if data.get(key, plain) not in (plain, None, {}, []):
            bad(key, data[key], f"is not supported (only plain LoRA, {key}: {json.dumps(plain)}, is applied)")
    return {"r": r, "alpha": float(alpha), "target_modules": list(modules), "layers": layers}


def check_adapter_tensors(state: dict[str, torch.Tensor], shapes: dict, source) -> None:
    """Tensors read from outside checked against the adapter the model holds
    (``shapes``: name -> shape) before any is used: none missing, none extra, each of
    its exact shape (``copy_`` would broadcast a [1, n] tensor into [4, n]) and of a
    floating-point dtype (an int64 tensor would be cast without a word)."""
    from .errors import MezoError
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing:
        raise MezoError(f"{source}: adapter lacks {len(missing)} tensors, e.g. {missing[0]} (not an adapter of "
                        "this model and lora config)")
    if extra:
        raise MezoError(f"{source}: tensor {extra[0]!r} is not part of this model's adapter ({len(extra)} such; "
                        "r, target_modules and layers come from the adapter's adapter_config.json)")
    for name in sorted(shapes):
        tensor = state[name]
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise MezoError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, the model's adapter "
                            f"needs {list(shapes[name])}")
        if not tensor.dtype.is_floating_point:
            raise MezoError(f"{source}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not a "
                            "floating-point type")


def write_tensors(state: dict[str, torch.Tensor], out: str | Path, filename: str, extra=None) -> Path:
    """A folder holding ``filename`` (fp32 safetensors), written to a temp folder
    and renamed into place; ``extra(tmp)`` may add files first. A failed write (a
    full disk) is one line naming the file, the temp folder removed."""
    from safetensors.torch import save_file

    from .runfiles import writing
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    _remove_tree(tmp)
    with writing(out, cleanup=tmp):
        tmp.mkdir(parents=True)
    if extra is not None:
        with writing(out, cleanup=tmp):   # e.g. adapter_config.json
            extra(tmp)
    with writing(out / filename, cleanup=tmp):
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
