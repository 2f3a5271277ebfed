"""Step time of the hf backend against two plain forwards.

    python -m benchmarks.bench_hf                      # CPU: SmolLM2-135M shape, B=8, T=64
    python -m benchmarks.bench_hf --device cuda --preset llama-1.1b   # B=16, T=256, bf16

Reports the median MeZO step (two perturbed forwards + the fused update, as
the trainer takes them over a pool of four batches in turn) and
its ratio to two forwards of the base model in the reference style (plain
transformers forward, full logits), and to two forwards of our own loss path.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import SHAPES, Stepper, build_random_model, environment, make_batches, median_times, write_result
from mezo_core.config import load_config

PRESETS = {"cpu": dict(shape="smollm2-135m", batch=8, seq=64, dtype="float32"),
           "llama-1.1b": dict(shape="llama-1.1b", batch=16, seq=256, dtype="bfloat16")}


def run(shape, batch, seq, dtype, device, lora_layers, r, steps, model_root, hf_options=()):
    from mezo_backend_hf.backend import HFBackend
    layers = SHAPES[shape]["num_hidden_layers"]
    model_dir = build_random_model(shape, Path(model_root) / shape,
                                   dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    overrides = [f"model.path={model_dir}", f"model.dtype={dtype}", f"model.device={device}",
                 f"lora.r={r}", f"lora.alpha={2 * r}", "lora.target_modules=[q_proj,v_proj]"]
    if lora_layers == "top-quarter":
        overrides.append(f"lora.layers=[{','.join(str(i) for i in range(layers - layers // 4, layers))}]")
    overrides += [f"hf.{o}" for o in hf_options]
    backend = HFBackend(load_config(None, overrides))
    batches, _ = make_batches(batch, seq, SHAPES[shape]["vocab_size"], pool=4)
    ids = [torch.tensor([e.prompt_ids + e.target_ids for e in b], device=backend.device) for b in batches]
    turn = {"base": 0, "loss": 0}

    def take(which, items):
        turn[which] += 1
        return items[turn[which] % len(items)]

    @torch.inference_mode()
    def base_forward():  # reference style: the base model, full logits
        with backend.model.disable_adapter():
            backend.model(input_ids=take("base", ids)).logits.float()

    # round robin: each round times one of each, so clock and noise drift hit all alike
    t_step, t_base, t_loss = median_times(
        [Stepper(backend, batches), base_forward, lambda: backend.losses(take("loss", batches))],
        steps, warmup=2 * len(batches), device=device)
    all_steps = t_step[1]
    t_step, t_base, t_loss = t_step[0], t_base[0], t_loss[0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if backend.device.type == "cuda" else None
    backend.close()
    return {"shape": shape, "batch": batch, "seq": seq, "dtype": dtype, "lora_layers": lora_layers,
            "lora_r": r, "hf_options": list(hf_options), "steps_timed": steps,
            "step_ms": 1e3 * t_step, "base_forward_ms": 1e3 * t_base, "loss_forward_ms": 1e3 * t_loss,
            "step_over_two_base_forwards": t_step / (2 * t_base),
            "step_over_two_loss_forwards": t_step / (2 * t_loss),
            "tokens_per_second": 2 * batch * seq / t_step, "peak_memory_gib": peak,
            "step_times_ms": [1e3 * t for t in all_steps]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu, or llama-1.1b on cuda")
    p.add_argument("--shape", choices=list(SHAPES))
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--dtype")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-layers", default="all", choices=["all", "top-quarter"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hf", action="append", default=[], metavar="KEY=VALUE",
                   help="an hf backend option, e.g. --hf cuda_graphs=true (repeatable)")
    p.add_argument("--model-root", default=None, help="where random models are saved (default: a temp dir)")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset or ("llama-1.1b" if args.device.startswith("cuda") else "cpu")])
    for key in ("shape", "batch", "seq", "dtype"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    with tempfile.TemporaryDirectory() as tmp:
        row = run(preset["shape"], preset["batch"], preset["seq"], preset["dtype"], args.device,
                  args.lora_layers, args.lora_r, args.steps, args.model_root or tmp, args.hf)
    write_result({"benchmark": "hf step vs two forwards", **environment(args.device), "result": row}, args.out)


if __name__ == "__main__":
    main()
