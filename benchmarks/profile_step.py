"""Where a MeZO step's time goes (torch.profiler), for the hf backend.

    python -m benchmarks.profile_step --device cuda --shape llama-1.1b --lora-layers top \\
        --hf cuda_graphs=true --hf lora_dtype=model

Steps are taken as the trainer takes them (``common.Stepper``). Prints the
host time of the backend's parts (labelled regions), the profiler's tables,
and on CUDA the device's busy time per step against the step's wall time: the
difference is time the GPU waited for the host.
"""
import argparse
import functools
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_reuse import make_backend, pool
from benchmarks.common import Stepper, build_random_model, synchronize, timed

#: (attribute path from the backend to the part, or "" for the backend itself, method); a batch's
#: inputs are built in ``forwards.last_logits`` outside the trunk's states and the passes
REGIONS = (("", "perturb"), ("forwards", "last_logits"), ("trunk", "states"), ("forwards.passes", "logits"),
           ("forwards.passes", "group_logits"), ("", "losses"), ("", "choice_losses"))


def label_regions(backend):
    """Wrap the backend's parts in profiler labels (on these instances only)."""
    for owner_name, name in REGIONS:
        owner = functools.reduce(getattr, owner_name.split("."), backend) if owner_name else backend
        if owner is None:  # e.g. no trunk cache
            continue
        fn = getattr(owner, name)

        def labelled(*a, _fn=fn, _name=name, **k):
            with torch.profiler.record_function(f"## {_name}"):
                return _fn(*a, **k)
        setattr(owner, name, labelled)


def busy_time(prof) -> tuple[float, float]:
    """(device busy seconds, window seconds) from the kernels' intervals."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, None
    for s, e in spans:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy * 1e-6, (spans[-1][1] - spans[0][0]) * 1e-6 if spans else 0.0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--lora-layers", default="top", choices=["all", "top"])
    p.add_argument("--hf", action="append", default=[], metavar="KEY=VALUE", help="an hf backend option")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    args.prefix = 0
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    opts = dict(o.split("=", 1) for o in args.hf)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(args.shape, Path(tmp) / args.shape,
                                       dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        b = make_backend(model_dir, args.shape, args.lora_layers, opts, args.device, dtype)
        step = Stepper(b, pool(args))
        for _ in range(2 * args.pool):
            step()
        wall = timed(lambda: [step() for _ in range(args.steps)], args.device) / args.steps
        print(f"# step {1e3 * wall:.2f} ms (mean of {args.steps}, unprofiled); hf options {opts}")
        label_regions(b)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            synchronize(args.device)
        if args.device.startswith("cuda"):
            busy, window = busy_time(prof)
            print(f"# profiled: device busy {1e3 * busy / args.steps:.2f} ms per step of "
                  f"{1e3 * window / args.steps:.2f} ms ({busy / window:.0%})")
        averages = prof.key_averages()
        print("# host time of the backend's parts, per step:")
        labels = {}  # one row per label (on CUDA the profiler lists each label for the device too)
        for e in sorted((e for e in averages if e.key.startswith("## ")), key=lambda e: -e.cpu_time_total):
            labels.setdefault(e.key, e)
        for e in labels.values():
            print(f"#   {e.key[3:]:18} {e.cpu_time_total / 1e3 / args.steps:7.3f} ms  ({e.count // args.steps} calls)")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        if args.device.startswith("cuda"):
            print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
