"""Tasks as in the MeZO paper: classification by prompt + verbalizer words
(SST-2: ``<sentence> It was [terrible|great]``) and plain prompt/completion.

Files: TSV/CSV with a ``sentence``/``label`` header (standard
quoting when the file quotes its fields) or JSONL, one object a line:
``{"text": ..., "label": 0}`` or ``{"prompt": ..., "completion": ...}``. A label
is the index of its verbalizer word, or its name when ``task.verbalizer`` is a
mapping ``{name: word}``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import MezoError
from .interfaces import Example
from .perturb import mix


@dataclass(frozen=True)
class Record:
    """One raw example: ``text``/``label`` for classification, ``text``/``completion`` otherwise."""
    text: str
    label: int | None = None
    completion: str | None = None


def label_names(verbalizer) -> list[str] | None:
    """The label names of a ``{name: word}`` verbalizer (None for a list of words)."""
    return [str(k) for k in verbalizer.keys()] if hasattr(verbalizer, "keys") else None


def verbalizer_words(verbalizer) -> list[str]:
    """The words, in label order, of a list or a ``{name: word}`` verbalizer."""
    return list(verbalizer.values()) if hasattr(verbalizer, "keys") else list(verbalizer)


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
        raise MezoError(f"{where}: label {value!r} is not an integer")
    try:
        label = int(value)
    except ValueError:
        hint = (f"not one of the label names {names}" if names else
                "not an integer (for label names give task.verbalizer as a mapping {name: word})")
        raise MezoError(f"{where}: label {value!r} is {hint}") from None
    if not 0 <= label < num_labels:
        raise MezoError(f"{where}: label {label} out of range 0..{num_labels - 1} (task.verbalizer has {num_labels} words)")
    return label


def _check_text(value, name, where, empty_ok=False):
    """A string, never ``null`` (which str() would train as "None"); empty only where allowed."""
    if not isinstance(value, str):
        raise MezoError(f"{where}: field {name!r} must be a string (got {value!r:.40})")
    if not empty_ok and not value.strip():
        raise MezoError(f"{where}: field {name!r} is empty")
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
                records.append(Record(_check_text(row[si], "sentence", where), _check_label(row[li], labels, where)))
            except MezoError as exc:
                raise _TableError(path, line, str(exc).removeprefix(f"{where}: ")) from None
            line = reader.line_num + 1
    except csv.Error as exc:
        raise _TableError(path, line, f"{exc} (read with standard quoting: a quoted field ends with "
                          "a quote before the next tab; a quote inside it is doubled)") from None
    return records


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
        if not isinstance(obj, dict):
            raise MezoError(f"{where}: expected a JSON object")
        need = ("text", "label") if kind == "classification" else ("prompt", "completion")
        missing = [k for k in need if k not in obj]
        if missing:
            raise MezoError(f"{where}: missing field {missing[0]!r} (a {kind} line needs {need})")
        if kind == "classification":
            records.append(Record(_check_text(obj["text"], "text", where),
                                  _check_label(obj["label"], labels, where)))
        else:  # an empty prompt is fine where the tokenizer adds BOS (Task checks)
            records.append(Record(_check_text(obj["prompt"], "prompt", where, empty_ok=True),
                                  completion=_check_text(obj["completion"], "completion", where)))
    return records


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
        raise MezoError(f"{field}: {path}: TSV files hold classification data (sentence, label)")
    text = _read_text(path, field)
    if path.suffix == ".tsv":
        records = _read_tsv(path, text, labels)
    else:
        records = _read_jsonl(path, text, kind, labels)
    if not records:
        raise MezoError(f"{field}: {path} holds no examples")
    return records


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
        train = read_records(cfg.train, cfg.kind, labels, "task.train")
        self.train = sample(train, cfg.k_per_class if cfg.kind == "classification" else None,
                            cfg.n_train, cfg.sample_seed)
        if batch_size is not None and batch_size > len(self.train):
            raise MezoError(f"config field 'mezo.batch_size': {batch_size} is larger than the "
                            f"training set ({len(self.train)} examples sampled from {cfg.train})")
        dev = read_records(cfg.dev, cfg.kind, labels, "task.dev")
        # a seeded random sample, in file order (not the first n rows: a file sorted by
        # label would give one class)
        if cfg.n_dev and cfg.n_dev < len(dev):
            keep = sorted(random.Random(mix(cfg.sample_seed, 0xDE7)).sample(range(len(dev)), cfg.n_dev))
            dev = [dev[i] for i in keep]
        self.dev = dev
        # selection data that is not the reported dev set: a file of its own (task.val), else
        # examples held out from the train file
        self.val = []
        if cfg.get("val"):
            pool = read_records(cfg.val, cfg.kind, labels, "task.val")
            self.val = pool if not cfg.n_val or cfg.n_val >= len(pool) else \
                random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
        elif cfg.n_val:
            chosen = {id(r) for r in self.train}
            pool = [r for r in train if id(r) not in chosen]
            if len(pool) < cfg.n_val:
                raise MezoError(f"config field 'task.n_val': {cfg.n_val} validation examples asked, but "
                                f"{cfg.train} has only {len(pool)} beyond the training sample")
            self.val = random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
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

    def _check_choices(self):
        """Two words with the same tokens could never be told apart: accuracy would be a coin."""
        seen = {}
        for word, ids in zip(self.words, self.choices):
            if not ids:
                raise MezoError(f"config field 'task.verbalizer': word {word!r} has no tokens")
            if ids in seen:
                raise MezoError(f"config field 'task.verbalizer': words {seen[ids]!r} and {word!r} "
                                f"tokenize to the same ids {list(ids)}")
            seen[ids] = word

    def _ids(self, text, special=True):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def prompt(self, record: Record) -> tuple[int, ...]:
        """The prompt's ids, computed once per record (and cut to task.max_tokens)."""
        ids = self._prompts.get(id(record))
        if ids is None:
            ids = self._prompts[id(record)] = self._make_prompt(record)
        return ids

    def _make_prompt(self, record: Record) -> tuple[int, ...]:
        if self.kind != "classification":
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
        room = None if not self.max_tokens else self.max_tokens - max(map(len, self.choices))
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
        if self.kind == "classification":
            choices = tuple(self.choices) if self.cfg.train_loss == "choices" else None
            return Example(self.prompt(record), self.choices[record.label], choices)
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

    def evaluate(self, backend, batch_size: int, progress=None, split: str = "dev") -> dict:
        """Classification: accuracy (lowest-loss choice wins), mean loss of the
        gold choice and ``outcomes`` (a "1"/"0" string: each example right or not,
        in file order); completion: mean loss. ``split``: "dev" or "val" (the keys
        are prefixed with it)."""
        records = self.val if split == "val" else self.dev
        # shortest first: a batch is padded to its longest row, so rows of similar length
        # waste little (SST-2 dev: ~40% fewer padded tokens); the metrics are sums, order-free
        prompts = {id(r): self.prompt(r) for r in records} if self.kind == "classification" else {}
        order = sorted(records, key=lambda r: len(prompts[id(r)]) if prompts else len(r.text))
        losses, right = [], {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if self.kind == "classification":
                scores = backend.choice_losses([prompts[id(r)] for r in chunk], self.choices)
                gold = torch.tensor([r.label for r in chunk])
                right.update(zip(map(id, chunk), (scores.argmin(1) == gold).tolist()))
                losses += scores[torch.arange(len(chunk)), gold].tolist()
            else:
                losses += backend.losses([self.example(r) for r in chunk]).tolist()
            if progress:
                progress.update(len(chunk))
        out = {f"{split}_loss": sum(losses) / len(losses), f"{split}_examples": len(records)}
        if self.kind == "classification":
            out[f"{split}_accuracy"] = sum(right.values()) / len(records)
            # which examples were right, in file order: best/ selection compares two adapters pairwise
            out[f"{split}_outcomes"] = "".join("1" if right[id(r)] else "0" for r in records)
        return out
