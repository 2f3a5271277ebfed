"""The GPU host's one entry point: install this checkout offline, then run a suite.

    python -m benchmarks gpu SUITE [--out-dir $OUT]      # e.g. kernels, hf, dp, sglang (list: python -m benchmarks list)

The host has torch, transformers and peft, no network and no install of this
repository. ``pip install --no-index --no-deps --target`` puts the repository's
own distributions (mezo-run; an engine backend where the suite needs one) and the
wheels carried in ``.whl/`` (omegaconf, antlr4, gguf) into one site folder: real dist-info, so the
plugins' entry points are found exactly as on any machine. A GGUF carried in
parts in ``.device/`` is put back together; a suite that needs an engine adds the
site of its bundle (``../shared/offline-gpu``: parts shipped one call at a time,
each folder under ``.offline/`` holding a part, its MANIFEST and ``install.sh``).
"""
from __future__ import annotations

import hashlib
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
    sources = hashlib.sha1()
    for path in sorted(ROOT.glob("**/*.py")) + sorted(ROOT.glob("**/pyproject.toml")):
        if ".offline" not in path.parts and ".device" not in path.parts:
            sources.update(path.read_bytes())
    done = site / (".done-" + "-".join(("mezo-run", *engines)) + "-" + sources.hexdigest()[:12])
    if done.exists():  # this very code, installed by an earlier call on this host
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


def assets(model: Path, root: Path = Path("/tmp/assets")) -> Path:
    """A ``MEZO_ASSETS`` folder (the recipes' layout) from the model and the SST-2
    files carried in ``.device/sst2dl``: what ``conf/sst2.yaml`` reads."""
    target = root / "models" / "smollm2-135m-instruct" / model.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(model)
    data = root / "data" / "sst2"
    data.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / ".device" / "sst2dl").glob("*.tsv"):
        if not (data / f.name).exists():
            (data / f.name).write_bytes(f.read_bytes())
    return root


ENGINES = ("sglang", "vllm")


def engine_site(engine: str) -> str:
    """Where the engine's offline bundle is installed (installing it when all its
    parts have been shipped: a shipped folder's ``install.sh`` does that)."""
    site = Path(f"/tmp/site-{engine}")
    if (site / ".installed").exists():
        return str(site)
    for manifest in sorted((ROOT / ".offline").glob("*/MANIFEST")):
        if f"engine={engine}" in manifest.read_text().split():
            out = subprocess.run(["bash", str(manifest.parent / "install.sh")], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()
            if out and out[-1].startswith("export PYTHONPATH="):
                return out[-1].removeprefix("export PYTHONPATH=")
            raise SystemExit(f"the {engine} bundle is incomplete: {out[-1] if out else 'no output'}")
    raise SystemExit(f"the {engine} suites need its offline bundle (../shared/offline-gpu): none under .offline/")


def main(name: str, out_dir: str | None = None) -> int:
    suite = SUITES[name]
    install(suite.needs)
    paths = [str(SITE)] + [engine_site(e) for e in suite.needs if e in ENGINES]
    env = {"PYTHONPATH": os.pathsep.join(paths), "NCCL_NVLS_ENABLE": "0",
           "PATH": f"{SITE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    model = reassemble_model()
    if model:
        env["MEZO_MODEL"] = str(model)
        env["MEZO_ASSETS"] = str(assets(model))
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    record = run(name, Path(out_dir) if out_dir else None, env, command=f"python -m benchmarks gpu {name}")
    for step in record["steps"]:
        print(f"{step['name']:40} rc={step['rc']} {step['wall_s']} s")
    return 0 if record["all_ok"] else 1
