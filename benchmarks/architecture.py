"""The architecture's measurable goals, read from the source (nothing is trained).

    python -m benchmarks.architecture            # JSON on stdout
    python -m benchmarks.architecture --check    # exit 1 naming every goal missed

- sizes: no file of the installed packages (mezo_core, backends, plugins) over
  400 lines, no class of mezo_core over 250, ``Trainer.train`` at most 50;
- the Backend contract: at most 10 methods defined on ``Backend`` itself (optional
  capabilities are protocols of their own);
- imports: no circle among mezo_core's modules, and no core module importing a
  backend or plugin package (data flows config -> registry -> backend -> trainer);
- the hf backend's batch path: the modules one training batch runs through
  (``losses`` of a batch with the trunk cache and prefix sharing on), and how often
  it calls back into a module still on the stack below (goal: at most 2).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mezo_core", "backends", "plugins")
LIMITS = {"file_lines": 400, "core_class_lines": 250, "train_lines": 50, "backend_methods": 10,
          "hf_batch_returns": 2}


def package_files():
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "egg-info" not in str(path) and "/build/" not in str(path):
                yield path


def sizes() -> dict:
    files = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in package_files()}
    classes, train = {}, None
    for path in sorted((ROOT / "mezo_core").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
                for item in node.body:
                    if path.name == "trainer.py" and node.name == "Trainer" and getattr(item, "name", "") == "train":
                        train = item.end_lineno - item.lineno + 1
    return {"largest_files": dict(sorted(files.items(), key=lambda kv: -kv[1])[:8]),
            "files_over_limit": {k: v for k, v in files.items() if v > LIMITS["file_lines"]},
            "largest_core_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])[:5]),
            "core_classes_over_limit": {k: v for k, v in classes.items() if v > LIMITS["core_class_lines"]},
            "trainer_train_lines": train}


def backend_methods() -> list[str]:
    tree = ast.parse((ROOT / "mezo_core" / "interfaces.py").read_text())
    backend = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend")
    return [n.name for n in backend.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def core_imports() -> dict[str, set[str]]:
    """Module -> the mezo_core modules (and outside packages of this repo) it imports."""
    graph = {}
    ours = {"mezo_backend_hf", "mezo_backend_vllm", "mezo_backend_sglang", "mezo_builtin"}
    for path in sorted((ROOT / "mezo_core").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps.update([node.module] if node.module else [a.name for a in node.names])
                elif node.module and node.module.split(".")[0] in ours | {"mezo_core"}:
                    deps.add(node.module.removeprefix("mezo_core."))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] in ours)
        graph[path.stem] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def hf_batch_route() -> tuple[list[str], list[str]]:
    """The hf backend's modules in the order one training batch's ``losses`` call first
    enters them, and its returns: the calls into a module that is still on the call
    stack below another one (a callback: the data flowing back up). A run of the tiny
    random model; a loop over rows counts once."""
    import random
    import tempfile

    from mezo_core import Example
    from mezo_core.config import load_config
    from mezo_core.registry import get_registry
    from mezo_core.testing import build_model
    package = str(ROOT / "backends" / "hf" / "mezo_backend_hf")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        cfg = load_config(None, [f"model.path={model}", "model.device=cpu", "hf.trunk_cache=true",
                                 "hf.prefix_sharing=true", "hf.prefix_min_tokens=4", "lora.layers=[2,3]"])
        backend = get_registry().get("backends", "hf")(cfg, get_registry())
        rng = random.Random(0)
        shared = tuple(rng.randrange(4, 300) for _ in range(8))   # a template all rows share
        batch = [Example(shared + tuple(rng.randrange(4, 300) for _ in range(rng.randint(2, 9))),
                         (rng.randrange(4, 300),)) for _ in range(8)]
        backend.losses(batch)   # warm: the cache is filled, the second call is the steady state
        route, stack, back = [], [], set()

        def profile(frame, event, arg):
            name = Path(frame.f_code.co_filename).name if frame.f_code.co_filename.startswith(package) else None
            if event == "call":
                if name and name in stack and stack[-1] != name:   # called back into a module it had left
                    back.add(f"{stack[-1]} -> {name}:{frame.f_code.co_name}")
                if name and name not in route:
                    route.append(name)
                stack.append(name if name else (stack[-1] if stack else None))
            elif event == "return" and stack:
                stack.pop()
        sys.setprofile(profile)
        try:
            backend.losses(batch)
        finally:
            sys.setprofile(None)
        return route, sorted(back)


def measure(with_hf: bool = True) -> dict:
    graph = core_imports()
    out = {"limits": LIMITS, **sizes(), "backend_methods": backend_methods(),
           "core_import_circles": circles(graph),
           "core_imports_of_plugins": sorted(f"{m} -> {d}" for m, ds in graph.items() for d in ds
                                             if d.startswith(("mezo_backend", "mezo_builtin")))}
    if with_hf:
        route, back = hf_batch_route()
        out.update(hf_batch_route=route, hf_batch_callbacks=back, hf_batch_returns=len(back))
    return out


def missed(m: dict) -> list[str]:
    bad = [f"{f}: {n} lines > {LIMITS['file_lines']}" for f, n in m["files_over_limit"].items()]
    bad += [f"{c}: {n} lines > {LIMITS['core_class_lines']}" for c, n in m["core_classes_over_limit"].items()]
    if (m["trainer_train_lines"] or 0) > LIMITS["train_lines"]:
        bad.append(f"Trainer.train: {m['trainer_train_lines']} lines > {LIMITS['train_lines']}")
    if len(m["backend_methods"]) > LIMITS["backend_methods"]:
        bad.append(f"Backend defines {len(m['backend_methods'])} methods > {LIMITS['backend_methods']}")
    bad += [f"import circle: {' <-> '.join(c)}" for c in m["core_import_circles"]]
    bad += [f"core imports a plugin: {e}" for e in m["core_imports_of_plugins"]]
    if m.get("hf_batch_returns", 0) > LIMITS["hf_batch_returns"]:
        bad.append(f"hf batch path calls back {m['hf_batch_returns']} times: {'; '.join(m['hf_batch_callbacks'])}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 naming every goal missed")
    p.add_argument("--no-hf", action="store_true", help="skip the run of the hf batch route")
    args = p.parse_args(argv)
    m = measure(with_hf=not args.no_hf)
    print(json.dumps(m, indent=1))
    bad = missed(m)
    for line in bad:
        print("missed:", line, file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
