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


def workload(batch, seq, vocab, seed=0):
    """``batch`` rows of ``seq`` random tokens; the last token is the target."""
    from mezo_core import Example
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=gen).tolist()
    return [Example(tuple(r[:-1]), (r[-1],)) for r in ids]


def make_batches(batch, seq, vocab, prefix_frac=0.0, pool=1, seed=0):
    """``pool`` batches of ``batch`` rows x ``seq`` tokens; the first round(prefix_frac*seq)
    tokens of every row (of every batch) are those of row 0 of batch 0. The prefix never
    covers the target: at most seq-1 tokens."""
    from mezo_core import Example
    if not 0.0 <= prefix_frac <= 1.0:
        raise ValueError(f"--prefix-frac must be in [0, 1] (got {prefix_frac})")
    n_prefix = min(seq - 1, round(prefix_frac * seq))
    batches = [workload(batch, seq, vocab, seed=seed + i) for i in range(pool)]
    prefix = batches[0][0].prompt_ids[:n_prefix]
    out = [[Example(prefix + e.prompt_ids[n_prefix:], e.target_ids) for e in b] for b in batches]
    return out, n_prefix


class Stepper:
    """MeZO steps as the trainer takes them: the fused schedule (each step's
    update also applies the next step's +eps z) over a pool of batches taken in
    turn, so no two consecutive steps see the same rows."""

    def __init__(self, backend, batches, eps=1e-3, lr=1e-6):
        self.backend, self.batches, self.eps, self.lr = backend, batches, eps, lr
        self.step, self.applied = 0, 0.0

    def __call__(self):
        from mezo_core.mezo import mezo_step
        s, self.step = self.step, self.step + 1
        result = mezo_step(self.backend, self.batches[s % len(self.batches)], [s], self.eps, self.lr,
                           applied=self.applied, next_direction=(s + 1, self.eps))
        self.applied = result.applied
        return result


def timed(fn, device) -> float:
    """Seconds of one call, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


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
            out.append(timed(fn, device))
    return [(statistics.median(t), t) for t in times]


def environment(device) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "command": " ".join([Path(sys.executable).name, "-m", "benchmarks." + Path(sys.argv[0]).stem]
                               + sys.argv[1:])}
    from importlib.metadata import PackageNotFoundError, version
    for name in ("peft", "triton", "vllm", "sglang"):   # from the metadata: importing an engine is slow
        try:
            env[name] = version(name)
        except PackageNotFoundError:
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
