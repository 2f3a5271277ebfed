"""Evaluation runs rows shortest first (less padding); its metrics must equal the
plain in-file-order computation, row by row."""
import random

import torch

from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.registry import get_registry
from tiny import write_run_config

SEED = 7


def test_length_sorted_evaluation_equals_file_order(tmp_path, tiny_llama):
    print("seed", SEED)
    cfg = load_config(write_run_config(tmp_path, tiny_llama), ["lora.layers=[2,3]"])
    backend = get_registry().get("backends", "hf")(cfg)
    backend.perturb([(SEED, 0.3)])                      # a non-trivial adapter
    task = Task(cfg.task, backend.tokenizer)
    random.Random(SEED).shuffle(task.dev)
    got = task.evaluate(backend, batch_size=4)
    # oracle: one row at a time, in file order
    scores = torch.cat([backend.choice_losses([task.prompt(r)], task.choices) for r in task.dev])
    gold = torch.tensor([r.label for r in task.dev])
    want_acc = float((scores.argmin(1) == gold).double().mean())
    want_loss = float(scores[torch.arange(len(gold)), gold].mean())
    assert got["dev_accuracy"] == want_acc
    assert got["dev_outcomes"] == "".join("1" if ok else "0" for ok in (scores.argmin(1) == gold).tolist())
    assert abs(got["dev_loss"] - want_loss) < 1e-6
