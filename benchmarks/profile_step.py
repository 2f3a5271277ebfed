"""Where a MeZO step's time goes (torch.profiler), for the hf backend.

    python -m benchmarks.profile_step --device cuda --shape llama-1.1b --lora-layers top-quarter
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_hf import workload
from benchmarks.bench_reuse import make_backend
from benchmarks.common import SHAPES, build_random_model, synchronize
from mezo_core.mezo import mezo_step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lora-layers", default="top", choices=["all", "top"])
    p.add_argument("--trunk", default="true")
    args = p.parse_args(argv)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    data = workload(args.batch, args.seq, SHAPES[args.shape]["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(args.shape, Path(tmp) / args.shape,
                                       dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        b = make_backend(model_dir, args.shape, args.lora_layers, {"trunk_cache": args.trunk}, args.device, dtype)
        for i in range(3):
            mezo_step(b, data, [i], 1e-3, 1e-6)
        parts = {"perturb": lambda: b.perturb([(7, 1e-3)]), "losses": lambda: b.losses(data),
                 "step": lambda: mezo_step(b, data, [8], 1e-3, 1e-6)}
        for name, fn in parts.items():
            synchronize(args.device)
            t = time.perf_counter()
            for _ in range(10):
                fn()
            synchronize(args.device)
            print(f"{name:8} {(time.perf_counter() - t) * 100:.2f} ms")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(5):
                mezo_step(b, data, [10 + i], 1e-3, 1e-6)
            synchronize(args.device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
        if args.device.startswith("cuda"):
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
