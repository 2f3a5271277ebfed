"""Data parallel MeZO over torch.distributed.

Every rank holds the same adapter and scores its shard of the global batch;
one all-reduce of three scalars (sum of L+, sum of L-, example count) gives
every rank the same projected gradient, so the ranks stay identical with no
weight traffic at all. Start with torchrun: ``torchrun --nproc_per_node 2
-m mezo_core.cli train ...``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that torchrun describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of a few scalars over all ranks (identity on one process)."""
    if rank_and_world()[1] == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shard(batch: list, rank: int, world: int) -> list:
    """This rank's part of the global batch (round robin)."""
    return batch[rank::world]
