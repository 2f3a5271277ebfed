"""Helpers for testing mezo-run and its plugins: tiny real-architecture models
with a tokenizer trained here (no downloads), a tiny classification task and
its run config, a plugin that interrupts a run. Importable, so a plugin
package's tests and the benchmarks use them without reaching into tests/."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from mezo_core import hookimpl

WORDS = ("the a movie film story plot actor scene music ending was is great terrible good bad "
         "fine awful boring fun long short very quite not it was really so dull lovely").split()


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def train_tokenizer(out_dir: Path, vocab_size=300):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, arch: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0,
                heads: int = 4, kv_heads: int = 2):
    """Save a randomly initialised model of the given architecture with a trained tokenizer.

    ``heads``/``kv_heads`` set the attention heads (head_dim = hidden // heads; vLLM's
    CPU attention wants head_dim 32, 64, ...; GPT-2 uses ``heads`` only)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=256, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(out_dir)
    return out_dir


def write_task_files(folder, n_train=8, n_dev=6):
    """Tiny classification JSONL files (train, dev) for end-to-end runs."""
    import json
    words = "the movie was great fun the film was boring and dull a lovely story".split()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                text = " ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i % 4))
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return folder / "train.jsonl", folder / "dev.jsonl"


def write_run_config(tmp_path, model, overrides=None):
    """A run YAML on the tiny task; ``overrides`` maps dotted keys to values."""
    import yaml
    train, dev = write_task_files(Path(tmp_path) / "data")
    cfg = {"backend": "hf", "seed": 0, "out_dir": str(Path(tmp_path) / "run"), "progress": False,
           "plot": False, "eval_batch_size": 8, "checkpoint_every": 2,
           "model": {"path": str(model)}, "lora": {"r": 2, "alpha": 4},
           "task": {"kind": "classification", "train": str(train), "dev": str(dev),
                    "template": "{text} It was", "verbalizer": [" great", " terrible"], "k_per_class": 3},
           "mezo": {"steps": 4, "batch_size": 2, "lr": 1.0e-2, "eps": 1.0e-2}}
    for key, value in (overrides or {}).items():
        node, *path, leaf = [cfg] + key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    out = Path(tmp_path) / "run.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


class InterruptAt:
    """A plugin that stops a run (as Ctrl-C would) at the end of a given step."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt


def typed_section(options: type, values: dict, name: str):
    """An engine backend's options from one flat mapping, as tests write them: keys
    that are not fields of ``options`` go to its ``engine`` dict (the engine's own
    keyword arguments)."""
    from dataclasses import fields

    from .config import options_from
    known = {f.name for f in fields(options)}
    engine = {**{k: v for k, v in values.items() if k not in known}, **dict(values.get("engine") or {})}
    return options_from(options, {**{k: v for k, v in values.items() if k in known}, "engine": engine}, name)
