"""A reward step against plain generation, per backend, on the same prompts (#29).

    python -m benchmarks.reward_speed                                   # CPU: tiny shape, hf rows + vllm
    python -m benchmarks.reward_speed --device cuda --shape llama-1.1b --prompts 64 --new 128 --q 8 \\
        --rows hf-pm,vllm,sglang --out benchmarks/results/reward-speed-<gpu>.json
    python -m benchmarks.reward_speed ... --samples 8                   # the radix reuse of 8 samples a prompt

Workload: ``--prompts`` random prompts of ``--prompt-len`` tokens (their first
``--shared`` tokens common, a template), a random-weight Llama of ``--shape``
(``common.build_random_model``), LoRA r=16 on q_proj/v_proj, ``--new`` new tokens a
completion (random weights rarely hit EOS, so rows run to the end), reward
``exact_match`` against a fixed reference (its value does not matter for time).

Columns per row (median of ``--steps`` after one warm-up):

* ``step_ms``: one MeZO reward step with ``--q`` directions (``mezo_step``: every
  perturbed state generates the batch's completions, the update follows), as the
  trainer takes it; the engines put all 2q states in one call (``all_directions``;
  the ``-pairs`` rows: one direction at a time, both signs in one call), hf-pm in
  one batch of side adapters, hf one state after another.
* ``generate_only_ms``: the same engine generating *the same number of completions*
  (2q x prompts x samples rows, prompts of the same length, distinct so that none
  is deduplicated) under the unperturbed adapter in one call: what inference of that
  much text costs. ``step_over_generate`` = step / generate-only (goal <= 1.25).
* ``batch_generate_ms``: one generation of the batch itself (prompts x samples rows).
* ``token_reuse``: the engine's reused / looked-up prompt tokens over the timed steps.
* ``hf_step_over_step``: the faster hf row's step / this row's (goal >= 3 for the engines).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

import torch

from .common import build_random_model, environment, synchronize, timed, write_result
from .compare import backend_class, cache_counters, counter_delta

#: row -> (backend, its options); *-pairs: one direction at a time, both signs in one call
ROWS = {"hf": ("hf", {}), "hf-pm": ("hf", {"pm_batch": True}), "vllm": ("vllm", {}), "sglang": ("sglang", {}),
        "vllm-pairs": ("vllm", {"all_directions": False}), "sglang-pairs": ("sglang", {"all_directions": False})}


def make_config(args, model_dir, backend, opts):
    from omegaconf import OmegaConf

    from mezo_core.config import load_config
    cfg = load_config(None, [f"backend={backend}", f"model.path={model_dir}", f"model.device={args.device}",
                             f"model.dtype={args.dtype}", "seed=0", "lora.r=16", "lora.alpha=32",
                             "lora.target_modules=[q_proj,v_proj]", f"mezo.q={args.q}"])
    rows = 2 * args.q * args.prompts * args.samples
    if backend == "vllm":
        engine = {"max_model_len": args.prompt_len + args.new + 16, "max_num_seqs": min(1024, rows)}
        if args.device.startswith("cuda"):
            engine.update(gpu_memory_utilization=args.engine_mem)
        opts = {**opts, "engine": engine}
    elif backend == "sglang":
        opts = {**opts, "engine": {"mem_fraction_static": args.engine_mem}}
    if opts:
        cfg[backend] = OmegaConf.merge(cfg[backend], opts)
    return cfg


def prompts(args, n, seed, vocab):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(10, vocab, (args.shared,), generator=torch.Generator().manual_seed(0)).tolist()
    rest = torch.randint(10, vocab, (n, args.prompt_len - args.shared), generator=gen).tolist()
    return [tuple(shared + r) for r in rest]


def measure(backend, args, vocab):
    """(step_ms, generate_only_ms, batch_generate_ms, token_reuse, requests a step) medians."""
    from mezo_core.forwards import Prompt
    from mezo_core.mezo import direction_seeds, mezo_step
    from mezo_core.rewards import Rewarder
    from mezo_core.registry import get_registry
    reward = get_registry().get("rewards", "exact_match")(None)
    rewarder = Rewarder(reward, args.new, args.samples, temperature=1.0)
    batch = [Prompt(p, "t11", rewarder, sample_seed=i) for i, p in enumerate(prompts(args, args.prompts, 1, vocab))]
    many = prompts(args, 2 * args.q * args.prompts * args.samples, 2, vocab)
    sampled = {"temperature": 1.0, "seeds": list(range(len(many)))} if args.samples > 1 else {}
    rows = [p for p in (e.prompt_ids for e in batch) for _ in range(args.samples)]
    state = {"step": 0}

    def step():
        s = state["step"] = state["step"] + 1
        mezo_step(backend, batch, direction_seeds(0, s, args.q), args.eps, 1e-5)

    def generate_only():
        backend.generate(many, args.new, **sampled)

    def batch_generate():
        backend.generate(rows, args.new, **({"temperature": 1.0, "seeds": list(range(len(rows)))}
                                            if args.samples > 1 else {}))

    fns = {"step": step, "generate_only": generate_only, "batch_generate": batch_generate}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                        # warm-up (engine graphs, allocator)
    reuse, requests = [], []
    for _ in range(args.steps):
        for name, fn in fns.items():
            before = cache_counters(backend.stats())
            n0 = backend.stats().requests
            times[name].append(timed(fn, args.device) * 1e3)
            if name == "step":
                reuse.append(counter_delta(before, cache_counters(backend.stats()))["token_reuse"])
                requests.append(None if n0 is None else backend.stats().requests - n0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return (med, statistics.median(reuse) if None not in reuse else None,
            statistics.median(requests) if None not in requests else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reward_speed", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--rows", default="hf,hf-pm,vllm")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--shared", type=int, default=16, help="leading tokens every prompt shares")
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--engine-mem", type=float, default=0.5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    from mezo_core.registry import get_registry
    from .common import SHAPES
    registry, vocab = get_registry(), SHAPES[args.shape]["vocab_size"]
    model_dir = build_random_model(args.shape, Path(tempfile.mkdtemp()) / args.shape,
                                   dtype=getattr(torch, args.dtype))
    result = {"benchmark": "reward_speed", "env": environment(args.device), "args": vars(args), "rows": {}}
    for row in args.rows.split(","):
        name, opts = ROWS[row]
        cls, reason = backend_class(registry, name)
        if reason:
            result["rows"][row] = {"unavailable": reason}
            continue
        backend = cls(make_config(args, model_dir, name, opts), registry)
        try:
            med, reuse, requests = measure(backend, args, vocab)
        finally:
            backend.close()
            del backend
            gc.collect()
            synchronize(args.device)
        result["rows"][row] = {"step_ms": round(med["step"], 1), "generate_only_ms": round(med["generate_only"], 1),
                               "batch_generate_ms": round(med["batch_generate"], 1),
                               "step_over_generate": round(med["step"] / med["generate_only"], 3),
                               "token_reuse": None if reuse is None else round(reuse, 4),
                               "requests_per_step": requests}
        print(row, result["rows"][row], flush=True)
        if args.out:                                # what is measured survives a killed run
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    hf = min((result["rows"][r]["step_ms"] for r in ("hf-pm", "hf") if "step_ms" in result["rows"].get(r, {})),
             default=None)                          # hf's faster configuration
    for r in result["rows"].values():
        if hf and "step_ms" in r:
            r["hf_step_over_step"] = round(hf / r["step_ms"], 3)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
