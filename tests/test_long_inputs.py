"""Long inputs (#15 item 2): task.max_tokens cuts the text, never the template's
answer slot, and says how many it cut; training batches grouped by length (an
option that leaves the default batches alone); the thread default."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from mezo_core.cli import main, set_threads
from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.errors import MezoError
from mezo_core.philox import mix
from mezo_core.registry import get_registry
from tiny import WORDS, write_run_config

SEED = 15
TEMPLATE = "Review: {text}\nAnswer:"


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def long_texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 5, 8, 40, 90]))) for _ in range(n)]


def make_task(tmp_path, model, overrides=(), n=30, kind="classification"):
    print("seed", SEED)
    texts = long_texts(n, SEED)
    if kind == "classification":
        rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    else:
        rows = [{"prompt": t, "completion": " great"} for t in texts]
    data = jsonl(tmp_path / "data.jsonl", rows)
    cfg = load_config(None, [f"task.train={data}", f"task.dev={data}", "task.k_per_class=null",
                             f"task.kind={kind}", f"task.template={TEMPLATE}",
                             "task.verbalizer=[' great', ' terrible film']", *overrides])
    return Task(cfg.task, AutoTokenizer.from_pretrained(model)), texts


def test_max_tokens_cuts_the_text_never_the_answer_slot(tmp_path, tiny_llama, capsys):
    limit = 40
    task, texts = make_task(tmp_path, tiny_llama, [f"task.max_tokens={limit}"])
    tok = task.tok
    room = limit - max(len(c) for c in task.choices)
    suffix = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    cut = 0
    for record in task.train:
        full = tok(TEMPLATE.format(text=record.text))["input_ids"]
        ids = list(task.prompt(record))
        if len(full) <= room:                      # short: exactly as without max_tokens
            assert ids == full
            continue
        cut += 1
        assert len(ids) <= room
        assert ids[-len(suffix):] == suffix        # the answer slot is whole
        shown = tok.decode(ids, skip_special_tokens=True)
        assert shown.startswith("Review: ") and shown.endswith("\nAnswer:")
        kept = shown[len("Review: "):-len("\nAnswer:")]
        assert record.text.startswith(kept) and len(kept) < len(record.text)
        # the longest head that fits: one more token of text would not
        text_ids = tok(record.text, add_special_tokens=False)["input_ids"]
        k = len(tok(kept, add_special_tokens=False)["input_ids"])
        longer = tok(TEMPLATE.format(text=tok.decode(text_ids[:k + 1])))["input_ids"]
        assert len(longer) > room
    assert cut > 0 and task.truncated == 2 * cut    # train and dev hold the same rows
    err = capsys.readouterr().err
    assert err.count("task.max_tokens=40") == 1 and f"cut the text of {2 * cut} examples" in err
    # the training examples read the cut prompts
    assert all(len(e.prompt_ids) <= room for e in task.train_examples)


def test_without_max_tokens_nothing_changes(tmp_path, tiny_llama, capsys):
    task, _ = make_task(tmp_path, tiny_llama)
    for record in task.train:
        assert list(task.prompt(record)) == task.tok(TEMPLATE.format(text=record.text))["input_ids"]
    assert task.truncated == 0 and capsys.readouterr().err == ""


def test_max_tokens_too_small_is_one_clear_error(tmp_path, tiny_llama):
    with pytest.raises(MezoError, match=r"task\.max_tokens': 6 is too small"):
        make_task(tmp_path, tiny_llama, ["task.max_tokens=6"])
    with pytest.raises(MezoError, match=r"task\.max_tokens': must be > 0"):
        load_config(None, ["task.max_tokens=0"])


def test_completion_prompts_keep_their_end_and_the_completion(tmp_path, tiny_llama):
    task, texts = make_task(tmp_path, tiny_llama, ["task.max_tokens=20"], kind="completion")
    target = tuple(task.tok(" great", add_special_tokens=False)["input_ids"])
    cut = 0
    for record, example in zip(task.train, task.train_examples):
        full = task.tok(record.text)["input_ids"]
        assert example.target_ids == target and example.num_tokens <= 20 or len(full) + len(target) <= 20
        if len(full) + len(target) > 20:
            cut += 1
            assert example.num_tokens == 20
            head = full[:1] if full[0] == task.tok.bos_token_id else []               # BOS kept
            assert list(example.prompt_ids) == head + full[len(full) - 20 + len(target) + len(head):]
    assert cut > 0


def test_completion_keeps_a_bos_token(tmp_path):
    class BosTokenizer:   # one token per character, <s> = 1 in front
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [10 + ord(c) % 200 for c in text]}

    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdefghij", "completion": "XY"}])
    cfg = load_config(None, [f"task.train={data}", f"task.dev={data}", "task.kind=completion",
                             "task.max_tokens=6", "task.k_per_class=null"])
    example = Task(cfg.task, BosTokenizer()).train_examples[0]
    assert example.prompt_ids == (1, *(10 + ord(c) for c in "hij")) and len(example.target_ids) == 2


# -- batches grouped by length -----------------------------------------------------------
def old_batches(task, seed, steps, b):
    """The oracle: the batches of the code before group_by_length existed."""
    n, out = len(task.train_examples), []
    for step in range(steps):
        batch = []
        for i in range(step * b, (step + 1) * b):
            epoch, pos = divmod(i, n)
            gen = torch.Generator().manual_seed(mix(seed, epoch, 0xDA7A))
            batch.append(task.train_examples[torch.randperm(n, generator=gen).tolist()[pos]])
        out.append(batch)
    return out


def padded(batches):
    return sum(len(b) * max(e.num_tokens for e in b) for b in batches)


def test_group_by_length_is_off_by_default_and_a_pure_function(tmp_path, tiny_llama):
    plain, _ = make_task(tmp_path / "a", tiny_llama, n=60)
    assert [plain.train_batch(3, s, 4) for s in range(20)] == old_batches(plain, 3, 20, 4)
    grouped, _ = make_task(tmp_path / "b", tiny_llama, ["task.group_by_length=true"], n=60)
    other, _ = make_task(tmp_path / "c", tiny_llama, ["task.group_by_length=true"], n=60)
    steps = list(range(30))
    first = {s: grouped.train_batch(3, s, 4) for s in steps}
    random.Random(SEED).shuffle(steps)
    for s in steps:                                          # another Task, another call order
        assert other.train_batch(3, s, 4) == first[s]
    epoch = [e for s in range(15) for e in first[s]]          # 60 rows, batch 4: 15 steps an epoch
    assert sorted(map(id, epoch)) == sorted(map(id, grouped.train_examples))  # each row once
    assert padded([first[s] for s in range(15)]) < 0.8 * padded(old_batches(plain, 3, 15, 4))
    assert grouped.train_batch(4, 0, 4) != first[0]           # the seed matters


# -- a run and eval --------------------------------------------------------------------
def test_run_summary_and_eval_report_the_cut(tmp_path, tiny_llama, capsys):
    get_registry.cache_clear()
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 1, "task.max_tokens": 10,
                                                  "task.verbalizer": [" great", " terrible"]})
    assert main(["train", "-c", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    err = capsys.readouterr().err
    assert summary["truncated_examples"] > 0
    assert f"cut the text of {summary['truncated_examples']} examples" in err
    assert main(["eval", "-c", str(cfg), "progress=true"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out[out.index("{"):])
    assert result["truncated_examples"] > 0 and "eval (dev)" in err    # the progress bar, on stderr


def test_thread_default(monkeypatch):
    before = torch.get_num_threads()
    try:
        cfg = load_config(None, ["threads=1"])
        torch.set_num_threads(2)
        set_threads(cfg)
        assert torch.get_num_threads() == 1                   # the config wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        set_threads(load_config(None, []))
        assert torch.get_num_threads() == 1                   # OMP_NUM_THREADS set: left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(64)
        set_threads(load_config(None, []))
        import os
        assert torch.get_num_threads() <= len(os.sched_getaffinity(0))   # capped at the usable cores
    finally:
        torch.set_num_threads(before)
