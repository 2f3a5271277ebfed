"""Tasks as in the MeZO paper: classification by prompt + verbalizer words
(SST-2: ``<sentence> It was [terrible|great]``), multiple choice with candidates of
each example's own (COPA), and plain prompt/completion.

Files: TSV/CSV with a ``sentence``/``label`` header (standard
quoting when the file quotes its fields) or JSONL, one object a line:
``{"text": ..., "label": 0}``, ``{"text": ..., "choices": [...], "label": 1}`` or
``{"prompt": ..., "completion": ...}``. A label is the index of its verbalizer
word, or its name when ``task.verbalizer`` is a mapping ``{name: word}``; a
multiple-choice label is the index of its candidate or the candidate itself.
Or a Hugging Face dataset (``task.hf_dataset``) with the same fields.

Limits (each broken one is an error naming the file and line): a line holds at most
``MAX_LINE_CHARS`` characters (128 Ki: the csv module's own field limit, which TSV
files always had; about 30k tokens of English, far past the prompts MeZO tunes on,
and a row of megabytes would only fail later, out of memory, in the first forward);
a label written as text or as a JSON number has at most ``MAX_LABEL_CHARS``
characters (it is an index or a label name); texts are valid Unicode (a JSON
``\\ud800`` escape without its pair is a lone surrogate: no tokenizer takes it).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import random
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import MezoError
from .interfaces import Example
from .perturb import mix

MAX_LINE_CHARS = 131072   # characters in one line of a data file (see the module's docstring)
MAX_LABEL_CHARS = 100     # characters of a label: an index or a name


@dataclass(frozen=True)
class Record:
    """One raw example: ``text``/``label`` for classification, plus ``choices`` for
    multiple choice (``label`` indexes them), ``text``/``completion`` otherwise.
    ``where`` (file and line) names the example in errors found after reading."""
    text: str
    label: int | None = None
    completion: str | None = None
    choices: tuple[str, ...] | None = None
    where: str = field(default="", compare=False)


def label_names(verbalizer) -> list[str] | None:
    """The label names of a ``{name: word}`` verbalizer (None for a list of words)."""
    return [str(k) for k in verbalizer.keys()] if hasattr(verbalizer, "keys") else None


def verbalizer_words(verbalizer) -> list[str]:
    """The words, in label order, of a list or a ``{name: word}`` verbalizer."""
    return list(verbalizer.values()) if hasattr(verbalizer, "keys") else list(verbalizer)


def _show(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_label(value, labels, where):
    """A label name (when the verbalizer is a mapping), an int, or a string holding
    one (TSV labels are text); returns the label's index. Floats and booleans are
    refused: ``1.7`` or ``true`` read as 1 would train on a label nobody wrote.
    ``labels``: the number of labels, or the list of their names."""
    names = labels if isinstance(labels, list) else None
    num_labels = len(labels) if names else labels
    if names and isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MezoError(f"{where}: label {_show(value)} is not an integer")
    if isinstance(value, int) and value.bit_length() > 64 or isinstance(value, str) and len(value) > MAX_LABEL_CHARS:
        size = f"{len(value)} characters" if isinstance(value, str) else f"an integer of {value.bit_length()} bits"
        raise MezoError(f"{where}: label {_show(value, 40)} is {size}: not a label (an index, or a name; "
                        f"at most {MAX_LABEL_CHARS} characters)")
    try:
        label = int(value)
    except ValueError:
        hint = (f"not one of the label names {_show(names, 120)}" if names else
                "not an integer (for label names give task.verbalizer as a mapping {name: word})")
        raise MezoError(f"{where}: label {_show(value)} is {hint}") from None
    if not 0 <= label < num_labels:
        raise MezoError(f"{where}: label {label} out of range 0..{num_labels - 1} (task.verbalizer has {num_labels} words)")
    return label


def _check_text(value, name, where, empty_ok=False):
    """A string, never ``null`` (which str() would train as "None"); empty only where allowed."""
    if not isinstance(value, str):
        raise MezoError(f"{where}: field {name!r} must be a string (got {value!r:.40})")
    if not empty_ok and not value.strip():
        raise MezoError(f"{where}: field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:   # only lone surrogates fail: a JSON \\udXXX escape without its pair
        raise MezoError(f"{where}: field {name!r} holds a lone surrogate {value[exc.start]!r} at character "
                        f"{exc.start} (invalid Unicode: a \\ud800-\\udfff escape without its pair)") from None
    return value


def _read_text(path: Path, field: str) -> str:
    """The file as UTF-8 (a leading BOM dropped); a bad byte is named by its line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MezoError(f"{field}: cannot read {path}: {exc.strerror}") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = bom + exc.start
        line = data[:start].count(b"\n") + 1
        raise MezoError(f"{path}, line {line}: byte 0x{data[start]:02x} is not UTF-8 "
                        "(save the file as UTF-8)") from None


def _read_tsv(path: Path, text: str, labels) -> list[Record]:
    """A TSV with a header. Read as written (no quoting: GLUE's TSVs hold bare quote
    characters) unless the file quotes its fields -- a field wrapped in quotes, or a
    row that only splits right with quotes -- then with standard CSV quoting
    (``"a ""b""<TAB>c"``: tabs, newlines and doubled quotes inside a field)."""
    first = _looks_quoted(text)
    try:
        return _parse_tsv(path, text, labels, first)
    except _TableError as exc:  # the other reading, where it may apply; else the error of
        if '"' not in text:     # the reading that got further into the file
            raise
        try:
            return _parse_tsv(path, text, labels, not first)
        except _TableError as other:
            raise (other if other.line > exc.line else exc) from None


class _TableError(MezoError):
    def __init__(self, path, line, message):
        super().__init__(f"{path}, line {line}: {message}")
        self.line = line


def _looks_quoted(text: str) -> bool:
    """Whether some field is wrapped in double quotes (between tabs or line ends)."""
    return re.search(r'(^|\t)"[^\n]*"(\t|\r?$)', text, re.M) is not None


def _parse_tsv(path, text, labels, quoted) -> list[Record]:
    quoting = dict(quoting=csv.QUOTE_MINIMAL, doublequote=True) if quoted else dict(quoting=csv.QUOTE_NONE)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", strict=quoted, **quoting)
    records, line = [], 1
    try:
        header = next(reader, None)
        if not header or "sentence" not in header or "label" not in header:
            raise _TableError(path, 1, "expected a header with 'sentence' and 'label'")
        si, li = header.index("sentence"), header.index("label")
        line = reader.line_num + 1
        for row in reader:
            where = f"{path}, line {line}"
            if len(row) != len(header):
                hint = ("read with standard quoting: check the quotes of this row" if quoted else
                        "a sentence holding a tab or a newline must be quoted: \"...\", a quote inside doubled")
                raise _TableError(path, line, f"expected {len(header)} tab-separated fields, got {len(row)} ({hint})")
            try:
                records.append(Record(_check_text(row[si], "sentence", where), _check_label(row[li], labels, where),
                                      where=where))
            except MezoError as exc:
                raise _TableError(path, line, str(exc).removeprefix(f"{where}: ")) from None
            line = reader.line_num + 1
    except csv.Error as exc:
        raise _TableError(path, line, f"{exc} (read with standard quoting: a quoted field ends with "
                          "a quote before the next tab; a quote inside it is doubled)") from None
    return records


def _check_line_lengths(path: Path, text: str) -> None:
    """Every line within MAX_LINE_CHARS (checked before parsing: the first long line is named)."""
    if len(text) <= MAX_LINE_CHARS:
        return
    for n, line in enumerate(text.split("\n"), 1):
        if len(line) > MAX_LINE_CHARS:
            raise MezoError(f"{path}, line {n}: {len(line)} characters, more than the {MAX_LINE_CHARS} a line "
                            f"may hold (mezo_core.data.MAX_LINE_CHARS): a row is one example, not a document")


def _read_jsonl(path: Path, text: str, kind: str, labels) -> list[Record]:
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MezoError(f"{where}: malformed JSON: {exc.msg}") from None
        except RecursionError:
            raise MezoError(f"{where}: malformed JSON: nested too deeply") from None
        except ValueError:   # Python's limit on the digits of an int read from text
            raise MezoError(f"{where}: a number of more than {sys.get_int_max_str_digits()} digits "
                            "(a label is an index, or a name)") from None
        if not isinstance(obj, dict):
            raise MezoError(f"{where}: expected a JSON object")
        records.append(_record(obj, kind, labels, where))
    return records


FIELDS = {"classification": ("text", "label"), "multiple_choice": ("text", "choices", "label"),
          "completion": ("prompt", "completion")}


def _record(obj: dict, kind: str, labels, where: str, names: dict | None = None) -> Record:
    """One example from a JSON object (or a dataset row); ``names`` maps the
    standard field names to the row's own (task.hf_dataset's ``*_field``)."""
    names = names or {}
    need = FIELDS[kind]
    missing = [names.get(k, k) for k in need if names.get(k, k) not in obj]
    if missing:
        line = "line" if not names else "row"
        raise MezoError(f"{where}: missing field {missing[0]!r} (a {kind} {line} needs "
                        f"{tuple(names.get(k, k) for k in need)})")
    get = lambda k: obj[names.get(k, k)]  # noqa: E731
    if kind == "classification":
        return Record(_check_text(get("text"), names.get("text", "text"), where),
                      _check_label(get("label"), labels, where), where=where)
    if kind == "multiple_choice":
        choices = _check_choices(get("choices"), names.get("choices", "choices"), where)
        return Record(_check_text(get("text"), names.get("text", "text"), where),
                      _check_choice_label(get("label"), choices, where), choices=choices, where=where)
    # an empty prompt is fine where the tokenizer adds BOS (Task checks)
    return Record(_check_text(get("prompt"), names.get("prompt", "prompt"), where, empty_ok=True),
                  completion=_check_text(get("completion"), names.get("completion", "completion"), where),
                  where=where)


def _check_choices(value, name, where) -> tuple[str, ...]:
    """A row's candidates: a list of >= 2 distinct, non-empty strings."""
    if not isinstance(value, (list, tuple)) or isinstance(value, str):
        raise MezoError(f"{where}: field {name!r} must be a list of candidate strings (got {value!r:.60})")
    if len(value) < 2:
        raise MezoError(f"{where}: field {name!r} needs at least 2 candidates (got {len(value)})")
    for i, c in enumerate(value):
        _check_text(c, f"{name}[{i}]", where)
    if len(set(value)) != len(value):
        raise MezoError(f"{where}: field {name!r} holds a candidate twice")
    return tuple(value)


def _check_choice_label(value, choices, where) -> int:
    """The index of the gold candidate: an int index, or the candidate's text
    (exactly, else ignoring surrounding whitespace)."""
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        stripped = [i for i, c in enumerate(choices) if c.strip() == value.strip()]
        if len(stripped) == 1:
            return stripped[0]
        raise MezoError(f"{where}: label {value!r:.60} is not one of the row's choices {list(choices)!r:.120}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MezoError(f"{where}: label {value!r} is neither a candidate index nor a candidate")
    if not 0 <= value < len(choices):
        raise MezoError(f"{where}: label {value} out of range 0..{len(choices) - 1} (the row has "
                        f"{len(choices)} choices)")
    return value


def read_records(path: str | Path, kind: str, labels=2, field: str = "task.train") -> list[Record]:
    """The examples of a data file. ``labels``: the number of labels, or their names."""
    path = Path(path)
    if not path.exists():
        hint = ("\n  (SST-2 is GLUE's; with network: datasets.load_dataset('glue', 'sst2'), then write "
                "sentence<TAB>label TSV)") if "sst2" in str(path).lower() else ""
        raise MezoError(f"{field}: data file not found: {path}{hint}")
    if path.suffix not in (".tsv", ".jsonl", ".json"):
        raise MezoError(f"{field}: {path}: unknown data format {path.suffix or '(no suffix)'!r} "
                        "(supported: .tsv with a sentence/label header, .jsonl or .json with one object a line)")
    if path.suffix == ".tsv" and kind != "classification":
        raise MezoError(f"{field}: {path}: TSV files hold classification data (sentence, label); "
                        f"{kind} data is JSONL {FIELDS[kind]}")
    text = _read_text(path, field)
    _check_line_lengths(path, text)
    if path.suffix == ".tsv":
        records = _read_tsv(path, text, labels)
    else:
        records = _read_jsonl(path, text, kind, labels)
    if not records:
        raise MezoError(f"{field}: {path} holds no examples")
    return records


HF_DATASET_KEYS = {  # task.hf_dataset as a mapping: key -> default
    "path": None,              # the dataset: a hub id ("glue", "stanfordnlp/imdb") or a local folder/script
    "name": None,              # its configuration ("sst2"), if it has several
    "split_train": "train",    # the split task.train would hold
    "split_dev": "validation",  # the reported evaluation split
    "split_val": None,         # a validation split of its own (as task.val), if any
    "text_field": None,        # null: "text", else "sentence" (GLUE); completion tasks: "prompt"
    "label_field": "label",
    "choices_field": "choices",  # a column holding the candidates, or a list of columns, one each
    "completion_field": "completion",
}


def hf_dataset_spec(spec) -> dict:
    """``task.hf_dataset`` as a full mapping: a string ``PATH`` or ``PATH:NAME``
    (``glue:sst2``, ``stanfordnlp/imdb``), or a mapping of HF_DATASET_KEYS."""
    if isinstance(spec, str):
        path, _, name = spec.partition(":")
        spec = {"path": path, "name": name or None}
    elif hasattr(spec, "keys"):
        spec = {str(k): v for k, v in spec.items()}
        unknown = sorted(set(spec) - set(HF_DATASET_KEYS))
        if unknown:
            raise MezoError(f"config field 'task.hf_dataset.{unknown[0]}': unknown key "
                            f"(known: {', '.join(HF_DATASET_KEYS)})")
    else:
        raise MezoError(f"config field 'task.hf_dataset': expected 'PATH', 'PATH:NAME' or a mapping "
                        f"(got {spec!r:.60})")
    spec = {**HF_DATASET_KEYS, **spec}
    if not isinstance(spec["path"], str) or not spec["path"].strip():
        raise MezoError("config field 'task.hf_dataset.path': names no dataset "
                        "(e.g. task.hf_dataset=glue:sst2)")
    for key in ("split_train", "split_dev"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise MezoError(f"config field 'task.hf_dataset.{key}': must name a split (got {spec[key]!r})")
    return spec


def load_hf_split(spec, split_key: str, kind: str, labels) -> list[Record]:
    """The records of one split of ``task.hf_dataset`` through ``datasets.load_dataset``.
    Any failure -- ``datasets`` missing, the hub unreachable, no such dataset or
    split -- is one error line saying what failed and that files work too."""
    spec = hf_dataset_spec(spec)
    split = spec[split_key]
    ref = spec["path"] + (f":{spec['name']}" if spec["name"] else "")
    alternative = "or give the data as files: task.train=FILE task.dev=FILE (JSONL or TSV)"
    try:
        import datasets
    except ImportError:
        raise MezoError(f"task.hf_dataset={ref}: the 'datasets' library is not installed "
                        f"(pip install datasets), {alternative}") from None
    try:
        rows = datasets.load_dataset(spec["path"], spec["name"], split=split)
    except Exception as exc:  # noqa: BLE001 -- hub, network, missing split: all one message
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
        offline = any(w in str(exc).lower() for w in ("offline", "connect", "resolve", "network",
                                                     "unreachable", "timed out", "couldn't reach"))
        hint = " (the Hugging Face hub is unreachable from here?)" if offline or isinstance(
            exc, (ConnectionError, TimeoutError)) else ""
        raise MezoError(f"task.hf_dataset={ref}: cannot load split {split!r}: {reason[:200]}{hint}; "
                        f"{alternative}") from None
    names = {"label": spec["label_field"], "choices": spec["choices_field"],
             "completion": spec["completion_field"]}
    text_field = spec["text_field"]
    columns = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if kind == "completion":
        names["prompt"] = text_field or "prompt"
    else:
        names["text"] = text_field or ("sentence" if "text" not in columns and "sentence" in columns else "text")
    spread = spec["choices_field"] if not isinstance(spec["choices_field"], str) else None
    if spread is not None:   # one column per candidate (super_glue/copa: choice1, choice2)
        spread = [str(c) for c in spread]
        names["choices"] = "choices"
    records = []
    for i, row in enumerate(rows):
        where, row = f"task.hf_dataset {ref} [{split}], row {i}", dict(row)
        if spread is not None:
            missing = [c for c in spread if c not in row]
            if missing:
                raise MezoError(f"{where}: missing field {missing[0]!r} (task.hf_dataset.choices_field "
                                f"names {spread})")
            row["choices"] = [row[c] for c in spread]
        records.append(_record(row, kind, labels, where, names))
    if not records:
        raise MezoError(f"task.hf_dataset={ref}: split {split!r} holds no examples")
    return records


class Overlap:
    """Which texts overlap one of ``texts``: one is a run of at least ``min_words``
    words of the other (whitespace-separated words, compared exactly).

    Why: SST-2's train file holds every phrase of the treebank, so a validation
    sentence drawn from it (or a file made of such sentences) has its own phrases,
    labelled, among the training rows: 7470 of the 66349 rows overlap the 1000
    sentence-like rows of ``benchmarks.dev_like_val`` at 4 words. Trained on, they
    make validation gains that dev does not see, and best/ then moves to adapters
    that are worse on unseen data. Four words separate copied pieces from shared
    vocabulary: of the train rows found inside dev's 872 sentences (no sentence in
    common), 1729 have 1-3 words and 40 have 4 or more."""

    def __init__(self, texts: Sequence[str], min_words: int):
        self.min_words = min_words
        self.whole: set[str] = set()
        self.pieces: set[str] = set()
        for text in texts:
            words = text.split()
            if len(words) >= min_words:
                self.whole.add(" ".join(words))
                self.pieces.update(_runs(words, range(min_words, len(words) + 1)))
        self.lengths = sorted({len(t.split()) for t in self.whole})

    def __call__(self, text: str) -> bool:
        words = text.split()
        if len(words) < self.min_words:
            return False
        if " ".join(words) in self.pieces:   # text lies inside one of the texts
            return True
        return any(run in self.whole for run in _runs(words, [n for n in self.lengths if n <= len(words)]))


def _runs(words: list[str], lengths) -> Iterator[str]:
    for n in lengths:
        for i in range(len(words) - n + 1):
            yield " ".join(words[i:i + n])


def sample(records: Sequence[Record], k_per_class: int | None, n: int | None, seed: int) -> list[Record]:
    """MeZO-paper sampling: k per class (or n overall), fixed seed; None keeps all."""
    rng = random.Random(seed)
    if k_per_class:
        by_label: dict[int, list[Record]] = {}
        for r in records:
            by_label.setdefault(r.label, []).append(r)
        out = []
        for label in sorted(by_label):
            pool = by_label[label]
            if len(pool) < k_per_class:
                raise MezoError(f"task.k_per_class={k_per_class}: label {label} has only {len(pool)} examples")
            out += rng.sample(pool, k_per_class)
        rng.shuffle(out)
        return out
    if n:
        return rng.sample(list(records), min(n, len(records)))
    return list(records)


class Task:
    """Turns records into token-level Examples for a tokenizer."""

    def __init__(self, cfg, tokenizer, batch_size: int | None = None):
        """``batch_size`` (mezo.batch_size, when training) is checked against the
        sampled train set: a larger batch would repeat examples within a step."""
        self.cfg, self.tok = cfg, tokenizer
        self.kind = cfg.kind
        self.words = verbalizer_words(cfg.verbalizer)
        labels = label_names(cfg.verbalizer) or len(self.words)
        self.max_tokens = cfg.get("max_tokens")
        self._prompts: dict[int, tuple[int, ...]] = {}   # id(record) -> prompt ids (truncated)
        self._cut: set[int] = set()                       # id(record) of the examples truncated
        hf = cfg.get("hf_dataset")
        source = f"task.hf_dataset={hf_dataset_spec(hf)['path']}" if hf else cfg.train

        def load(split):  # "train", "dev" or "val": a file, or a split of task.hf_dataset
            if hf and not (split == "val" and cfg.get("val")):  # a task.val file wins over split_val
                return load_hf_split(hf, f"split_{split}", cfg.kind, labels)
            return read_records(cfg[split], cfg.kind, labels, f"task.{split}")

        train = load("train")
        overlap_words = cfg.get("val_overlap_words", 0)
        # selection data that is not the reported dev set: a file of its own (task.val) ...
        self.val = []
        if cfg.get("val") or (hf and hf_dataset_spec(hf)["split_val"]):
            pool = load("val")
            self.val = pool if not cfg.n_val or cfg.n_val >= len(pool) else \
                random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
        self.overlap_dropped = 0     # train rows left out for overlapping the validation rows
        if self.val and overlap_words:
            overlaps = Overlap([r.text for r in self.val], overlap_words)
            kept = [r for r in train if not overlaps(r.text)]
            self.overlap_dropped, train = len(train) - len(kept), kept
            if self.overlap_dropped:
                print(f"mezo-run: left {self.overlap_dropped} rows of {source} out of training: each is part of "
                      f"a validation row or holds one (task.val_overlap_words={overlap_words})", file=sys.stderr)
        self.train = sample(train, cfg.k_per_class if cfg.kind == "classification" else None,
                            cfg.n_train, cfg.sample_seed)
        if batch_size is not None and batch_size > len(self.train):
            raise MezoError(f"config field 'mezo.batch_size': {batch_size} is larger than the "
                            f"training set ({len(self.train)} examples sampled from {source})")
        dev = load("dev")
        # a seeded random sample, in file order (not the first n rows: a file sorted by
        # label would give one class)
        if cfg.n_dev and cfg.n_dev < len(dev):
            keep = sorted(random.Random(mix(cfg.sample_seed, 0xDE7)).sample(range(len(dev)), cfg.n_dev))
            dev = [dev[i] for i in keep]
        self.dev = dev
        # ... else examples held out from the train file, none overlapping the training sample
        if not self.val and cfg.n_val:
            chosen = {id(r) for r in self.train}
            pool = [r for r in train if id(r) not in chosen]
            if overlap_words:
                overlaps = Overlap([r.text for r in self.train], overlap_words)
                pool = [r for r in pool if not overlaps(r.text)]
            if len(pool) < cfg.n_val:
                raise MezoError(f"config field 'task.n_val': {cfg.n_val} validation examples asked, but "
                                f"{source} has only {len(pool)} beyond the training sample"
                                + (f" and the rows overlapping it (task.val_overlap_words={overlap_words})"
                                   if overlap_words else ""))
            self.val = random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
        self._candidates: dict[int, tuple[tuple[int, ...], ...]] = {}  # id(record) -> candidate ids
        if self.kind == "classification":
            self.choices = [tuple(self._ids(w, special=False)) for w in self.words]
            self._check_choices()
        self.train_examples = [self.example(r) for r in self.train]
        self.truncated = 0
        if self.max_tokens:
            self._report_truncation()

    def _report_truncation(self):
        """Say once how many examples task.max_tokens cut (stderr; Trainer puts it in the summary)."""
        for r in (*self.dev, *self.val):
            self.prompt(r)
        counts = {name: sum(id(r) in self._cut for r in rows)
                  for name, rows in (("train", self.train), ("dev", self.dev), ("val", self.val)) if rows}
        self.truncated = sum(counts.values())
        if self.truncated:
            print(f"mezo-run: task.max_tokens={self.max_tokens}: cut the text of {self.truncated} examples ("
                  + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")", file=sys.stderr)

    def _check_choices(self, words=None, choices=None, where="config field 'task.verbalizer'"):
        """Two words with the same tokens could never be told apart: accuracy would be a coin."""
        seen = {}
        for word, ids in zip(words or self.words, choices or self.choices):
            if not ids:
                raise MezoError(f"{where}: word {word!r} has no tokens")
            if ids in seen:
                raise MezoError(f"{where}: words {seen[ids]!r} and {word!r} "
                                f"tokenize to the same ids {list(ids)}")
            seen[ids] = word

    def candidates(self, record: Record) -> tuple[tuple[int, ...], ...]:
        """The token ids of the answers a row is scored on: the verbalizer's words, or
        (multiple choice) the row's own candidates, tokenized after the prompt without
        special tokens (as the verbalizer's words are), checked distinct once."""
        if record.choices is None:
            return tuple(self.choices)
        ids = self._candidates.get(id(record))
        if ids is None:
            ids = tuple(tuple(self._ids(c, special=False)) for c in record.choices)
            self._check_choices(record.choices, ids, f"{record.where or 'task'}: choices")
            self._candidates[id(record)] = ids
        return ids

    def _ids(self, text, special=True):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def prompt(self, record: Record) -> tuple[int, ...]:
        """The prompt's ids, computed once per record (and cut to task.max_tokens)."""
        ids = self._prompts.get(id(record))
        if ids is None:
            ids = self._prompts[id(record)] = self._make_prompt(record)
        return ids

    def _make_prompt(self, record: Record) -> tuple[int, ...]:
        """Classification and multiple choice: ``task.template`` around the text (cut
        to task.max_tokens from the text's tail); completion: the prompt as written."""
        if self.kind == "completion":
            ids = tuple(self._ids(record.text))
            room = None if not self.max_tokens else self.max_tokens - len(self._ids(record.completion, special=False))
            if room is not None and len(ids) > room:
                # keep the end of the prompt (it leads into the completion) and a leading BOS
                bos = self.tok.bos_token_id if ids and ids[0] == getattr(self.tok, "bos_token_id", None) else None
                head = (ids[0],) if bos is not None else ()
                if room <= len(head):
                    raise MezoError(f"config field 'task.max_tokens': {self.max_tokens} leaves no room for the "
                                    f"prompt of {record.text[:40]!r} before its completion")
                self._cut.add(id(record))
                ids = head + ids[len(ids) - (room - len(head)):]
            return ids
        ids = tuple(self._ids(self.cfg.template.format(text=record.text)))
        room = None if not self.max_tokens else self.max_tokens - max(map(len, self.candidates(record)))
        if room is None or len(ids) <= room:
            return ids
        return self._truncated_prompt(record, room)

    def _truncated_prompt(self, record: Record, room: int) -> tuple[int, ...]:
        """The prompt with the longest head of the text's tokens that fits ``room``:
        the template around {text} (its answer slot included) is never cut."""
        text_ids = self._ids(record.text, special=False)
        build = lambda k: tuple(self._ids(self.cfg.template.format(  # noqa: E731
            text=self.tok.decode(text_ids[:k]) if k else "")))
        lo, hi = 0, len(text_ids)            # the longest k whose prompt fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(mid)) <= room:
                lo = mid
            else:
                hi = mid - 1
        ids = build(lo)
        if lo == 0 or len(ids) > room:
            need = len(build(0)) + self.max_tokens - room + 1
            raise MezoError(f"config field 'task.max_tokens': {self.max_tokens} is too small: the template, "
                            f"the longest answer word and one token of text need {need}")
        self._cut.add(id(record))
        return ids

    def example(self, record: Record) -> Example:
        if not self.prompt(record):
            raise MezoError(f"task: the prompt of {record.text[:40]!r} has no tokens (the tokenizer adds "
                            "no BOS token): give every example a non-empty prompt")
        if self.kind in ("classification", "multiple_choice"):
            candidates = self.candidates(record)
            choices = candidates if self.cfg.train_loss == "choices" else None
            return Example(self.prompt(record), candidates[record.label], choices)
        return Example(self.prompt(record), tuple(self._ids(record.completion, special=False)))

    def train_batch(self, run_seed: int, step: int, batch_size: int) -> list[Example]:
        """Batches walk through a seeded permutation per epoch: a pure function
        of (seed, step), so a resumed run sees the same batches."""
        n = len(self.train_examples)
        out = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            perm = self._perm(run_seed, epoch, n, batch_size)
            out.append(self.train_examples[perm[pos]])
        return out

    def _perm(self, run_seed, epoch, n, batch_size=1):
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != (run_seed, epoch, batch_size):
            gen = torch.Generator().manual_seed(mix(run_seed, epoch, 0xDA7A))
            perm = torch.randperm(n, generator=gen).tolist()
            if self.cfg.get("group_by_length"):
                perm = self._group_by_length(perm, run_seed, epoch, batch_size)
            self._perm_cache = ((run_seed, epoch, batch_size), perm)
        return self._perm_cache[1]

    GROUP_WINDOW = 50  # batches per window that task.group_by_length sorts by length

    def _group_by_length(self, perm, run_seed, epoch, b):
        """The epoch's permutation with rows of similar length side by side (less
        padding per batch): windows of ``GROUP_WINDOW`` batches are sorted by length,
        cut into batches, and those batches shuffled -- still a pure function of
        (seed, epoch), so of (seed, step)."""
        out = []
        for w, start in enumerate(range(0, len(perm), b * self.GROUP_WINDOW)):
            window = sorted(perm[start:start + b * self.GROUP_WINDOW],
                            key=lambda i: self.train_examples[i].num_tokens)
            blocks = [window[i:i + b] for i in range(0, len(window), b)]
            random.Random(mix(run_seed, epoch, w, 0x6B7)).shuffle(blocks)
            out += [i for block in blocks for i in block]
        return out

    #: tokens a greedy generation may run past the gold completion's length (exact match)
    EXACT_MATCH_EXTRA_TOKENS = 4

    def evaluate(self, backend, batch_size: int, progress=None, split: str = "dev",
                 predictions: list | None = None) -> dict:
        """Classification and multiple choice: accuracy (lowest-loss candidate wins),
        mean loss of the gold candidate and ``outcomes`` (a "1"/"0" string: each example
        right or not, in file order); completion: mean loss, and exact match
        of greedy generations (``task.exact_match``; skipped with a note where the
        backend cannot generate). ``split``: "dev" or "val" (the keys are prefixed with it).
        ``predictions``: a list that receives one record per row, in file order
        (``mezo-run eval --predictions``)."""
        records = self.val if split == "val" else self.dev
        scored = self.kind != "completion"
        # shortest first: a batch is padded to its longest row, so rows of similar length
        # waste little (SST-2 dev: ~40% fewer padded tokens); the metrics are sums, order-free
        prompts = {id(r): self.prompt(r) for r in records} if scored else {}
        order = sorted(records, key=lambda r: len(prompts[id(r)]) if prompts else len(r.text))
        generate = not scored and self.cfg.get("exact_match", True)
        losses, right, exact = [], {}, 0
        rows_out: dict[int, dict] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if scored:
                chunk_prompts = [prompts[id(r)] for r in chunk]
                if self.kind == "classification":  # one set of words: the backends' choice_losses
                    rows = backend.choice_losses(chunk_prompts, self.choices)
                else:
                    rows = candidate_losses(backend, chunk_prompts, [self.candidates(r) for r in chunk])
                for r, scores in zip(chunk, rows):
                    right[id(r)] = int(scores.argmin()) == r.label
                    losses.append(float(scores[r.label]))
                    if predictions is not None:
                        rows_out[id(r)] = self._prediction(r, scores)
            else:
                examples = [self.example(r) for r in chunk]
                chunk_losses = backend.losses(examples).tolist()
                losses += chunk_losses
                generations = self._generations(backend, chunk, examples) if generate else False
                generate = generations is not False
                matched = [exact_match(g, r.completion) for r, g in zip(chunk, generations or [])]
                exact += sum(matched)
                if predictions is not None:
                    for i, (r, loss) in enumerate(zip(chunk, chunk_losses)):
                        rows_out[id(r)] = {"prompt": r.text, "completion": r.completion, "loss": loss,
                                           **({"generation": generations[i], "exact_match": matched[i]}
                                              if generations else {})}
            if progress:
                progress.update(len(chunk))
        out = {f"{split}_loss": sum(losses) / len(losses), f"{split}_examples": len(records)}
        if scored:
            out[f"{split}_accuracy"] = sum(right.values()) / len(records)
            # which examples were right, in file order: best/ selection compares two adapters pairwise
            out[f"{split}_outcomes"] = "".join("1" if right[id(r)] else "0" for r in records)
        elif generate:
            out[f"{split}_exact_match"] = exact / len(records)
        if predictions is not None:
            predictions += [{"index": i, "where": r.where, **rows_out[id(r)]} for i, r in enumerate(records)]
        return out

    def _prediction(self, record: Record, scores) -> dict:
        """One scored row for --predictions: the gold and predicted label (names where
        the verbalizer has them), right or not, each candidate's loss."""
        names = label_names(self.cfg.verbalizer) if self.kind == "classification" else None
        guess = int(scores.argmin())
        show = (lambda i: names[i]) if names else (lambda i: i)
        return {"text": record.text, "label": show(record.label), "prediction": show(guess),
                "correct": guess == record.label, "losses": [round(float(x), 6) for x in scores],
                **({"choices": list(record.choices)} if record.choices else {})}

    def _generations(self, backend, chunk, examples):
        """The greedy generation of each row of ``chunk`` (each up to its gold's length +
        EXACT_MATCH_EXTRA_TOKENS tokens), as text; False where the backend cannot
        generate (said once on stderr)."""
        budgets = [len(e.target_ids) + self.EXACT_MATCH_EXTRA_TOKENS for e in examples]
        try:
            outputs = backend.generate([e.prompt_ids for e in examples], max(budgets))
        except MezoError as exc:
            if not getattr(self, "_said_no_generation", False):
                print(f"mezo-run: {exc}: exact match skipped, the loss is reported alone", file=sys.stderr)
                self._said_no_generation = True
            return False
        return [self.tok.decode(list(ids[:n]), skip_special_tokens=True) for ids, n in zip(outputs, budgets)]


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive form of an answer: runs of whitespace become one space,
    leading and trailing whitespace go (case and punctuation are kept)."""
    return " ".join(text.split())


def exact_match(generated: str, gold: str) -> bool:
    """Whether a greedy generation completes ``gold`` exactly: the generation is cut
    at its first newline after some text (unless the gold answer itself spans lines),
    then both are compared by ``normalize_answer``. A generation that runs on past
    the answer without a newline or EOS does not match."""
    if "\n" not in gold.strip():
        stripped = generated.lstrip()
        generated = stripped.split("\n", 1)[0]
    return normalize_answer(generated) == normalize_answer(gold)


def candidate_losses(backend, prompts, candidates) -> list[torch.Tensor]:
    """The loss of each row's candidates (a row's own number of them): rows with the
    same candidates (a verbalizer; repeated choice sets) go through ``choice_losses``
    together (the backends' fast path: single-token candidates in one pass), every
    other row's (prompt, candidate) pairs through one ``losses`` call."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(tuple(c), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    singles = []
    for choices, rows in groups.items():
        if len(rows) == 1 and any(len(c) != 1 for c in choices):
            singles.append(rows[0])
            continue
        scores = backend.choice_losses([prompts[i] for i in rows], list(choices)).cpu()
        for j, i in enumerate(rows):
            out[i] = scores[j]
    if singles:
        pairs = [Example(tuple(prompts[i]), tuple(c)) for i in singles for c in candidates[i]]
        flat = backend.losses(pairs).cpu()
        pos = 0
        for i in singles:
            out[i] = flat[pos:pos + len(candidates[i])]
            pos += len(candidates[i])
    return out
