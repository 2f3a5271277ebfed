"""Your own task (#15 item 3): quoted TSV fields, label names, n_dev as a seeded
sample. Oracles: Python's csv module writes the files; the expected labels and
samples are worked out here, not by the reader."""
from __future__ import annotations

import csv
import json
import random

import pytest

from mezo_core.config import load_config
from mezo_core.data import Task, read_records
from mezo_core.errors import MezoError

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


def test_broken_quoting_names_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text('sentence\tlabel\n"fine"\t1\n"a\ttab" and more\t0\n')
    with pytest.raises(MezoError, match=r"bad\.tsv, line 3: .*quot"):
        read_records(path, "classification", 2)


def test_field_count_error_names_the_line_after_a_multiline_field(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text('sentence\tlabel\n"one\ntwo\nthree"\t1\nno label here\n')
    with pytest.raises(MezoError, match=r"m\.tsv, line 5: expected 2 tab-separated fields, got 1"):
        read_records(path, "classification", 2)


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
