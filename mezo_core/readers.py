"""Reading examples: data files and Hugging Face datasets into Records, each row
checked (errors name the file and line).

Files: TSV/CSV with a ``sentence``/``label`` header (standard
quoting when the file quotes its fields) or JSONL, one object a line:
``{"text": ..., "label": 0}``, ``{"text": ..., "choices": [...], "label": 1}`` or
``{"prompt": ..., "completion": ...}``; reward rows are ``{"prompt": ..., "reference": ...}``
(the reference optional, a number taken as its text) or, in TSV, a ``prompt`` column and an
optional ``reference`` one; a reward task also reads classification rows (text and label:
the reference is then the label's verbalizer word). A label is the index of its verbalizer
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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MezoError

MAX_LINE_CHARS = 131072   # characters in one line of a data file (see the module's docstring)
MAX_LABEL_CHARS = 100     # characters of a label: an index or a name


@dataclass(frozen=True)
class Record:
    """One raw example: ``text``/``label`` for classification, plus ``choices`` for
    multiple choice (``label`` indexes them), ``text``/``completion`` otherwise (a
    reward row's prompt and its reference, None where it has none).
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


def _read_tsv(path: Path, text: str, labels, kind: str = "classification") -> list[Record]:
    """A TSV with a header. Read as written (no quoting: GLUE's TSVs hold bare quote
    characters) unless the file quotes its fields -- a field wrapped in quotes, or a
    row that only splits right with quotes -- then with standard CSV quoting
    (``"a ""b""<TAB>c"``: tabs, newlines and doubled quotes inside a field)."""
    first = _looks_quoted(text)
    try:
        return _parse_tsv(path, text, labels, first, kind)
    except _TableError as exc:  # the other reading, where it may apply; else the error of
        if '"' not in text:     # the reading that got further into the file
            raise
        try:
            return _parse_tsv(path, text, labels, not first, kind)
        except _TableError as other:
            raise (other if other.line > exc.line else exc) from None


class _TableError(MezoError):
    def __init__(self, path, line, message):
        super().__init__(f"{path}, line {line}: {message}")
        self.line = line


def _looks_quoted(text: str) -> bool:
    """Whether some field is wrapped in double quotes (between tabs or line ends)."""
    return re.search(r'(^|\t)"[^\n]*"(\t|\r?$)', text, re.M) is not None


def _parse_tsv(path, text, labels, quoted, kind="classification") -> list[Record]:
    quoting = dict(quoting=csv.QUOTE_MINIMAL, doublequote=True) if quoted else dict(quoting=csv.QUOTE_NONE)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", strict=quoted, **quoting)
    records, line = [], 1
    try:
        header = next(reader, None)
        prompts = kind == "reward" and bool(header) and "prompt" in header   # prompt[, reference] rows
        if not prompts and (not header or "sentence" not in header or "label" not in header):
            raise _TableError(path, 1, "expected a header with 'sentence' and 'label'"
                              + (" (or 'prompt' and an optional 'reference')" if kind == "reward" else ""))
        if prompts:
            si, li = header.index("prompt"), header.index("reference") if "reference" in header else None
        else:
            si, li = header.index("sentence"), header.index("label")
        line = reader.line_num + 1
        for row in reader:
            where = f"{path}, line {line}"
            if len(row) != len(header):
                hint = ("read with standard quoting: check the quotes of this row" if quoted else
                        "a sentence holding a tab or a newline must be quoted: \"...\", a quote inside doubled")
                raise _TableError(path, line, f"expected {len(header)} tab-separated fields, got {len(row)} ({hint})")
            try:
                if prompts:
                    reference = None if li is None or not row[li].strip() else _check_text(row[li], "reference", where)
                    records.append(Record(_check_text(row[si], "prompt", where), completion=reference, where=where))
                else:
                    records.append(Record(_check_text(row[si], "sentence", where),
                                          _check_label(row[li], labels, where), where=where))
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
          "completion": ("prompt", "completion"), "reward": ("prompt",)}


def _record(obj: dict, kind: str, labels, where: str, names: dict | None = None) -> Record:
    """One example from a JSON object (or a dataset row); ``names`` maps the
    standard field names to the row's own (task.hf_dataset's ``*_field``)."""
    names = names or {}
    if kind == "reward" and names.get("prompt", "prompt") not in obj and "label" in obj:
        kind = "classification"   # a labelled row: the reference is its label's verbalizer word
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
    if kind == "reward":
        key = names.get("reference", "reference")
        reference = obj.get(key)
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)   # {"prompt": "2+3=", "reference": 5}
        return Record(_check_text(get("prompt"), names.get("prompt", "prompt"), where, empty_ok=True),
                      completion=None if reference is None else _check_text(reference, key, where), where=where)
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
    if path.suffix == ".tsv" and kind not in ("classification", "reward"):
        raise MezoError(f"{field}: {path}: TSV files hold classification data (sentence, label); "
                        f"{kind} data is JSONL {FIELDS[kind]}")
    text = _read_text(path, field)
    _check_line_lengths(path, text)
    if path.suffix == ".tsv":
        records = _read_tsv(path, text, labels, kind)
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
    "reference_field": "reference",  # reward tasks: the column holding each prompt's reference
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
             "completion": spec["completion_field"], "reference": spec["reference_field"]}
    text_field = spec["text_field"]
    columns = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if kind in ("completion", "reward"):
        names["prompt"] = text_field or "prompt"
    if kind != "completion":   # reward tasks read labelled rows too
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
