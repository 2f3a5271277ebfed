"""Data-parallel MeZO on the CPU: 2 gloo processes must take the same steps as
each other and as one process over the same global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mezo_core import Example
from mezo_core.config import load_config
from mezo_core.distributed import shard, sum_over_ranks
from mezo_core.mezo import direction_seeds, mezo_step

STEPS = 4
# a shard is padded to its own width, so its fp32 losses differ from the full
# batch's by ~1e-6; g = dL/(2 eps) amplifies that to ~1e-4, times lr*|z| per step
TOL = 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(seed=0):
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    return [Example(tuple(torch.randint(4, 250, (n,), generator=gen).tolist()), (7, 9)) for n in (3, 5, 8, 4, 6, 9)]


def run_steps(model_dir, reduce, rank=0, world=1):
    from mezo_backend_hf.backend import HFBackend
    backend = HFBackend(load_config(None, [f"model.path={model_dir}"]))
    batch = shard(global_batch(), rank, world)
    for step in range(STEPS):
        mezo_step(backend, batch, direction_seeds(0, step, 2), 1e-2, 5e-2, 0.01, reduce=reduce)
    return {n: t.clone() for n, t in zip(backend.trainable_names(), backend.trainable_tensors())}


def _step_worker(rank, world, port, model_dir, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(run_steps(model_dir, sum_over_ranks, rank, world), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_each_other_and_one_process(tiny_llama, tmp_path):
    mp.spawn(_step_worker, args=(2, free_port(), str(tiny_llama), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = run_steps(tiny_llama, None)
    moved = 0.0
    for name in single:
        assert torch.equal(r0[name], r1[name]), name  # same g on every rank: identical weights
        assert torch.allclose(r0[name], single[name], atol=TOL, rtol=0), name
        if ".lora_B." in name:  # starts at zero: how far training moved it
            moved = max(moved, float(single[name].abs().max()))
    assert moved > 100 * TOL


def _cli_worker(rank, world, port, config):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mezo_core.cli import main
    try:
        assert main(["train", "-c", config]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_mezo_run_train_under_two_ranks_matches_one_process(tiny_llama, tmp_path):
    from tiny import write_run_config
    fields = {"mezo.steps": 3, "mezo.batch_size": 4, "checkpoint_every": 0}
    dp = write_run_config(tmp_path / "dp", tiny_llama, fields)
    mp.spawn(_cli_worker, args=(2, free_port(), str(dp)), nprocs=2)
    one = write_run_config(tmp_path / "one", tiny_llama, fields)
    from mezo_core.cli import main
    assert main(["train", "-c", str(one)]) == 0
    a = load_file(tmp_path / "dp" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), name
    rows = (tmp_path / "dp" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # rank 0 alone writes
