"""The cost of filling the frozen-trunk cache in its canonical layout (#26): each
row right-padded to its canonical width, rows of one width per pass (the CPU),
against the old layout (all missing rows in one left-padded batch, an explicit
mask), which gave a row other bits in another batch. SmolLM2-135M's shape with
random weights, the demo's trunk (layers 0-25 below LoRA on 26-29), cold caches:
a training batch (16 rows of 8-47 tokens) and an evaluation batch (32 rows of
8-60 tokens, shortest first as Task.evaluate sends them), interleaved rounds.

    python -m benchmarks.bench_trunk_fill [--rounds 5] [--threads 1] [--out benchmarks/results/...json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from mezo_builtin.eviction import FIFO

SEED = 26


def old_states(trunk, rows):
    """The layout before #26: one left-padded batch of every missing row."""
    from mezo_backend_hf.inputs import batch_tensors
    ids, mask, positions = batch_tensors(rows, 0, trunk.device)
    hidden = trunk.capture(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return [hidden[j, hidden.shape[1] - len(r):] for j, r in enumerate(rows)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM
    from benchmarks.common import SHAPES
    from mezo_backend_hf.trunk import FrozenTrunk, RadixCache
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **SHAPES["smollm2-135m"])).eval()
    trainable = [p for layer in model.model.layers[26:] for p in layer.parameters()]
    vocab = SHAPES["smollm2-135m"]["vocab_size"]
    workloads = {"train batch (16 rows, 8-47 tokens)": (16, 8, 47, False),
                 "eval batch (32 rows, 8-60 tokens, sorted)": (32, 8, 60, True)}
    times = {(w, layout): [] for w in workloads for layout in ("old", "canonical")}
    rng = random.Random(SEED)
    start = time.perf_counter()
    layout = FrozenTrunk(model, RadixCache(1 << 34, FIFO), trainable).layout  # the once-a-process check
    probe_ms = round((time.perf_counter() - start) * 1000, 1)
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for w, (n, lo, hi, sort) in workloads.items():
                rows = [tuple(rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))) for _ in range(n)]
                if sort:
                    rows.sort(key=len)
                for kind in (("old", "canonical") if r % 2 else ("canonical", "old")):
                    trunk = FrozenTrunk(model, RadixCache(1 << 34, FIFO), trainable)
                    trunk.layout = layout
                    assert trunk.k0 == 26
                    start = time.perf_counter()
                    trunk.states(rows) if kind == "canonical" else old_states(trunk, rows)
                    if r:
                        times[(w, kind)].append(time.perf_counter() - start)
    summary = {}
    for w in workloads:
        old, new = (statistics.median(times[(w, k)]) for k in ("old", "canonical"))
        summary[w] = {"old_ms": round(old * 1000, 1), "canonical_ms": round(new * 1000, 1),
                      "canonical_over_old": round(new / old, 3),
                      "each_round_ms": {k: [round(t * 1000, 1) for t in times[(w, k)]] for k in ("old", "canonical")}}
    record = {"command": "python -m benchmarks.bench_trunk_fill " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__,
                          "note": "a 2-core machine shared with other jobs; rounds interleave the layouts"},
              "layout": layout, "layout_check_ms (once a process)": probe_ms, "summary": summary}
    print(json.dumps({"layout": layout, "layout_check_ms": probe_ms, "summary": summary}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
