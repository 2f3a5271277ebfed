"""Config loading (YAML + overrides + validation) and the data layer (readers,
MeZO-paper sampling, batches as a pure function of (seed, step), evaluation)."""
from __future__ import annotations

import json
import textwrap
from collections import Counter

import pytest
import torch

from mezo_core import Backend, MezoError
from mezo_core.config import load_config
from mezo_core.data import Record, Task, read_records, sample


# -- config --------------------------------------------------------------------------
def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_file_and_overrides_merge(tmp_path):
    cfg_file = write(tmp_path / "c.yaml", """\
        seed: 3
        mezo:
          steps: 7
          lr: 1.0e-5
        """)
    cfg = load_config(cfg_file, ["mezo.steps=9", "lora.target_modules=[q_proj,k_proj]", "assets=/a"])
    assert cfg.seed == 3 and cfg.mezo.steps == 9 and cfg.mezo.lr == 1e-5
    assert list(cfg.lora.target_modules) == ["q_proj", "k_proj"]
    assert cfg.task.train == "/a/data/sst2/train.tsv"       # interpolation resolved
    assert cfg.mezo.batch_size == 16                         # schema default


def test_shipped_config_loads():
    cfg = load_config("conf/sst2.yaml", ["assets=/x"])
    assert cfg.backend == "hf" and cfg.task.kind == "classification"
    assert cfg.model.path.startswith("/x/models/")


CONFIG_FILE_ERRORS = {   # case: (the YAML, what the one-line error says)
    "unknown key in a section": ("seed: 0\nmezo:\n  steps: 5\n  stepz: 3\n", r"bad\.yaml, line 4: field 'mezo\.stepz'"),
    "unknown top-level key": ("seed: 0\nbackned: hf\n", r"bad\.yaml, line 2: field 'backned'"),
    # a key known in another section is named at its own line
    "key in the wrong section": ("mezo:\n  steps: 5\nmodel:\n  steps: 3\n", r"bad\.yaml, line 4: field 'model\.steps'"),
    "value of the wrong type": ("mezo:\n  steps: lots\n", r"bad\.yaml, line 2: field 'mezo\.steps'.*'lots'"),
    "invalid YAML": ("a: [\n", r"bad\.yaml.*invalid YAML"),
    "a list at the top": ("- 1\n- 2\n", r"bad\.yaml.*top level must be a mapping"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILE_ERRORS))
def test_bad_config_file_is_one_line_naming_file_and_line(case, tmp_path):
    text, match = CONFIG_FILE_ERRORS[case]
    with pytest.raises(MezoError, match=match) as err:
        load_config(write(tmp_path / "bad.yaml", text))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, match", [
    ("mezo.steps=abc", r"override 'mezo\.steps=abc': field 'mezo\.steps'"),
    ("nokey=1", r"override 'nokey=1': field 'nokey'"),
    ("mezo.nokey=1", r"field 'mezo\.nokey'"),
    ("mezo", r"override 'mezo': expected key=value"),
    ("seed=1.5", r"field 'seed'"),
])
def test_bad_override(override, match):
    with pytest.raises(MezoError, match=match):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(MezoError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"),
    ("lora.target_modules=[]", "lora.target_modules"),
    ("mezo.q=0", "mezo.q"),
    ("mezo.eps=0", "mezo.eps"),
    ("mezo.lr=-1", "mezo.lr"),
    ("mezo.steps=-1", "mezo.steps"),
    ("mezo.batch_size=0", "mezo.batch_size"),
    ("task.kind=regression", "task.kind"),
    ("task.template=no-placeholder", "task.template"),
    ("task.verbalizer=[only]", "task.verbalizer"),
    ("task.train_loss=hinge", "task.train_loss"),
    ("eval_batch_size=0", "eval_batch_size"),
    ("checkpoint_every=-1", "checkpoint_every"),
])
def test_value_checks(override, key):
    with pytest.raises(MezoError, match=rf"config field '{key}'"):
        load_config(None, [override])


# -- readers -------------------------------------------------------------------------
def _jsonl_text(*rows):
    """JSON lines: a dict as its JSON, a string as written."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def jsonl(path, rows):
    path.write_text(_jsonl_text(*rows))
    return path


def test_glue_tsv(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\nit \'s "great" \t1\nawful .\t0\n')
    recs = read_records(f, "classification", 2)
    assert recs == [Record('it \'s "great" ', 1), Record("awful .", 0)]


def test_glue_tsv_columns_in_any_order(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text("idx\tlabel\tsentence\n0\t1\tnice\n")
    assert read_records(f, "classification", 2) == [Record("nice", 1)]


def test_jsonl_classification_and_completion(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": 1}, "", {"text": "bad", "label": 0, "extra": 1}])
    assert read_records(f, "classification", 2) == [Record("good", 1), Record("bad", 0)]
    g = jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "a", "completion": "b"}])
    assert read_records(g, "completion") == [Record("2+2=", completion=" 4"), Record("a", completion="b")]
    # three labels
    h = jsonl(tmp_path / "h.jsonl", [{"text": "x", "label": 2}])
    assert read_records(h, "classification", 3) == [Record("x", 2)]


A0 = {"text": "a", "label": 0}
READER_ERRORS = {   # case: (file name, its text, kind, what the one-line error says)
    "TSV row short of a field": ("t.tsv", "sentence\tlabel\nok\t1\nbroken line\n", "classification",
                                 r"t\.tsv, line 3: expected 2 tab-separated fields, got 1"),
    "TSV without the header": ("t.tsv", "text\tlabel\nok\t1\n", "classification", r"t\.tsv, line 1: expected a header"),
    "TSV label out of range": ("t.tsv", "sentence\tlabel\nok\t2\n", "classification",
                               r"t\.tsv, line 2: label 2 out of range 0\.\.1"),
    "TSV for a completion task": ("t.tsv", "sentence\tlabel\nok\t1\n", "completion", "TSV files hold classification data"),
    "TSV broken quoting": ("bad.tsv", 'sentence\tlabel\n"fine"\t1\n"a\ttab" and more\t0\n', "classification",
                           r"bad\.tsv, line 3: .*quot"),
    # the line counts the file's lines, not the records: a quoted field spans three
    "TSV field count after a multi-line field": ("m.tsv", 'sentence\tlabel\n"one\ntwo\nthree"\t1\nno label here\n',
                                                 "classification",
                                                 r"m\.tsv, line 5: expected 2 tab-separated fields, got 1"),
    "JSONL malformed line": ("bad.jsonl", _jsonl_text(A0, "", '{"text": "b", "label": 1', A0), "classification",
                             r"bad\.jsonl, line 3: malformed JSON"),
    "JSONL not an object": ("bad.jsonl", _jsonl_text("[1, 2]"), "classification", r"line 1: expected a JSON object"),
    "JSONL missing label": ("m.jsonl", _jsonl_text(A0, {"text": "b"}), "classification",
                            r"m\.jsonl, line 2: missing field 'label'"),
    "JSONL missing completion": ("g.jsonl", _jsonl_text({"prompt": "a"}), "completion",
                                 r"g\.jsonl, line 1: missing field 'completion'"),
    "JSONL label 2": ("l.jsonl", _jsonl_text(A0, {"text": "b", "label": 2}), "classification",
                      r"l\.jsonl, line 2: label 2 out of range 0\.\.1"),
    "JSONL label -1": ("l.jsonl", _jsonl_text({"text": "a", "label": -1}), "classification",
                       r"line 1: label -1 out of range"),
    "JSONL label a word": ("l.jsonl", _jsonl_text({"text": "a", "label": "pos"}), "classification",
                           r"line 1: label 'pos' is not an integer"),
    "JSONL of blank lines": ("empty.jsonl", "\n\n", "classification", "holds no examples"),
}


@pytest.mark.parametrize("case", list(READER_ERRORS))
def test_bad_data_file_is_one_line_naming_file_and_line(case, tmp_path):
    name, text, kind, match = READER_ERRORS[case]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MezoError, match=match) as err:
        read_records(path, kind, 2)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(MezoError, match=r"task\.dev: data file not found: .*nothere\.jsonl"):
        read_records(tmp_path / "nothere.jsonl", "classification", 2, field="task.dev")


# -- sampling ----------------------------------------------------------------------
RECORDS = [Record(f"t{i}", i % 3) for i in range(60)]


def test_k_per_class_is_balanced_and_seeded():
    a = sample(RECORDS, 4, None, seed=42)
    assert len(a) == 12 and Counter(r.label for r in a) == {0: 4, 1: 4, 2: 4}
    assert len(set(a)) == 12
    assert sample(RECORDS, 4, None, seed=42) == a
    assert sample(RECORDS, 4, None, seed=43) != a
    assert [r.label for r in a] != sorted(r.label for r in a)   # shuffled across classes
    with pytest.raises(MezoError, match="label 0 has only 20 examples"):
        sample(RECORDS, 21, None, seed=0)


def test_n_sampling_and_keep_all():
    a = sample(RECORDS, None, 10, seed=1)
    assert len(a) == len(set(a)) == 10 and a == sample(RECORDS, None, 10, seed=1)
    assert len(sample(RECORDS, None, 1000, seed=1)) == 60
    assert sample(RECORDS, None, None, seed=1) == RECORDS


# -- Task ---------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (ids 10..), <s> = 1 when special tokens are asked for."""

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + (ord(c) % 200) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def make_task(tmp_path, n_train=12, n_dev=6, overrides=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"example {i:02d}", "label": i % 2} for i in range(n_train)])
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": f"dev {i}", "label": int(i < 2)} for i in range(n_dev)])
    cfg = load_config(None, [f"task.train={train}", f"task.dev={dev}", "task.k_per_class=null",
                             "task.verbalizer=[' no',' yes']", *overrides])
    return Task(cfg.task, CharTokenizer())


def test_task_examples(tmp_path):
    task = make_task(tmp_path)
    tok = CharTokenizer()
    assert task.choices == [tuple(tok(" no", False)["input_ids"]), tuple(tok(" yes", False)["input_ids"])]
    rec = task.train[0]
    ex = task.example(rec)
    assert ex.prompt_ids == tuple(tok(f"{rec.text} It was")["input_ids"])
    assert ex.target_ids == task.choices[rec.label] and ex.choices == tuple(task.choices)
    t2 = make_task(tmp_path / "b", overrides=["task.train_loss=target"])
    assert t2.train_examples[0].choices is None


def test_completion_task(tmp_path):
    train = jsonl(tmp_path / "tr.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    cfg = load_config(None, [f"task.train={train}", f"task.dev={train}", "task.kind=completion"])
    task = Task(cfg.task, CharTokenizer())
    ex = task.train_examples[0]
    assert ex.prompt_ids == (1, *CharTokenizer()("1+1=", False)["input_ids"])
    assert ex.target_ids == tuple(CharTokenizer()("2", False)["input_ids"]) and ex.choices is None


def test_task_k_per_class_and_n_dev(tmp_path):
    task = make_task(tmp_path, overrides=["task.k_per_class=3", "task.n_dev=4"])
    assert Counter(r.label for r in task.train) == {0: 3, 1: 3}
    every = make_task(tmp_path / "all").dev
    order = [r.text for r in every]
    picked = [r.text for r in task.dev]          # a seeded sample of 4, kept in file order
    assert len(picked) == 4 and set(picked) <= set(order)
    assert [order.index(t) for t in picked] == sorted(order.index(t) for t in picked)
    assert picked == [r.text for r in make_task(tmp_path / "again", overrides=["task.n_dev=4"]).dev]


def test_train_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    a, b = make_task(tmp_path / "a"), make_task(tmp_path / "b")
    steps = [0, 5, 2, 9, 2, 0, 7]
    first = {s: a.train_batch(3, s, 4) for s in range(10)}
    for s in steps:                       # another Task, another order of calls
        assert b.train_batch(3, s, 4) == first[s]
    assert a.train_batch(4, 0, 4) != first[0]     # the run seed matters


def test_train_batch_covers_each_epoch_without_repeats(tmp_path):
    task = make_task(tmp_path)            # 12 examples, batch 4: 3 steps an epoch
    index = {id(e): i for i, e in enumerate(task.train_examples)}
    epochs = []
    for epoch in range(3):
        seen = [index[id(e)] for s in range(3 * epoch, 3 * epoch + 3) for e in task.train_batch(0, s, 4)]
        assert sorted(seen) == list(range(12))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]   # reshuffled per epoch
    # a batch that straddles two epochs (batch 5 over 12 examples)
    seen = [index[id(e)] for s in range(12) for e in task.train_batch(0, s, 5)]   # 60 = 5 epochs
    for k in range(5):
        assert sorted(seen[12 * k:12 * k + 12]) == list(range(12))


class PreferYes(Backend):
    """Scores choice 1 lower (better) than choice 0 for every prompt."""
    name = "prefer-yes"

    def trainable_names(self):
        return []

    def perturb(self, terms, decay=1.0):
        pass

    def losses(self, batch):
        raise AssertionError("classification eval goes through choice_losses")

    def choice_losses(self, prompts, choices):
        return torch.tensor([[2.0, 0.5]] * len(prompts), dtype=torch.float64)

    def save_adapter(self, path):
        pass

    def load_adapter(self, path):
        pass


def test_evaluate_classification(tmp_path):
    task = make_task(tmp_path, n_dev=6)   # dev labels: 1, 1, 0, 0, 0, 0
    out = task.evaluate(PreferYes(), batch_size=4)
    assert out["dev_accuracy"] == pytest.approx(2 / 6)
    assert out["dev_loss"] == pytest.approx((2 * 0.5 + 4 * 2.0) / 6)
    assert out["dev_examples"] == 6
    assert out["dev_outcomes"] == "110000"        # each example right or not, in file order


def test_empty_prompt_is_a_clear_error(tmp_path, tiny_llama):
    from transformers import AutoTokenizer
    from mezo_core.data import Task
    from mezo_core import Example
    with pytest.raises(ValueError):
        Example((), (5,))
    data = tmp_path / "c.jsonl"
    data.write_text('{"prompt": "the movie", "completion": " was good"}\n{"prompt": "", "completion": " bad"}\n')
    cfg = load_config(None, ["task.kind=completion", f"task.train={data}", f"task.dev={data}"])
    with pytest.raises(MezoError, match="non-empty prompt"):
        Task(cfg.task, AutoTokenizer.from_pretrained(tiny_llama))


def test_validation_from_a_file_of_its_own(tmp_path):
    """task.val: the selection set comes from that file (all of it, or a seeded sample of
    n_val), not from the train file."""
    val = jsonl(tmp_path / "val.jsonl", [{"text": f"val {i}", "label": i % 2} for i in range(5)])
    task = make_task(tmp_path / "a", overrides=[f"task.val={val}"])
    assert [r.text for r in task.val] == [f"val {i}" for i in range(5)]
    some = make_task(tmp_path / "b", overrides=[f"task.val={val}", "task.n_val=2"]).val
    again = make_task(tmp_path / "c", overrides=[f"task.val={val}", "task.n_val=2"]).val
    assert len(some) == 2 and {r.text for r in some} <= {f"val {i}" for i in range(5)}
    assert [r.text for r in some] == [r.text for r in again]
