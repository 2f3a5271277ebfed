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


def test_unknown_key_in_file_names_file_line_and_key(tmp_path):
    f = write(tmp_path / "bad.yaml", """\
        seed: 0
        mezo:
          steps: 5
          stepz: 3
        """)
    with pytest.raises(MezoError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg and "line 4" in msg and "mezo.stepz" in msg
    assert "\n" not in msg


def test_unknown_top_level_key(tmp_path):
    f = write(tmp_path / "bad.yaml", "seed: 0\nbackned: hf\n")
    with pytest.raises(MezoError, match=r"bad\.yaml, line 2: field 'backned'"):
        load_config(f)


def test_unknown_key_in_the_wrong_section_names_its_own_line(tmp_path):
    f = write(tmp_path / "bad.yaml", """\
        mezo:
          steps: 5
        model:
          steps: 3
        """)
    with pytest.raises(MezoError, match=r"line 4: field 'model\.steps'"):
        load_config(f)


def test_bad_value_type_in_file(tmp_path):
    f = write(tmp_path / "bad.yaml", """\
        mezo:
          steps: lots
        """)
    with pytest.raises(MezoError, match=r"bad\.yaml, line 2: field 'mezo\.steps'.*'lots'"):
        load_config(f)


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(MezoError, match="invalid YAML"):
        load_config(write(tmp_path / "a.yaml", "a: [\n"))
    with pytest.raises(MezoError, match="top level must be a mapping"):
        load_config(write(tmp_path / "b.yaml", "- 1\n- 2\n"))


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
def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
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


def test_glue_tsv_errors(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("sentence\tlabel\nok\t1\nbroken line\n")
    with pytest.raises(MezoError, match=r"t\.tsv, line 3: expected 2 tab-separated fields, got 1"):
        read_records(f, "classification", 2)
    f.write_text("text\tlabel\nok\t1\n")
    with pytest.raises(MezoError, match=r"t\.tsv, line 1: expected a header"):
        read_records(f, "classification", 2)
    f.write_text("sentence\tlabel\nok\t2\n")
    with pytest.raises(MezoError, match=r"t\.tsv, line 2: label 2 out of range 0\.\.1"):
        read_records(f, "classification", 2)
    f.write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(MezoError, match="TSV files hold classification data"):
        read_records(f, "completion")


def test_jsonl_classification_and_completion(tmp_path):
    f = jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": 1}, "", {"text": "bad", "label": 0, "extra": 1}])
    assert read_records(f, "classification", 2) == [Record("good", 1), Record("bad", 0)]
    g = jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "a", "completion": "b"}])
    assert read_records(g, "completion") == [Record("2+2=", completion=" 4"), Record("a", completion="b")]
    # three labels
    h = jsonl(tmp_path / "h.jsonl", [{"text": "x", "label": 2}])
    assert read_records(h, "classification", 3) == [Record("x", 2)]


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}, "", '{"text": "b", "label": 1',
                                       {"text": "c", "label": 0}])
    with pytest.raises(MezoError, match=r"bad\.jsonl, line 3: malformed JSON") as err:
        read_records(f, "classification", 2)
    assert "\n" not in str(err.value)
    jsonl(f, ["[1, 2]"])
    with pytest.raises(MezoError, match=r"line 1: expected a JSON object"):
        read_records(f, "classification", 2)


def test_missing_field(tmp_path):
    f = jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    with pytest.raises(MezoError, match=r"m\.jsonl, line 2: missing field 'label'"):
        read_records(f, "classification", 2)
    g = jsonl(tmp_path / "g.jsonl", [{"prompt": "a"}])
    with pytest.raises(MezoError, match=r"g\.jsonl, line 1: missing field 'completion'"):
        read_records(g, "completion")


def test_label_out_of_range_or_not_an_integer(tmp_path):
    f = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(MezoError, match=r"l\.jsonl, line 2: label 2 out of range 0\.\.1"):
        read_records(f, "classification", 2)
    jsonl(f, [{"text": "a", "label": -1}])
    with pytest.raises(MezoError, match=r"line 1: label -1 out of range"):
        read_records(f, "classification", 2)
    jsonl(f, [{"text": "a", "label": "pos"}])
    with pytest.raises(MezoError, match=r"line 1: label 'pos' is not an integer"):
        read_records(f, "classification", 2)


def test_missing_or_empty_data_file(tmp_path):
    with pytest.raises(MezoError, match=r"task\.dev: data file not found: .*nothere\.jsonl"):
        read_records(tmp_path / "nothere.jsonl", "classification", 2, field="task.dev")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(MezoError, match="holds no examples"):
        read_records(empty, "classification", 2)


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
