"""``pip install mezo-run`` is the product (#15 item 1): the wheel of this tree,
installed alone into a fresh venv, finds its hf backend, built-in plugins and
recipes and trains from an empty folder -- nothing of the checkout on the path.

The venv gets the dependencies (torch, transformers, peft ...) from the dev venv
through a .pth file naming a folder of links to them, every mezo distribution
left out, so the only mezo code and metadata it sees are the wheel's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tiny import write_run_config

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "mezo_core", "conf", "plugins", "backends")
JUNK = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
pytestmark = pytest.mark.slow


def run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEZO_ASSETS", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv): the wheel built from this tree, installed without deps."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"   # a copy: the in-tree build's build/ and egg-info stay out of the checkout
    src.mkdir()
    for part in SOURCES:
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, src / part, ignore=JUNK)
        else:
            shutil.copy2(ROOT / part, src / part)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    wheel, = (tmp / "dist").glob("mezo_run-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    deps = tmp / "deps"   # the dev venv's packages, mezo's own left out
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if not (name.startswith(("mezo", "__editable__", "_mezo")) or name.endswith(".pth")):
            (deps / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=tmp).strip())
    (venv_site / "dev_deps.pth").write_text(f"{deps}\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], cwd=tmp)
    return wheel, venv


def test_the_wheel_holds_the_backend_plugins_and_recipes(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for module in ("mezo_core/cli.py", "mezo_backend_hf/backend.py", "mezo_backend_hf/trunk.py",
                   "mezo_builtin/schedules.py", "mezo_builtin/eviction.py"):
        assert module in names
    recipes = sorted(p.name for p in (ROOT / "conf").glob("*.yaml"))
    assert recipes and all(f"mezo_core/recipes/{r}" in names for r in recipes)
    assert "[mezo]" in entry_points and "hf = mezo_backend_hf" in entry_points
    assert "builtin = mezo_builtin" in entry_points
    assert "Requires-Dist: peft" in metadata
    assert not any(n.startswith(("tests/", "benchmarks/", "conf/")) for n in names)


def test_installed_wheel_works_from_an_empty_folder(installed, tmp_path, tiny_llama):
    _, venv = installed
    cli = str(venv / "bin" / "mezo-run")
    work = tmp_path / "empty"
    work.mkdir()
    # the code and the metadata come from the venv, not from the checkout
    where = run([str(venv / "bin" / "python"), "-c",
                 "import mezo_core, mezo_builtin, mezo_backend_hf, importlib.metadata as m;"
                 "print(mezo_core.__file__, mezo_builtin.__file__, mezo_backend_hf.__file__);"
                 "print(sorted({e.dist.name for e in m.entry_points(group='mezo')}))"], cwd=work)
    files, dists = where.splitlines()
    assert all(f.startswith(str(venv)) for f in files.split()), files
    assert dists == "['mezo-run']"

    out = run([cli, "backends"], cwd=work)
    hf = next(line for line in out.splitlines() if line.startswith("hf "))
    assert "available" in hf and "unavailable" not in hf and "mezo-run" in hf
    assert "constant (mezo-run)" in out and "lru (mezo-run)" in out

    # no conf/ here: the packaged recipe, resolved (oracle: the checkout's YAML)
    recipe = yaml.safe_load((ROOT / "conf" / "sst2.yaml").read_text())
    shown = yaml.safe_load(run([cli, "config"], cwd=work))
    assert shown["mezo"]["steps"] == recipe["mezo"]["steps"]
    assert shown["task"]["template"] == recipe["task"]["template"]
    assert shown["model"]["path"].endswith(recipe["model"]["path"].split("}", 1)[1])

    assert "sst2" in run([cli, "init", "--list"], cwd=work).split()
    run([cli, "init"], cwd=work)
    assert (work / "sst2.yaml").read_text() == (ROOT / "conf" / "sst2.yaml").read_text()

    cfg = write_run_config(tmp_path, tiny_llama)
    run([cli, "train", "-c", str(cfg), "mezo.steps=2", "out_dir=run"], cwd=work)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["step"] == 2
    adapter = json.loads((work / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llama)
