"""The GPU host's one entry point: install this checkout offline, then run a suite.

    python -m benchmarks gpu SUITE [--out-dir $OUT]      # e.g. kernels, hf, dp, sglang (list: python -m benchmarks list)

The host has torch, transformers and peft, no network and no install of this
repository. ``pip install --no-index --no-deps --target`` puts the repository's
own distributions (mezo-run; an engine backend where the suite needs one) and the
wheels carried in ``.whl/`` (omegaconf, antlr4, gguf) into one site folder: real dist-info, so the
plugins' entry points are found exactly as on any machine. A GGUF carried in
parts in ``.device/`` is put back together; a suite that needs SGLang adds the
site of the bundle in ``.offline/carry`` (its ``install.sh`` prints it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .suites import ROOT, SUITES, run

SITE = Path("/tmp/site")
MODEL = Path("/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf")


def install(engines=(), site: Path = SITE) -> None:
    """mezo-run (core, hf backend, built-in plugins), the engine backends a suite
    needs (``backends/<name>``) and the carried wheels, once per host."""
    done = site / (".done-" + "-".join(("mezo-run", *engines)))
    if done.exists():
        return
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    dists = [str(ROOT)] + [str(ROOT / "backends" / name) for name in engines]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--no-build-isolation", "--upgrade", "--target", str(site), *wheels, *dists],
                   cwd=ROOT, check=True)
    done.touch()


def reassemble_model(model: Path = MODEL) -> Path | None:
    """The bundled GGUF, larger than one call may ship, from its parts in .device/."""
    parts = sorted((ROOT / ".device").glob("gguf.part*"))
    if not model.exists() and parts:
        model.parent.mkdir(parents=True, exist_ok=True)
        with open(model, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
    return model if model.exists() else None


def sglang_site() -> str:
    script = ROOT / ".offline" / "carry" / "install.sh"
    if not script.exists():
        raise SystemExit(f"the sglang suites need the SGLang bundle: {script} is not here")
    lines = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return lines.strip().splitlines()[-1].removeprefix("export PYTHONPATH=")


def main(name: str, out_dir: str | None = None) -> int:
    suite = SUITES[name]
    install(suite.needs)
    paths = [str(SITE)] + ([sglang_site()] if "sglang" in suite.needs else [])
    env = {"PYTHONPATH": os.pathsep.join(paths), "NCCL_NVLS_ENABLE": "0",
           "PATH": f"{SITE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    model = reassemble_model()
    if model:
        env["MEZO_MODEL"] = str(model)
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    record = run(name, Path(out_dir) if out_dir else None, env, command=f"python -m benchmarks gpu {name}")
    for step in record["steps"]:
        print(f"{step['name']:40} rc={step['rc']} {step['wall_s']} s")
    return 0 if record["all_ok"] else 1
