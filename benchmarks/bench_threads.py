"""Intra-op threads on a small, shared CPU (#26 item 5): a fixed forward workload
typical of a demo step (SmolLM2-135M's shape, random weights, the top ``--layers``
layers a trunk-cached step runs, ``--batch`` rows x ``--seq`` tokens, logits of the
last 2 positions) timed with 1 and 2 threads, with 0, 1 and 2 competing busy
processes (``python -c 'while True: pass'``), under OpenMP's default wait policy
and OMP_WAIT_POLICY=PASSIVE. Each measurement runs in a fresh process (libgomp reads
the policy when torch loads it). The child also hashes the logits of batches of
several sizes: do 1 and 2 threads give the same bits?

    python -m benchmarks.bench_threads [--layers 4] [--batch 16] [--seq 48] [--reps 7] [--rounds 2]
                                       [--out benchmarks/results/threads-cpu-DATE.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEED = 26


def child(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from benchmarks.common import SHAPES
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    shape = dict(SHAPES["smollm2-135m"], num_hidden_layers=args.layers)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **shape)).eval()
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(10, shape["vocab_size"], (args.batch, args.seq), generator=gen)
    times = []
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=2)  # warm-up
        for _ in range(args.reps):
            t = time.perf_counter()
            model(input_ids=ids, logits_to_keep=2)
            times.append(time.perf_counter() - t)
        hashes = {}
        for b in (1, 2, 3, 5, 8, 16):
            x = torch.randint(10, shape["vocab_size"], (b, 37), generator=gen)
            mask = torch.ones_like(x)
            mask[0, :5] = 0  # one left-padded row: the masked attention path too
            out = model(input_ids=x, attention_mask=mask, logits_to_keep=2).logits
            hashes[b] = hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({"times": times, "hashes": hashes, "omp": _omp_library()}))


def _omp_library():
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f
                       if "omp" in line.rsplit("/", 1)[-1] and "/" in line})


def measure(args, threads, load, policy):
    """Median seconds per forward in a fresh child, with ``load`` busy processes beside it."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        time.sleep(0.5)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        load_before = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_threads", "--child", "--threads", str(threads),
                              "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
                              "--reps", str(args.reps)], env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in busy:
            p.kill()
            p.wait()
    result.update(threads=threads, load=load, policy=policy or "default", loadavg_1min_before=load_before,
                  median_s=statistics.median(result["times"]))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="every condition this many times, interleaved")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    runs = []
    for r in range(args.rounds):
        for load in (0, 1, 2):
            for policy in (None, "PASSIVE"):
                for threads in (1, 2):
                    res = measure(args, threads, load, policy)
                    res["round"] = r
                    runs.append(res)
                    print(f"round {r} load {load} policy {res['policy']:8} threads {threads}: "
                          f"{res['median_s'] * 1000:8.1f} ms/forward (loadavg before {res['loadavg_1min_before']:.2f})",
                          flush=True)
    table = {}
    for res in runs:
        key = f"load{res['load']}-{res['policy']}-t{res['threads']}"
        table.setdefault(key, []).append(res["median_s"])
    summary = {k: {"median_ms": round(statistics.median(v) * 1000, 1), "each_round_ms": [round(x * 1000, 1) for x in v]}
               for k, v in table.items()}
    # one thread starts no OpenMP team: its wait policy cannot matter, so both count
    for load in (0, 1, 2):
        pooled = sorted(r["median_s"] for r in runs if r["load"] == load and r["threads"] == 1)
        summary[f"load{load}-t1-pooled"] = {"median_ms": round(statistics.median(pooled) * 1000, 1),
                                            "range_ms": [round(pooled[0] * 1000, 1), round(pooled[-1] * 1000, 1)]}
    # each round: 2 threads' time over 1 thread's (default policy) at the same load
    ratios = {}
    for res in runs:
        if res["threads"] == 2:
            one = next(r for r in runs if r["round"] == res["round"] and r["load"] == res["load"]
                       and r["threads"] == 1 and r["policy"] == "default")
            ratios.setdefault(f"load{res['load']}-{res['policy']}", []).append(round(res["median_s"] / one["median_s"], 2))
    summary["ratio_2_threads_to_1_each_round"] = ratios
    bitwise = {}
    for res in runs:
        bitwise.setdefault(f"{res['policy']}-t{res['threads']}", set()).add(json.dumps(res["hashes"], sort_keys=True))
    hashes_by_threads = {t: {json.dumps(r["hashes"], sort_keys=True) for r in runs if r["threads"] == t} for t in (1, 2)}
    one, two = (json.loads(next(iter(hashes_by_threads[t]))) for t in (1, 2))
    record = {
        "command": "python -m benchmarks.bench_threads " + " ".join(sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": __import__("torch").__version__, "openmp": runs[0]["omp"],
                    "note": "shared with other agents' jobs: loadavg_1min_before says how loaded it was"},
        "workload": {"shape": "smollm2-135m", "layers": args.layers, "batch": args.batch, "seq": args.seq,
                     "logits_to_keep": 2, "reps": args.reps, "rounds": args.rounds},
        "summary": summary,
        "numerics": {
            "same_bits_run_to_run": {k: len(v) == 1 for k, v in bitwise.items()},
            "batch_sizes_whose_logits_differ_1_vs_2_threads": [int(b) for b in one if one[b] != two[b]],
            "policy_changes_bits": any(len({json.dumps(r["hashes"], sort_keys=True) for r in runs
                                            if r["threads"] == t}) > 1 for t in (1, 2)),
        },
        "runs": runs,
    }
    print(json.dumps({"summary": summary, "numerics": record["numerics"]}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
