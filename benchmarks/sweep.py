"""Run several ``mezo-run train`` recipes side by side and collect their curves.

Each run is a separate ``mezo-run train`` process (the product's own CLI, so a
recipe measured here is a recipe a user can run); ``--parallel`` of them share
the machine at once -- on one GPU a 135M model leaves most of the device idle,
so a handful of runs in parallel cost little more than one.

    python -m benchmarks.sweep runs.json --out results.json --parallel 8 -- model.device=cuda

``runs.json`` is a list of {"name": ..., "overrides": ["key=value", ...]}; the
overrides after ``--`` apply to every run. The result holds, per run, the
summary and the evaluation rows of its ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EVAL_KEYS = ("step", "dev_accuracy", "dev_loss", "val_accuracy", "val_loss", "loss", "lr", "eps")


def run_all(runs, common, root: Path, parallel: int, timeout: float, env=None,
            deadline: float | None = None) -> list[dict]:
    """Start the runs ``parallel`` at a time; a run is stopped after ``timeout``
    seconds, every run at the ``deadline`` (a time.time() value). Returns one record
    per run; a stopped run keeps the curve it had written."""
    deadline = deadline or float("inf")
    pending, active, done = list(runs), [], []
    root.mkdir(parents=True, exist_ok=True)
    while (pending and time.time() < deadline) or active:
        while pending and len(active) < parallel and time.time() < deadline:
            run = pending.pop(0)
            out = root / run["name"]
            shutil.rmtree(out, ignore_errors=True)  # the sweep owns its root: a run starts fresh
            log = (root / f"{run['name']}.log").open("w")
            cmd = [sys.executable, "-m", "mezo_core.cli", "train", f"out_dir={out}", "progress=false",
                   "plot=false", *common, *run["overrides"]]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            active.append((run, proc, time.time(), out, cmd))
        time.sleep(1.0)
        for item in list(active):
            run, proc, start, out, cmd = item
            if proc.poll() is None and time.time() - start < timeout and time.time() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            active.remove(item)
            done.append(collect(run, proc.returncode, time.time() - start, out, cmd))
            print(f"{run['name']}: exit {proc.returncode} in {time.time() - start:.0f} s "
                  f"{json.dumps(done[-1].get('summary'))}", flush=True)
    order = {r["name"]: i for i, r in enumerate(runs)}
    return sorted(done, key=lambda r: order[r["name"]])


def collect(run, code, seconds, out: Path, cmd) -> dict:
    rows = []
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if any(k in row for k in ("dev_accuracy", "val_accuracy", "event")) or row["step"] % 50 == 0:
                rows.append({k: row[k] for k in (*EVAL_KEYS, "event") if k in row})
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    zero_shot = {}  # from evals.jsonl, so that a run killed before its summary still has it
    evals = out / "evals.jsonl"
    for line in evals.read_text().splitlines() if evals.exists() else []:
        row = json.loads(line)
        if row.get("label") == "zero-shot":
            zero_shot[f"{row['split']}_accuracy"] = row["accuracy"]
    log = (out.parent / f"{run['name']}.log")
    tail = log.read_text()[-1500:] if log.exists() else ""
    return {"name": run["name"], "overrides": run["overrides"], "exit_code": code, "seconds": seconds,
            "summary": summary, "zero_shot": zero_shot or None, "curve": rows, "command": " ".join(cmd),
            "log_tail": tail if code else ""}


def split_overrides(argv=None) -> tuple[list[str], list[str]]:
    """(the script's own arguments, the key=value overrides after ``--``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def main(argv=None):
    argv, common = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="JSON file: a list of {name, overrides}")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--root", default=None, help="folder for the run folders (default: next to --out)")
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    args = p.parse_args(argv)
    runs = json.loads(Path(args.runs).read_text())
    root = Path(args.root or Path(args.out).with_suffix(""))
    start = time.time()
    records = run_all(runs, common, root, args.parallel, args.timeout)
    from .common import environment
    device = "cuda" if any(c.startswith("model.device=cuda") for c in common) else "cpu"
    result = {**environment(device), "common": common, "parallel": args.parallel,
              "seconds": time.time() - start, "runs": records}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
