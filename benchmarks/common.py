"""Shared pieces of the benchmarks: model shapes with random weights, a
synthetic workload, timing, and the JSON record (device, versions, command)."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # name: LlamaConfig fields (random weights of a real architecture)
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    "llama-6.7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
}


def build_random_model(shape: str, out_dir: Path, dtype=torch.bfloat16, seed=0) -> Path:
    """Save a random-weight Llama of ``shape`` with a byte-level stand-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    fields = SHAPES[shape]
    config = LlamaConfig(max_position_embeddings=4096, **fields)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(fields["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(out_dir)
    return out_dir


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, repeats: int, warmup: int = 2, device="cpu") -> list[tuple[float, list[float]]]:
    """(median, all times) of each function, timed round robin after a warm-up."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return [(statistics.median(t), t) for t in times]


def environment(device) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "command": " ".join([Path(sys.executable).name, "-m", "benchmarks." + Path(sys.argv[0]).stem]
                               + sys.argv[1:])}
    for name in ("peft", "triton"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({torch.get_num_threads()} threads) {platform.processor() or platform.machine()}"
    return env


def write_result(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
