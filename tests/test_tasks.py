"""Your own task (#15 item 3): quoted TSV fields, label names, n_dev as a seeded
sample. Oracles: Python's csv module writes the files; the expected labels and
samples are worked out here, not by the reader."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from mezo_core.config import load_config
from mezo_core.data import Task, read_records
from mezo_core.errors import MezoError
from mezo_core.forwards import objective

SEED = 1515


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + ord(c) % 200 for c in text]}


def write_tsv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")          # standard quoting where a field needs it
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def test_quoted_tsv_fields_hold_tabs_newlines_and_quotes(tmp_path):
    print("seed", SEED)
    rng = random.Random(SEED)
    texts = ["plain words", 'a "quoted" word', "a\ttab inside", "two\nlines", 'both\t"and"\nmore']
    texts += ["".join(rng.choice('ab \t\n"') for _ in range(12)).strip() or "x" for _ in range(20)]
    rows = [(t, i % 2) for i, t in enumerate(texts)]
    path = write_tsv(tmp_path / "q.tsv", rows)
    got = read_records(path, "classification", 2)
    assert [(r.text, r.label) for r in got] == rows


def test_unquoted_tsv_keeps_bare_quotes(tmp_path):
    """GLUE's files: quote characters are text, never quoting."""
    path = tmp_path / "glue.tsv"
    path.write_text('sentence\tlabel\nhe said " no\t0\n" a start\t1\nend "\t1\n')
    assert [r.text for r in read_records(path, "classification", 2)] == ['he said " no', '" a start', 'end "']


def test_label_names(tmp_path):
    rows = [{"text": f"t{i}", "label": ["negative", "positive", 0, 1, "1"][i % 5]} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"task.train={data}", f"task.dev={data}", "task.k_per_class=null",
                             "task.verbalizer={negative: ' terrible', positive: ' great'}"])
    task = Task(cfg.task, CharTokenizer())
    want = {"negative": 0, "positive": 1, 0: 0, 1: 1, "1": 1}
    assert {r.text: r.label for r in task.dev} == {r["text"]: want[r["label"]] for r in rows}
    tok = CharTokenizer()
    assert task.choices == [tuple(tok(" terrible", False)["input_ids"]), tuple(tok(" great", False)["input_ids"])]
    # a TSV label may be a name too
    tsv = write_tsv(tmp_path / "n.tsv", [("fine", "positive"), ("bad", "negative")])
    assert [r.label for r in read_records(tsv, "classification", ["negative", "positive"])] == [1, 0]


def test_label_name_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x", "label": "neutral"}) + "\n")
    with pytest.raises(MezoError, match=r"d\.jsonl, line 1: label 'neutral' is not one of the label names"):
        read_records(data, "classification", ["negative", "positive"])
    with pytest.raises(MezoError, match=r"line 1: label 'neutral' is not an integer \(for label names give "
                                        r"task\.verbalizer as a mapping"):
        read_records(data, "classification", 2)
    with pytest.raises(MezoError, match="task.verbalizer"):
        load_config(None, ["task.verbalizer={negative: 3, positive: ' great'}"])


def test_n_dev_is_a_seeded_sample_in_file_order(tmp_path):
    # a file sorted by label: the first n rows would all be label 0
    rows = [{"text": f"d{i:03d}", "label": int(i >= 50)} for i in range(100)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dev(seed):
        cfg = load_config(None, [f"task.train={data}", f"task.dev={data}", "task.k_per_class=null",
                                 "task.n_dev=20", f"task.sample_seed={seed}"])
        return [r.text for r in Task(cfg.task, CharTokenizer()).dev]

    a = dev(SEED)
    assert len(a) == len(set(a)) == 20 and a == sorted(a)            # a sample, in file order
    assert a == dev(SEED) and a != dev(SEED + 1)                     # a function of the seed
    labels = [int(t[1:]) >= 50 for t in a]
    assert 0 < sum(labels) < 20                                      # both classes, not the first rows


# -- multiple choice: candidates of each row's own (MeZO's COPA) -----------------------
MC_ROWS = [  # per-row candidates (2 or 3, multi-token), two rows sharing a set, labels as index or text
    {"text": "the movie was long", "choices": [" because it was boring", " so the film was great"], "label": 0},
    {"text": "the actor was good", "choices": [" so the story was fun", " because the music was dull"],
     "label": " so the story was fun"},
    {"text": "a lovely story", "choices": [" great", " terrible", " very fine"], "label": 2},
    {"text": "it was dull", "choices": [" great", " terrible"], "label": "terrible"},
    {"text": "not fun at all", "choices": [" great", " terrible"], "label": 1},
    {"text": "the ending was short", "choices": [" really bad", " quite good"], "label": 1},
]


def mc_config(tmp_path, model, *extra):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    return load_config(None, [f"model.path={model}", "task.kind=multiple_choice", f"task.train={data}",
                              f"task.dev={data}", "task.template={text}", "lora.r=2", "lora.alpha=4",
                              "hf.trunk_cache=false", *extra])


def oracle_candidate_scores(model, tokenizer):
    """Mean NLL of each row's candidates, from a plain forward per (prompt, candidate):
    the prompt and the candidates tokenized here, no padding."""
    out = []
    with torch.no_grad():
        for row in MC_ROWS:
            prompt = tokenizer(row["text"])["input_ids"]
            scores = []
            for c in row["choices"]:
                cand = tokenizer(c, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + cand])).logits[0].double(), -1)
                scores.append(float(sum(-logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(cand)) / len(cand)))
            out.append(torch.tensor(scores, dtype=torch.float64))
    return out


@pytest.fixture(scope="module")
def mc_backend(tmp_path_factory, tiny_llama):
    """An hf backend with a clearly non-zero adapter, and the plain peft model of that adapter."""
    from mezo_backend_hf.backend import HFBackend
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = tmp_path_factory.mktemp("mc")
    cfg = mc_config(tmp, tiny_llama)
    backend = HFBackend(cfg)
    print("adapter nudged along z(seed=%d)" % SEED)
    backend.perturb([(SEED, 0.5)])
    backend.save_adapter(tmp / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      str(tmp / "adapter")).eval()
    oracle = oracle_candidate_scores(plain, AutoTokenizer.from_pretrained(tiny_llama))
    yield cfg, backend, oracle
    backend.close()


def test_multiple_choice_rows_read_with_labels_as_index_or_text(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    records = read_records(data, "multiple_choice")
    assert [r.label for r in records] == [0, 0, 2, 1, 1, 1]        # worked out by hand from MC_ROWS
    assert [r.choices for r in records] == [tuple(r["choices"]) for r in MC_ROWS]


def test_multiple_choice_objective_and_evaluation_match_a_plain_forward(mc_backend):
    cfg, backend, oracle = mc_backend
    task = Task(cfg.task, backend.tokenizer)
    gold = [r.label for r in task.dev]
    # the training loss: cross-entropy of the gold candidate over the row's candidates
    want = torch.stack([torch.logsumexp(-s, 0) + s[g] for s, g in zip(oracle, gold)])
    got = objective(backend, task.train_examples)                     # rows of different choices: one batch
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # in another order and split in two: the same per-row losses
    order = [3, 0, 5, 2]
    torch.testing.assert_close(objective(backend, [task.train_examples[i] for i in order]), want[order],
                               atol=1e-5, rtol=0)
    # evaluation: accuracy by the lowest mean loss, loss of the gold candidate
    for batch_size in (1, 4, 32):
        result = task.evaluate(backend, batch_size)
        acc = sum(int(s.argmin()) == g for s, g in zip(oracle, gold)) / len(gold)
        assert result["dev_accuracy"] == pytest.approx(acc)
        assert result["dev_loss"] == pytest.approx(float(sum(s[g] for s, g in zip(oracle, gold)) / len(gold)),
                                                   abs=1e-5)
    assert 0 < acc < 1  # the oracle's own check: the rows are not all one way


def test_shared_choices_keep_the_verbalizer_path(mc_backend):
    """A batch sharing one set of choices still goes through choice_losses, unchanged."""
    cfg, backend, oracle = mc_backend
    task = Task(cfg.task, backend.tokenizer)
    shared = [task.train_examples[i] for i in (3, 4)]                 # [" great", " terrible"] both
    calls = []
    real = backend.choice_losses
    backend.choice_losses = lambda p, c: calls.append(len(p)) or real(p, c)
    try:
        got = objective(backend, shared)
    finally:
        del backend.choice_losses
    assert calls == [2]
    want = torch.stack([torch.logsumexp(-oracle[i], 0) + oracle[i][1] for i in (3, 4)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_multiple_choice_side_by_side_signs_route_rows(tmp_path, tiny_llama):
    """hf.pm_batch holds +eps and -eps adapters side by side, one per block of rows:
    the per-candidate passes keep every row on its own adapter (the plain sequence agrees)."""
    from mezo_backend_hf.backend import HFBackend
    pairs = []
    for pm in ("false", "true"):
        cfg = mc_config(tmp_path, tiny_llama, f"hf.pm_batch={pm}")
        backend = HFBackend(cfg)
        backend.perturb([(SEED, 0.5)])
        batch = Task(cfg.task, backend.tokenizer).train_examples
        pairs.append(backend.population_losses(batch, [11], 1e-2)[0][0])
        backend.close()
    (p0, m0), (p1, m1) = pairs
    assert (p0 - m0).abs().max() > 1e-4                                    # eps moves the losses
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=0)
    torch.testing.assert_close(m1, m0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row, needle", [
    ({"text": "x", "choices": [" a"], "label": 0}, "needs at least 2 candidates"),
    ({"text": "x", "choices": " a b", "label": 0}, "must be a list of candidate strings"),
    ({"text": "x", "choices": [" a", " a"], "label": 0}, "holds a candidate twice"),
    ({"text": "x", "choices": [" a", ""], "label": 0}, r"field 'choices\[1\]' is empty"),
    ({"text": "x", "choices": [" a", " b"], "label": 2}, r"label 2 out of range 0\.\.1"),
    ({"text": "x", "choices": [" a", " b"], "label": " c"}, "is not one of the row's choices"),
    ({"text": "x", "choices": [" a", " b"], "label": True}, "neither a candidate index"),
    ({"text": "x", "label": 0}, "missing field 'choices'"),
])
def test_multiple_choice_bad_rows_name_file_and_line(tmp_path, row, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(MC_ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(MezoError, match=r"bad\.jsonl, line 2: .*" + needle):
        read_records(data, "multiple_choice")


def test_candidates_that_tokenize_alike_are_refused(tmp_path):
    data = tmp_path / "same.jsonl"
    data.write_text(json.dumps(MC_ROWS[0]) + "\n" + json.dumps({"text": "x", "choices": [" a", "a "],
                                                                 "label": 0}) + "\n")

    class Squash(CharTokenizer):   # spaces vanish: " a" and "a " are the same tokens
        def __call__(self, text, add_special_tokens=True):
            return super().__call__(text.replace(" ", ""), add_special_tokens)
    cfg = load_config(None, [f"task.train={data}", f"task.dev={data}", "task.kind=multiple_choice",
                             "task.template={text}"])
    with pytest.raises(MezoError, match=r"same\.jsonl, line 2: choices: words ' a' and 'a ' tokenize to the same"):
        Task(cfg.task, Squash())


# -- task.hf_dataset ----------------------------------------------------------------------
class FakeSplit(list):
    """What datasets.load_dataset returns for a split: rows as dicts, column names."""
    @property
    def column_names(self):
        return list(self[0]) if self else []


def fake_datasets(monkeypatch, splits=None, error=None):
    """A stand-in ``datasets`` module whose load_dataset serves ``splits`` (or raises ``error``)."""
    import sys
    import types
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if error is not None:
            raise error
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {sorted(splits)}.')
        return FakeSplit(splits[split])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_dataset_rows_become_examples(monkeypatch):
    # GLUE's field names: "sentence" (found without text_field), "label" as ClassLabel ints
    rng = random.Random(SEED)
    train = [{"idx": i, "sentence": f"train {i}", "label": rng.randint(0, 1)} for i in range(40)]
    dev = [{"idx": i, "sentence": f"dev {i}", "label": i % 2} for i in range(6)]
    calls = fake_datasets(monkeypatch, {"train": train, "validation": dev})
    cfg = load_config(None, ["task.hf_dataset=glue:sst2", "task.k_per_class=4",
                             "task.verbalizer=[' bad', ' good']", "task.n_val=3"])
    task = Task(cfg.task, CharTokenizer())
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert [(r.text, r.label) for r in task.dev] == [(d["sentence"], d["label"]) for d in dev]
    by_text = {t["sentence"]: t["label"] for t in train}
    assert sorted(r.label for r in task.train) == [0] * 4 + [1] * 4            # k per class, sampled
    assert all(by_text[r.text] == r.label for r in task.train + task.val)
    assert len(task.val) == 3 and not {r.text for r in task.val} & {r.text for r in task.train}
    ex = task.train_examples[0]
    assert ex.prompt_ids == tuple(CharTokenizer()(task.train[0].text + " It was")["input_ids"])


def test_hf_dataset_mapping_with_its_own_fields(monkeypatch):
    rows = {"train": [{"premise": f"p{i}", "options": [" a", " b"], "answer": i % 2} for i in range(4)],
            "test": [{"premise": "q", "options": [" c", " d", " e"], "answer": " e"}]}
    calls = fake_datasets(monkeypatch, rows)
    cfg = load_config(None, ["task.kind=multiple_choice", "task.template={text}", "task.k_per_class=null",
                             "task.hf_dataset={path: me/copa-like, split_dev: test, text_field: premise, "
                             "choices_field: options, label_field: answer}"])
    task = Task(cfg.task, CharTokenizer())
    assert calls == [("me/copa-like", None, "train"), ("me/copa-like", None, "test")]
    assert [(r.text, r.choices, r.label) for r in task.dev] == [("q", (" c", " d", " e"), 2)]
    assert sorted(r.text for r in task.train) == ["p0", "p1", "p2", "p3"]
    # candidates one column each (super_glue/copa's shape)
    copa = {s: [{"premise": f"{s} {i}", "choice1": " x", "choice2": f" y{i}", "label": i % 2} for i in range(3)]
            for s in ("train", "validation")}
    fake_datasets(monkeypatch, copa)
    cfg = load_config(None, ["task.kind=multiple_choice", "task.template={text}", "task.k_per_class=null",
                             "mezo.batch_size=1", "task.hf_dataset={path: super_glue, name: copa, "
                             "text_field: premise, choices_field: [choice1, choice2]}"])
    task = Task(cfg.task, CharTokenizer())
    assert [(r.text, r.choices, r.label) for r in task.dev] == [
        (f"validation {i}", (" x", f" y{i}"), i % 2) for i in range(3)]


def test_hf_dataset_validation_split_or_file(monkeypatch, tmp_path):
    rows = {s: [{"text": f"{s} {i}", "label": i % 2} for i in range(4)] for s in ("train", "validation", "held")}
    calls = fake_datasets(monkeypatch, rows)
    base = ["task.hf_dataset={path: d, split_val: held}", "task.k_per_class=null", "mezo.batch_size=1"]
    task = Task(load_config(None, base).task, CharTokenizer())
    assert ("d", None, "held") in calls and [r.text for r in task.val] == [f"held {i}" for i in range(4)]
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "from the file", "label": 1}) + "\n")
    calls.clear()
    task = Task(load_config(None, base + [f"task.val={val}"]).task, CharTokenizer())   # the file wins
    assert [r.text for r in task.val] == ["from the file"] and [c[2] for c in calls] == ["train", "validation"]


def test_hf_dataset_bad_row_and_bad_spec_are_named(monkeypatch):
    fake_datasets(monkeypatch, {"train": [{"text": "ok", "label": 0}, {"text": "bad", "label": 7}],
                                "validation": [{"text": "ok", "label": 0}]})
    cfg = load_config(None, ["task.hf_dataset=x", "task.k_per_class=null"])
    with pytest.raises(MezoError, match=r"task\.hf_dataset x \[train\], row 1: label 7 out of range"):
        Task(cfg.task, CharTokenizer())
    with pytest.raises(MezoError, match=r"'task\.hf_dataset\.splits': unknown key"):
        load_config(None, ["task.hf_dataset={path: x, splits: y}"])
    fake_datasets(monkeypatch, {"train": [{"text": "ok", "label": 0}]})      # no validation split
    cfg = load_config(None, ["task.hf_dataset=x:y", "task.k_per_class=null", "mezo.batch_size=1"])
    with pytest.raises(MezoError, match=r"task\.hf_dataset=x:y: cannot load split 'validation': ValueError: "
                                        r"Unknown split \"validation\".*task\.train=FILE"):
        Task(cfg.task, CharTokenizer())


@pytest.mark.parametrize("case", ["offline", "no datasets"])
def test_hf_dataset_offline_or_missing_is_one_line(monkeypatch, tmp_path, tiny_llama, capsys, case):
    import sys
    from mezo_core.cli import main
    from tiny import write_run_config
    if case == "offline":   # what datasets raises with the hub unreachable (and HF_DATASETS_OFFLINE=1)
        fake_datasets(monkeypatch, error=ConnectionError(
            "Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore detail"))
        needle = ("task.hf_dataset=glue:sst2: cannot load split 'train': ConnectionError: Couldn't reach 'glue' "
                  "on the Hub (LocalEntryNotFoundError) (the Hugging Face hub is unreachable from here?); "
                  "or give the data as files: task.train=FILE task.dev=FILE (JSONL or TSV)")
    else:
        monkeypatch.setitem(sys.modules, "datasets", None)               # import fails
        needle = ("task.hf_dataset=glue:sst2: the 'datasets' library is not installed (pip install datasets), "
                  "or give the data as files: task.train=FILE task.dev=FILE (JSONL or TSV)")
    cfg = write_run_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "task.hf_dataset=glue:sst2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("mezo-run: error: ") == 1
    line = err[err.index("mezo-run: error: "):].strip()
    assert line == "mezo-run: error: " + needle


def test_mezo_run_trains_and_evaluates_a_multiple_choice_task(tmp_path, tiny_llama):
    """End to end through the CLI: the zero-shot evaluation is the oracle's (the initial
    adapter changes nothing: LoRA B starts at zero)."""
    from mezo_core.cli import main
    from tiny import write_run_config
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    cfg = write_run_config(tmp_path, tiny_llama, {"task.kind": "multiple_choice", "task.train": str(data),
                                                  "task.dev": str(data), "task.template": "{text}",
                                                  "task.k_per_class": None, "mezo.steps": 4,
                                                  "mezo.batch_size": 6, "hf": {"trunk_cache": False}})
    assert main(["train", "-c", str(cfg)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    oracle = oracle_candidate_scores(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(),
                                     AutoTokenizer.from_pretrained(tiny_llama))
    gold = [0, 0, 2, 1, 1, 1]
    zero = json.loads((tmp_path / "run" / "summary.json").read_text())["zero_shot"]
    assert zero["dev_accuracy"] == pytest.approx(sum(int(s.argmin()) == g for s, g in zip(oracle, gold)) / 6)
    assert zero["dev_loss"] == pytest.approx(float(sum(s[g] for s, g in zip(oracle, gold)) / 6), abs=1e-5)
    evals = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["label"] for e in evals] == ["zero-shot", "final"] and "accuracy" in evals[-1]


# --- validation rows and the training rows that overlap them (task.val_overlap_words) ---

def contains(outer, inner, min_words):
    """The oracle: ``inner`` (>= min_words words) is a run of whole words of ``outer``."""
    a, b = inner.split(), outer.split()
    return len(a) >= min_words and any(b[i:i + len(a)] == a for i in range(len(b) - len(a) + 1))


def test_overlap_is_a_run_of_whole_words_either_way():
    from mezo_core.data import Overlap
    overlaps = Overlap(["a b c d e f", "short one"], 4)
    assert overlaps("b c d e") and overlaps("a b c d e f") and overlaps("x a b c d e f y")
    assert overlaps(" b  c\td e ")                        # whitespace is not a word
    assert not overlaps("b c d")                          # 3 words: shared vocabulary, not a copy
    assert not overlaps("c d e f g") and not overlaps("b c d ee")
    assert not overlaps("x short one y")                  # "short one" has fewer than 4 words
    assert Overlap(["a b c d e f"], 2)("b c") and not Overlap(["a b c d e f"], 2)("short b c")


def test_train_rows_overlapping_the_validation_file_are_left_out(tmp_path, capsys):
    """The SST-2 case: the train file holds the phrases of the validation sentences."""
    print("seed", SEED)
    rng = random.Random(SEED)
    vocab = [f"w{i}" for i in range(40)]
    val_rows = [(" ".join(rng.choice(vocab) for _ in range(14)), i % 2) for i in range(6)]
    train_rows = []
    for text, label in val_rows:                          # its pieces of 1..8 words, and the sentence
        words = text.split()
        for n in (1, 2, 3, 4, 6, 8):
            i = rng.randrange(len(words) - n + 1)
            train_rows.append((" ".join(words[i:i + n]), label))
        train_rows.append(("x y " + text + " z", label))
    train_rows += [(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))), rng.randint(0, 1))
                   for _ in range(60)]
    train = write_tsv(tmp_path / "train.tsv", train_rows)
    val = write_tsv(tmp_path / "val.tsv", val_rows)
    base = [f"task.train={train}", f"task.val={val}", f"task.dev={val}", "task.k_per_class=null",
            "mezo.batch_size=1"]
    task = Task(load_config(None, base).task, CharTokenizer())
    expected = [t for t, _ in train_rows
                if not any(contains(v, t, 4) or contains(t, v, 4) for v, _ in val_rows)]
    assert sorted(r.text for r in task.train) == sorted(expected)
    assert task.overlap_dropped == len(train_rows) - len(expected) >= 6 * 4
    assert f"left {task.overlap_dropped} rows of {train} out of training" in capsys.readouterr().err
    everything = Task(load_config(None, base + ["task.val_overlap_words=0"]).task, CharTokenizer())
    assert len(everything.train) == len(train_rows) and everything.overlap_dropped == 0


def test_validation_drawn_from_the_train_file_overlaps_no_training_row(tmp_path):
    print("seed", SEED)
    rng = random.Random(SEED)
    vocab = [f"w{i}" for i in range(50)]
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(4, 16))] for _ in range(30)]
    rows = []                                             # treebank-like: each sentence and its phrases
    for label, words in enumerate(sentences):
        for _ in range(10):
            n = rng.randint(1, len(words))
            i = rng.randrange(len(words) - n + 1)
            rows.append((" ".join(words[i:i + n]), label % 2))
    rows = list({text: (text, label) for text, label in rows}.values())
    path = write_tsv(tmp_path / "train.tsv", rows)
    base = [f"task.train={path}", f"task.dev={path}", "task.k_per_class=8", "task.n_val=40", "mezo.batch_size=1"]
    task = Task(load_config(None, base).task, CharTokenizer())
    assert len(task.val) == 40
    for v in task.val:
        assert not any(contains(v.text, t.text, 4) or contains(t.text, v.text, 4) for t in task.train)
    plain = Task(load_config(None, base + ["task.val_overlap_words=0"]).task, CharTokenizer())
    assert any(contains(v.text, t.text, 4) or contains(t.text, v.text, 4)    # the check had work to do
               for v in plain.val for t in plain.train)
    with pytest.raises(MezoError, match=r"task\.n_val.*beyond the training sample and the rows overlapping "
                                        r"it \(task\.val_overlap_words=2\)"):
        Task(load_config(None, base + ["task.val_overlap_words=2", f"task.n_val={len(rows) - 20}"]).task, CharTokenizer())


def test_a_run_reports_the_train_rows_it_left_out(tmp_path, tiny_llama):
    from mezo_core.cli import main
    from mezo_core.testing import write_run_config
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 2, "eval_every": 2, "checkpoint_every": 0})
    train_texts = [json.loads(line)["text"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "truly great fun the film indeed", "label": 1}) + "\n")
    want = sum(contains("truly great fun the film indeed", t, 4) for t in train_texts)
    assert want == 1                                       # the oracle found the one row inside it
    assert main(["train", "-c", str(cfg), f"task.val={val}"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_rows_overlapping_val"] == want
