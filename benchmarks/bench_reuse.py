"""Exact reuse in the hf backend, each mechanism on/off, measured side by side.

    python -m benchmarks.bench_reuse                       # CPU, tiny Llama shape
    python -m benchmarks.bench_reuse --device cuda --shape llama-1.1b --batch 16 --seq 256

Rows are timed round-robin (one step of each row per round) so that machine
noise hits every row alike; the table reports medians and the speed-up over the
plain step. A second table shows cache hit rate and token reuse against eps:
exact reuse does not depend on eps.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_hf import workload
from benchmarks.common import SHAPES, build_random_model, environment, synchronize, write_result
from mezo_core.config import load_config
from mezo_core.mezo import mezo_step

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
}
CUDA_ONLY = {"trunk cache + CUDA graphs", "trunk cache + CUDA graphs + model-dtype LoRA"}


def make_backend(model_dir, shape, layers, opts, device, dtype, r=16):
    from mezo_backend_hf.backend import HFBackend
    n = SHAPES[shape]["num_hidden_layers"]
    overrides = [f"model.path={model_dir}", f"model.device={device}", f"model.dtype={dtype}",
                 f"lora.r={r}", f"lora.alpha={2 * r}"]
    if layers == "top":
        overrides.append(f"lora.layers=[{','.join(str(i) for i in range(n - n // 4, n))}]")
    overrides += [f"hf.{k}={v}" for k, v in opts.items()]
    return HFBackend(load_config(None, overrides))


def working_memory(fn, device):
    """Peak device memory a call needs above what was allocated before it (GiB)."""
    if not torch.device(device).type == "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def timed_step(backend, data, step, device, eps=1e-3):
    synchronize(device)
    start = time.perf_counter()
    mezo_step(backend, data, [step], eps, 1e-6)
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", default=None)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--prefix", type=int, default=0, help="leading tokens shared by every row")
    p.add_argument("--eps-steps", type=int, default=5, help="steps per eps value in the hit-rate table")
    p.add_argument("--rows", nargs="*", help="only these rows (plain top quarter is always run)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    data = workload(args.batch, args.seq, SHAPES[args.shape]["vocab_size"])
    if args.prefix:
        head = data[0].prompt_ids[:args.prefix]
        data = [type(e)(head + e.prompt_ids[args.prefix:], e.target_ids) for e in data]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(args.shape, Path(tmp) / args.shape,
                                       dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        chosen = {name: row for name, row in ROWS.items()
                  if (args.rows is None or name in args.rows or name == "plain (LoRA top quarter)")
                  and (args.device.startswith("cuda") or name not in CUDA_ONLY)}
        backends = {name: make_backend(model_dir, args.shape, layers, opts, args.device, dtype)
                    for name, (layers, opts) in chosen.items()}
        times = {name: [] for name in chosen}
        for name, b in backends.items():  # warm-up: fills the trunk caches
            timed_step(b, data, 0, args.device)
        for rnd in range(args.rounds):
            for name, b in backends.items():
                times[name].append(timed_step(b, data, rnd + 1, args.device))
        base = statistics.median(times["plain (LoRA top quarter)"])
        ref = backends["plain (LoRA top quarter)"]
        forward_mem = working_memory(lambda: ref.losses(data), args.device)
        rows = []
        for name, b in backends.items():
            med = statistics.median(times[name])
            step_mem = working_memory(lambda: mezo_step(b, data, [999], 1e-3, 1e-6), args.device)
            stats = b.get_stats()
            rows.append({"row": name, "step_ms": 1e3 * med, "speedup_vs_plain_top_quarter": base / med,
                         "tokens_per_second": 2 * args.batch * args.seq / med,
                         "hit_rate": stats.get("hit_rate"), "token_reuse": stats.get("token_reuse"),
                         "layers_skipped": stats.get("layers_skipped", 0), "cache_bytes": stats.get("bytes", 0),
                         "step_working_memory_gib": step_mem,
                         "step_memory_over_one_forward": step_mem / forward_mem if forward_mem else None})
        for b in backends.values():
            b.close()
        eps_rows = []
        for eps in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
            b = make_backend(model_dir, args.shape, "top", {"trunk_cache": True}, args.device, dtype)
            for step in range(args.eps_steps):
                mezo_step(b, data, [step], eps, 1e-6)
            s = b.get_stats()
            eps_rows.append({"eps": eps, "hit_rate": s["hit_rate"], "token_reuse": s["token_reuse"],
                             "lookups": s["lookups"], "hits": s["hits"]})
            b.close()
    print(f"\n{'row':32} {'step ms':>9} {'speed-up':>9} {'hit rate':>9} {'reuse':>7}")
    for r in rows:
        print(f"{r['row']:32} {r['step_ms']:9.1f} {r['speedup_vs_plain_top_quarter']:9.2f} "
              f"{(r['hit_rate'] or 0):9.3f} {(r['token_reuse'] or 0):7.3f}")
    print(f"\n{'eps':>8} {'hit rate':>9} {'token reuse':>12}  ({args.eps_steps} steps, cache cold at start)")
    for r in eps_rows:
        print(f"{r['eps']:8.0e} {r['hit_rate']:9.3f} {r['token_reuse']:12.3f}")
    write_result({"benchmark": "hf exact reuse, mechanisms on/off", **environment(args.device),
                  "shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": dtype,
                  "rounds": args.rounds, "one_forward_working_memory_gib": forward_mem, "rows": rows, "hit_rate_vs_eps": eps_rows,
                  "raw_step_seconds": times}, args.out)


if __name__ == "__main__":
    main()
