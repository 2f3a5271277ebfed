"""Exact reuse in the hf backend, each mechanism on/off, measured side by side.

    python -m benchmarks.bench_reuse                       # CPU, tiny Llama shape
    python -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256

Steps are taken as the trainer takes them (fused schedule, a pool of batches in
turn) and timed round-robin (one step of each row per round) so that machine
noise hits every row alike; the table reports medians and the speed-up over the
plain step. A second table shows cache hit rate and token reuse against eps:
exact reuse does not depend on eps. ``--memory`` (CUDA) adds peak memory of a
warm step against one plain forward, each row measured in a fresh process.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import SHAPES, Stepper, build_random_model, environment, make_batches, timed, write_result
from mezo_core.config import load_config
from mezo_core.stats import stats_of

ROWS = {  # name: (lora layers, hf options)
    "plain (LoRA all layers)": ("all", {"trunk_cache": False}),
    "plain (LoRA top quarter)": ("top", {"trunk_cache": False}),
    "trunk cache": ("top", {"trunk_cache": True}),
    "one +/- batch": ("top", {"trunk_cache": False, "pm_batch": True}),
    "trunk cache + one +/- batch": ("top", {"trunk_cache": True, "pm_batch": True}),
    "shared prefixes within a pass": ("top", {"trunk_cache": False, "prefix_sharing": True}),
    "trunk cache + shared prefixes": ("top", {"trunk_cache": True, "prefix_sharing": True}),
    "trunk cache + CUDA graphs": ("top", {"trunk_cache": True, "cuda_graphs": True}),
    "trunk cache + model-dtype LoRA": ("top", {"trunk_cache": True, "lora_dtype": "model"}),
    "trunk cache + CUDA graphs + model-dtype LoRA": ("top", {"trunk_cache": True, "cuda_graphs": True,
                                                              "lora_dtype": "model"}),
    "trunk cache + compile": ("top", {"trunk_cache": True, "compile": True}),
    "trunk cache + trimmed last layer": ("top", {"trunk_cache": True, "trim_last_layer": True}),
    "trunk cache + compile + trimmed last layer": ("top", {"trunk_cache": True, "compile": True,
                                                           "trim_last_layer": True}),
    "trunk cache + compile + model-dtype LoRA + trimmed last layer": ("top", {"trunk_cache": True, "compile": True,
                                                                              "lora_dtype": "model",
                                                                              "trim_last_layer": True}),
    "trunk cache + every GPU option": ("top", {"trunk_cache": True, "compile": True, "cuda_graphs": True,
                                               "lora_dtype": "model", "trim_last_layer": True}),
    "trunk cache + compile + CUDA graphs + model-dtype LoRA": ("top", {"trunk_cache": True, "compile": True,
                                                                       "cuda_graphs": True, "lora_dtype": "model"}),
}
CUDA_ONLY = {name for name, (_, opts) in ROWS.items() if opts.get("cuda_graphs")}


def make_backend(model_dir, shape, layers, opts, device, dtype, r=16):
    """An hf backend for a row: the trimmed last layer only where the row names it."""
    from mezo_backend_hf.backend import HFBackend
    opts = {"trim_last_layer": False, **opts}
    n = SHAPES[shape]["num_hidden_layers"]
    overrides = [f"model.path={model_dir}", f"model.device={device}", f"model.dtype={dtype}",
                 f"lora.r={r}", f"lora.alpha={2 * r}"]
    if layers == "top":
        overrides.append(f"lora.layers=[{','.join(str(i) for i in range(n - n // 4, n))}]")
    overrides += [f"hf.{k}={v}" for k, v in opts.items()]
    return HFBackend(load_config(None, overrides))


def peak_bytes(fn) -> int:
    """Peak allocated device memory while ``fn`` runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def memory_of_row(model_dir, args, name):
    """In a fresh process: peak device memory of a warm step of ``name`` (after
    the trunk cache was filled and any CUDA graph captured), with the graphs'
    private pool counted whole, and of one plain forward over the same batch."""
    layers, opts = ROWS[name]
    batches = pool(args)
    backend = make_backend(model_dir, args.shape, layers, opts, args.device, args.dtype)
    weights = torch.cuda.memory_allocated()
    stepper = Stepper(backend, batches)
    for _ in range(2 * len(batches)):
        stepper()
    peak = peak_bytes(lambda: [stepper() for _ in batches])
    pools, by_stream = [], {}  # graph pool segments; allocated bytes of the others per stream
    for seg in torch.cuda.memory_snapshot():
        if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            pools.append(seg)
        else:
            by_stream[str(seg["stream"])] = by_stream.get(str(seg["stream"]), 0) + seg["allocated_size"] / 2**30
    pool_idle = sum(seg["total_size"] - seg["allocated_size"] for seg in pools)  # replays use these blocks
    return {"weights_gib": weights / 2**30, "step_peak_gib": (peak + pool_idle) / 2**30,
            "graph_pool_gib": sum(seg["total_size"] for seg in pools) / 2**30,
            "allocated_gib_by_stream": by_stream,
            "graphs": getattr(getattr(backend, "graphs", None), "captures", 0),
            "cache_gib": stats_of(backend).get("bytes", 0) / 2**30}


def one_forward_memory(model_dir, args):
    """Peak memory of one plain forward (LoRA on the top quarter, no cache) over a batch."""
    backend = make_backend(model_dir, args.shape, "top", {"trunk_cache": False}, args.device, args.dtype)
    batch = pool(args)[0]
    backend.losses(batch)
    weights = torch.cuda.memory_allocated()
    peak = peak_bytes(lambda: backend.losses(batch))
    return {"weights_gib": weights / 2**30, "peak_gib": peak / 2**30}


def memory_table(model_dir, args, names):
    """Each row in its own process, so that no row's allocations, graphs or
    allocator cache leak into another's figure."""
    import json
    import subprocess
    import sys
    common = ["--device", args.device, "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
              "--dtype", args.dtype, "--pool", str(args.pool), "--model-dir", str(model_dir)]
    def run(what):
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_reuse", *common, "--memory-of", what],
                              capture_output=True, text=True)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1:]}  # the timings above are kept
        return json.loads(done.stdout.strip().splitlines()[-1])
    forward = run("one forward")
    if "error" in forward:
        return forward, []
    rows = []
    for name in names:
        m = run(name)
        if "error" in m:
            rows.append({"row": name, **m})
            continue
        total_ratio = (m["step_peak_gib"] - m["cache_gib"]) / forward["peak_gib"]
        working = (m["step_peak_gib"] - m["weights_gib"] - m["cache_gib"]) / (forward["peak_gib"] - forward["weights_gib"])
        rows.append({"row": name, **m, "step_over_one_forward_plus_cache": total_ratio,
                     "working_memory_over_one_forward": working})
    return forward, rows


def pool(args):
    """``args.pool`` batches of ``args.batch`` rows, every row starting with the same ``args.prefix`` tokens."""
    return make_batches(args.batch, args.seq, SHAPES[args.shape]["vocab_size"], args.prefix / args.seq, args.pool)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--pool", type=int, default=4, help="batches taken in turn (all cached after the warm-up)")
    p.add_argument("--prefix", type=int, default=0, help="leading tokens shared by every row")
    p.add_argument("--eps-steps", type=int, default=5, help="steps per eps value in the hit-rate table")
    p.add_argument("--rows", nargs="*", help="only these rows (plain top quarter is always run)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, each row in a fresh process (CUDA)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)   # internal: one row of the memory table
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.memory_of:
        import json
        fn = one_forward_memory if args.memory_of == "one forward" else memory_of_row
        extra = () if args.memory_of == "one forward" else (args.memory_of,)
        print(json.dumps(fn(args.model_dir, args, *extra)))
        return
    batches = pool(args)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(args.shape, Path(tmp) / args.shape,
                                       dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
        chosen = {name: row for name, row in ROWS.items()
                  if (args.rows is None or name in args.rows or name == "plain (LoRA top quarter)")
                  and (args.device.startswith("cuda") or name not in CUDA_ONLY)}
        steppers, failed = {}, []
        for name, (layers, opts) in chosen.items():  # warm-up: fills the trunk caches, captures the graphs
            try:
                stepper = Stepper(make_backend(model_dir, args.shape, layers, opts, args.device, args.dtype), batches)
                for _ in range(2 * len(batches)):
                    stepper()
                steppers[name] = stepper
            except Exception as exc:  # one broken option must not lose the other rows
                failed.append({"row": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
        times = {name: [] for name in steppers}
        for _ in range(args.rounds):
            for name, stepper in steppers.items():
                times[name].append(timed(stepper, args.device))
        base = statistics.median(times["plain (LoRA top quarter)"])
        rows = list(failed)
        for name, stepper in steppers.items():
            med = statistics.median(times[name])
            stats = stats_of(stepper.backend)
            rows.append({"row": name, "step_ms": 1e3 * med, "speedup_vs_plain_top_quarter": base / med,
                         "tokens_per_second": 2 * args.batch * args.seq / med,
                         "hit_rate": stats.get("hit_rate"), "token_reuse": stats.get("token_reuse"),
                         "layers_skipped": stats.get("layers_skipped", 0), "cache_bytes": stats.get("bytes", 0)})
            stepper.backend.close()
        measured = [name for name in steppers if ROWS[name][0] == "top"]
        del steppers
        eps_rows = []
        for eps in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
            b = make_backend(model_dir, args.shape, "top", {"trunk_cache": True}, args.device, args.dtype)
            stepper = Stepper(b, batches, eps)
            for _ in range(args.eps_steps):
                stepper()
            s = stats_of(b)
            eps_rows.append({"eps": eps, "hit_rate": s["hit_rate"], "token_reuse": s["token_reuse"],
                             "lookups": s["lookups"], "hits": s["hits"]})
            b.close()
        memory = None
        if args.memory and args.device.startswith("cuda"):
            forward, memory_rows = memory_table(model_dir, args, measured)
            memory = {"one_forward": forward, "rows": memory_rows}
    print(f"\n{'row':44} {'step ms':>9} {'speed-up':>9} {'hit rate':>9} {'reuse':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:44} failed: {r['error']}")
            continue
        print(f"{r['row']:44} {r['step_ms']:9.1f} {r['speedup_vs_plain_top_quarter']:9.2f} "
              f"{(r['hit_rate'] or 0):9.3f} {(r['token_reuse'] or 0):7.3f}")
    print(f"\n{'eps':>8} {'hit rate':>9} {'token reuse':>12}  ({args.eps_steps} steps, cache cold at start)")
    for r in eps_rows:
        print(f"{r['eps']:8.0e} {r['hit_rate']:9.3f} {r['token_reuse']:12.3f}")
    if memory and "error" in memory["one_forward"]:
        print(f"\nmemory: one forward failed: {memory['one_forward']['error']}")
    elif memory:
        print(f"\none forward: peak {memory['one_forward']['peak_gib']:.3f} GiB "
              f"(weights {memory['one_forward']['weights_gib']:.3f})")
        print(f"{'row':44} {'peak GiB':>9} {'cache':>7} {'(peak-cache)/fwd':>17} {'working/fwd':>12}")
        for r in memory["rows"]:
            if "error" in r:
                print(f"{r['row']:44} failed: {r['error']}")
                continue
            print(f"{r['row']:44} {r['step_peak_gib']:9.3f} {r['cache_gib']:7.3f} "
                  f"{r['step_over_one_forward_plus_cache']:17.3f} {r['working_memory_over_one_forward']:12.3f}")
    write_result({"benchmark": "hf exact reuse, mechanisms on/off", **environment(args.device),
                  "shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                  "rounds": args.rounds, "pool_batches": args.pool,
                  "schedule": "fused (the trainer's default), batches taken in turn from the pool",
                  "rows": rows, "hit_rate_vs_eps": eps_rows, "memory": memory,
                  "raw_step_seconds": times}, args.out)


if __name__ == "__main__":
    main()
