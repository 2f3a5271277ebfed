"""Data-parallel scaling of the MeZO step (hf backend, one GPU per rank).

    torchrun --nproc_per_node 2 -m benchmarks.bench_dp --shape llama-1.1b --global-batch 32 --out dp2.json

Strong scaling: the global batch is fixed and split over the ranks; every rank
takes the same step after one all-reduce of three scalars per direction.
"""
import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import SHAPES, build_random_model, environment, timed, workload, write_result
from mezo_core.config import load_config
from mezo_core.distributed import init_from_env, rank_and_world, shard, sum_over_ranks
from mezo_core.mezo import mezo_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama-1.1b", choices=list(SHAPES))
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model-root", default="/tmp/mezo-models")
    p.add_argument("--out")
    args = p.parse_args(argv)
    init_from_env()
    rank, world = rank_and_world()
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    model_dir = Path(args.model_root) / args.shape
    if rank == 0:
        build_random_model(args.shape, model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    if world > 1:
        dist.barrier()
    from mezo_backend_hf.backend import HFBackend
    backend = HFBackend(load_config(None, [f"model.path={model_dir}", f"model.device={device}",
                                           f"model.dtype={dtype}", "lora.r=16", "lora.alpha=32"]))
    batch = shard(workload(args.global_batch, args.seq, SHAPES[args.shape]["vocab_size"]), rank, world)
    times = []
    for step in range(args.steps + 2):
        times.append(timed(lambda: mezo_step(backend, batch, [step], 1e-3, 1e-6, reduce=sum_over_ranks), device))
    times = times[2:]
    # the ranks must still hold the same adapter
    first = backend.trainable_tensors()[0].float().sum().item()
    checks = sum_over_ranks([first, first * first])
    same = abs(checks[1] / world - (checks[0] / world) ** 2) < 1e-6 * max(1.0, abs(checks[1]))
    if rank == 0:
        med = statistics.median(times)
        write_result({"benchmark": "data-parallel MeZO step", **environment(device), "world_size": world,
                      "shape": args.shape, "global_batch": args.global_batch, "seq": args.seq,
                      "step_ms": 1e3 * med, "tokens_per_second": 2 * args.global_batch * args.seq / med,
                      "ranks_hold_identical_adapters": same, "step_times_ms": [1e3 * t for t in times]},
                     args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
