"""Evaluation of review-length inputs (#15 item 2): file order (the old loop, every
batch padded to its longest row) against ``Task.evaluate`` (rows shortest first),
same backend, same predictions; and with ``task.max_tokens`` on top.

The workload: 300 texts built from SST-2 sentences (real English) with lengths
drawn from a log-normal -- median ~100 tokens, 95th percentile ~350, the longest
1,500 -- under the real SmolLM2 tokenizer (from the bundled GGUF). The model is a
random-weight Llama of SmolLM2-135M's shape with fewer layers (``--layers``: the
time of every row scales alike, so the ratio holds; the CPU run stays short).

    python -m benchmarks.bench_eval_long [--layers 6] [--max-tokens 512] [--out benchmarks/results/...json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.models import resolve_model_dir
from mezo_core.registry import Registry, make_plugin_manager

SEED = 15


def build_model(tokenizer_dir: Path, layers: int, out: Path) -> Path:
    """A random-weight Llama of SmolLM2-135M's shape (``layers`` of its 30) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def synthesise(tok, sentences, n=300, seed=SEED):
    """``n`` texts whose token lengths follow a log-normal (median 100, p95 ~350), the longest 1,500."""
    rng = random.Random(seed)
    lengths = [min(1500, max(8, round(rng.lognormvariate(4.6, 0.78)))) for _ in range(n)]
    lengths[rng.randrange(n)] = 1500
    texts = []
    for want in lengths:
        ids = []
        while len(ids) < want:
            ids += tok(" " + rng.choice(sentences), add_special_tokens=False)["input_ids"]
        texts.append(tok.decode(ids[:want]).strip())
    return texts


def old_evaluate(task, backend, batch_size):
    """The loop before #15: batches in file order, each padded to its longest row."""
    scores = []
    for start in range(0, len(task.dev), batch_size):
        chunk = task.dev[start:start + batch_size]
        scores.append(backend.choice_losses([task.prompt(r) for r in chunk], task.choices))
    return torch.cat(scores)


def new_scores(task, backend, batch_size):
    """Task.evaluate's order (shortest first), scores put back in file order for the comparison."""
    order = sorted(range(len(task.dev)), key=lambda i: len(task.prompt(task.dev[i])))
    out = [None] * len(task.dev)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, row in zip(idx, backend.choice_losses([task.prompt(task.dev[i]) for i in idx], task.choices)):
            out[i] = row
    return torch.stack(out)


def padded_tokens(lengths, batch_size):
    return sum(len(lengths[i:i + batch_size]) * max(lengths[i:i + batch_size])
               for i in range(0, len(lengths), batch_size))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--texts", type=int, default=300, help="fewer for a smoke test")
    ap.add_argument("--assets", default=os.environ.get("MEZO_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    assets = Path(args.assets)
    gguf = assets / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    tok_dir = resolve_model_dir(str(gguf))
    model_dir = build_model(tok_dir, args.layers, Path.home() / ".cache/mezo-run" / f"bench-eval-long-{args.layers}l")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    sentences = [line.split("\t")[0] for line in (assets / "data/sst2/train.tsv").read_text().splitlines()[1:]]
    texts = synthesise(tok, sentences, n=args.texts)
    lengths = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "reviews.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
        base = [f"model.path={model_dir}", f"task.train={data}", f"task.dev={data}", "task.k_per_class=null",
                "task.template=Review: {text}\nSentiment:", "task.verbalizer=[' negative',' positive']",
                "hf.trunk_cache=false", "lora.r=4", f"eval_batch_size={args.batch_size}"]
        registry = Registry(make_plugin_manager())
        cfg = load_config(None, base, registry)
        backend = registry.get("backends", "hf")(cfg, registry)
        backend.perturb([(SEED, 1e-2)])                       # a non-zero adapter
        task = Task(cfg.task, backend.tokenizer)
        cut_cfg = load_config(None, base + [f"task.max_tokens={args.max_tokens}"], registry)
        cut_task = Task(cut_cfg.task, backend.tokenizer)
        old_evaluate(task, backend, args.batch_size)[:1]      # warm-up (allocator, kernels)
        rows = {}
        for name, fn, t in (("file_order", old_evaluate, task), ("length_sorted", new_scores, task),
                            (f"length_sorted_max_tokens_{args.max_tokens}", new_scores, cut_task)):
            start = time.perf_counter()
            with torch.no_grad():
                scores = fn(t, backend, args.batch_size)
            seconds = time.perf_counter() - start
            if name == "length_sorted":   # Task.evaluate itself, timed too: the code a user runs
                start = time.perf_counter()
                metrics = task.evaluate(backend, args.batch_size)
                rows["task_evaluate_seconds"] = round(time.perf_counter() - start, 2)
                rows["task_evaluate_accuracy"] = metrics["dev_accuracy"]
            plens = [len(t.prompt(r)) + 1 for r in t.dev]
            order = plens if name == "file_order" else sorted(plens)
            rows[name] = {"seconds": round(seconds, 2), "real_tokens": sum(plens),
                          "padded_tokens": padded_tokens(order, args.batch_size), "scores": scores}
            print(f"{name:32} {seconds:8.2f} s  padded/real {rows[name]['padded_tokens'] / sum(plens):.2f}",
                  file=sys.stderr)
    old, new = rows["file_order"], rows["length_sorted"]
    cut = rows[f"length_sorted_max_tokens_{args.max_tokens}"]
    gold = torch.tensor([r.label for r in task.dev])
    result = {
        "benchmark": "bench_eval_long", "command": "python -m benchmarks.bench_eval_long " + " ".join(argv or sys.argv[1:]),
        "model": f"random-weight Llama of SmolLM2-135M's shape with {args.layers} of its 30 layers (fp32), "
                 "the real SmolLM2 tokenizer (bundled GGUF); hf backend, trunk cache off, LoRA r=4 perturbed once",
        "workload": {"texts": len(texts), "median_tokens": lengths[len(lengths) // 2],
                     "p95_tokens": lengths[int(0.95 * len(lengths))], "max_tokens": lengths[-1],
                     "source": "SST-2 train sentences joined to log-normal lengths", "seed": SEED},
        "batch_size": args.batch_size, "torch_threads": args.threads,
        "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_average_1min_at_end": os.getloadavg()[0],   # a shared machine: others' jobs slow both loops alike
        "file_order_seconds": old["seconds"], "length_sorted_seconds": new["seconds"],
        "speedup_sorted": round(old["seconds"] / new["seconds"], 2),
        "padded_over_real": {k: round(rows[k]["padded_tokens"] / rows[k]["real_tokens"], 2)
                             for k in ("file_order", "length_sorted")},
        "identical_predictions": bool((old["scores"].argmin(1) == new["scores"].argmin(1)).all()),
        "max_abs_loss_diff": float((old["scores"] - new["scores"]).abs().max()),
        "accuracy": float((new["scores"].argmin(1) == gold).double().mean()),
        "task_evaluate_seconds": rows["task_evaluate_seconds"],
        "task_evaluate_accuracy": rows["task_evaluate_accuracy"],
        f"max_tokens_{args.max_tokens}": {
            "seconds": cut["seconds"], "speedup_over_file_order": round(old["seconds"] / cut["seconds"], 2),
            "truncated_examples": cut_task.truncated // 2,   # train and dev are the same file
            "predictions_equal_to_full_length": float((cut["scores"].argmin(1) == new["scores"].argmin(1)).double().mean())},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
