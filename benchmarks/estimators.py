"""Estimators side by side on SST-2 (``mezo.estimator``): forward passes and wall
time to reach a dev accuracy, and the final and best dev accuracy.

Every run is a ``mezo-run train`` process on conf/sst2-gpu.yaml (``benchmarks.sweep``,
all at once on one GPU), differing only in the estimator and its step settings.
A forward pass is one batch of ``mezo.batch_size`` rows under one perturbed state:
MeZO's two-sided step takes 2q of them, FZOO's one-sided step q + 1. Selection
(best/) uses the validation split drawn from the train file; SST-2 dev (872) is
only reported, and the threshold is read on it as the issue states it.

    python -m benchmarks.estimators --suite gpu --out benchmarks/results/estimators-DATE-h100.json -- \\
        model.path=... task.train=... task.val=... task.n_val=1000 task.dev=...
    python -m benchmarks.estimators --summarize RESULT.json      # JSON fields and PNG again

Backprop + Adam on the same LoRA and examples reached 87.5 % (accuracy-gpu-recipe-
2026-12-03-h200.json): the reference line of the plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .sweep import run_all, split_overrides

GPU = ["-c", "conf/sst2-gpu.yaml", "checkpoint_every=0"]
CPU = ["-c", "conf/sst2.yaml", "checkpoint_every=0"]
BACKPROP = {"dev_accuracy": 0.875, "source": "benchmarks/results/accuracy-gpu-recipe-2026-12-03-h200.json"}
THRESHOLD = 0.84


def mezo(seed: int, steps: int, every: int, recipe=GPU) -> dict:
    return {"name": f"mezo-seed{seed}", "estimator": "mezo", "seed": seed, "forwards_per_step": 2,
            "overrides": [*recipe, f"seed={seed}", f"mezo.steps={steps}", f"eval_every={every}"]}


def fzoo(seed: int, lr: float, n: int, steps: int, every: int, recipe=GPU) -> dict:
    return {"name": f"fzoo-n{n}-lr{lr:g}-seed{seed}", "estimator": "fzoo", "seed": seed, "forwards_per_step": n + 1,
            "overrides": [*recipe, f"seed={seed}", "mezo.estimator=fzoo", f"mezo.q={n}", "mezo.z=rademacher",
                          f"mezo.lr={lr}", f"mezo.steps={steps}", f"eval_every={every}"]}


SUITES = {
    # one device call: MeZO's recipe (its first 1000 steps, evaluated every 100) beside
    # FZOO with N = 8 at three learning rates, 300 steps each (2700 forwards)
    "gpu": lambda: [mezo(0, 1000, 100)] + [fzoo(0, lr, 8, 300, 25) for lr in (2e-4, 5e-4, 1e-3)],
    # what a short device call affords (about 5 minutes)
    "gpu-short": lambda: [mezo(0, 600, 100)] + [fzoo(0, lr, 8, 200, 25) for lr in (5e-4, 1e-3)],
    # the seeds of the chosen setting
    "gpu-seeds": lambda: [mezo(s, 1000, 100) for s in (1, 2)] + [fzoo(s, 5e-4, 8, 300, 25) for s in (1, 2)],
    # the CPU demo's recipe (top 4 layers, k = 16) at an equal budget of 600 forward passes:
    # MeZO's 300 steps beside FZOO with N = 4 for 120 steps, one learning rate, not tuned
    "cpu": lambda: [mezo(0, 300, 150, CPU), fzoo(0, 1e-3, 4, 120, 60, CPU)],
}


def curve(folder: Path, per_step: int) -> list[dict]:
    """Dev and val accuracy after each evaluation, with the forwards and the training
    seconds spent to get there (the evaluations' own time left out)."""
    seconds, spent, out = {}, 0.0, []
    metrics = folder / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        if "step_seconds" in row:
            spent += row["step_seconds"]
            seconds[row["step"]] = spent
    evals = folder / "evals.jsonl"
    for line in evals.read_text().splitlines() if evals.exists() else []:
        row = json.loads(line)
        if row.get("split") == "dev" and row.get("label") != "best":
            step = row.get("step", 0)
            out.append({"step": step, "forward_passes": step * per_step, "seconds": seconds.get(step, 0.0),
                        "dev_accuracy": row["accuracy"], "dev_loss": row.get("loss")})
    return out


def summarize(runs: list[dict]) -> dict:
    rows = []
    for run in runs:
        points = run.get("curve_by_forwards") or []
        reached = next((p for p in points if p["dev_accuracy"] >= THRESHOLD), None)
        summary = run.get("summary") or {}
        rows.append({"name": run["name"], "estimator": run["estimator"], "seed": run["seed"],
                     "forwards_per_step": run["forwards_per_step"],
                     "forward_passes_to_84": reached["forward_passes"] if reached else None,
                     "seconds_to_84": round(reached["seconds"], 1) if reached else None,
                     "final_dev_accuracy": (summary.get("final") or {}).get("dev_accuracy"),
                     "final_dev_loss": (summary.get("final") or {}).get("dev_loss"),
                     "best_dev_accuracy": max((p["dev_accuracy"] for p in points), default=None),
                     "kept_dev_accuracy": (summary.get("result") or {}).get("dev_accuracy"),
                     "exit_code": run.get("exit_code")})
    return {"rows": rows, "backprop_dev_accuracy": BACKPROP["dev_accuracy"], "backprop_source": BACKPROP["source"],
            "threshold": THRESHOLD}


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:   # the GPU host may lack it: --summarize draws it here
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        pts = run.get("curve_by_forwards") or []
        ax.plot([p["forward_passes"] for p in pts], [100 * p["dev_accuracy"] for p in pts], marker=".",
                label=run["name"])
    ax.axhline(100 * BACKPROP["dev_accuracy"], color="k", ls="--", lw=1, label="backprop + Adam")
    ax.axhline(100 * THRESHOLD, color="grey", ls=":", lw=1)
    ax.set_xlabel("forward passes (batches of mezo.batch_size rows)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv, common = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.estimators", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="gpu")
    p.add_argument("--out", help="result JSON (a PNG beside it)")
    p.add_argument("--root", default="/tmp/estimators", help="folder for the run folders")
    p.add_argument("--deadline-s", type=float, default=480.0, help="every run is stopped after this long")
    p.add_argument("--summarize", help="rebuild the fields and the PNG of an earlier result")
    args = p.parse_args(argv)
    if args.summarize:
        result = json.loads(Path(args.summarize).read_text())
        result.update(summarize(result["runs"]))
        Path(args.summarize).write_text(json.dumps(result, indent=1) + "\n")
        plot(result["runs"], Path(args.summarize).with_suffix(".png"))
        return 0
    runs = SUITES[args.suite]()
    device = "cuda" if any(c == "model.device=cuda" for c in common) or args.suite.startswith("gpu") else "cpu"
    start = time.time()
    records = run_all([{"name": r["name"], "overrides": r["overrides"]} for r in runs], common, Path(args.root),
                      parallel=len(runs), timeout=args.deadline_s, deadline=start + args.deadline_s)
    for run, record in zip(runs, records):
        run.update(record, curve_by_forwards=curve(Path(args.root) / run["name"], run["forwards_per_step"]))
    from .common import environment
    result = {**environment(device), "suite": args.suite, "common": common, "seconds": time.time() - start,
              "runs": runs, **summarize(runs)}
    out = Path(args.out or f"estimators-{args.suite}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, out.with_suffix(".png"))
    for row in result["rows"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
