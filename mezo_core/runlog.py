"""The run's own record of its steps and evaluations, written by the core on every
run (the logger plugins of ``report_to`` add other formats and dashboards)."""
from __future__ import annotations

import json
from pathlib import Path

from .runfiles import open_append, read_bytes, replace_file, utf8_lines


def _is_eval(metrics: dict) -> bool:
    return metrics.get("event") == "eval"


def _lines(path: Path) -> list[str]:
    """The UTF-8 lines of a run file, never read through a symlink (a line of other
    bytes is dropped); [] when it is missing."""
    try:
        return utf8_lines(read_bytes(path))
    except FileNotFoundError:
        return []


def _rows_until(path: Path, step: int, parse) -> list:
    """The rows of ``path`` up to ``step`` (a row cut short by a kill is dropped)."""
    kept = []
    for row in parse(path) if path.exists() else []:
        try:
            if int(row["step"]) <= step:
                kept.append(row)
        except (KeyError, TypeError, ValueError):
            pass
    return kept


class _Line(dict):
    """A parsed JSONL row that keeps its text (rows are kept byte for byte)."""


def _jsonl_rows(path: Path) -> list:
    rows = []
    for line in _lines(path):
        try:
            row = _Line(json.loads(line))
        except (ValueError, TypeError):
            continue
        row.text = line
        rows.append(row)
    return rows


def _replace(path: Path, text: str) -> None:
    replace_file(path, text)   # atomic; a symlink at path is refused, never followed


class RunLog:
    """``metrics.jsonl`` (one JSON object per step) and ``evals.jsonl`` (one per evaluation
    and split): the run's own record, which ``--resume`` trims and ``training.png``
    reads, so the trainer writes it whatever loggers ``report_to`` adds. Registered as
    the logger ``jsonl`` too (the name report_to has always taken)."""
    name = "jsonl"

    def __init__(self, out_dir, cfg, start_step: int = 0):
        self.files = {}
        for kind in ("metrics", "evals"):
            path = Path(out_dir) / f"{kind}.jsonl"
            if path.exists():  # a resumed run: rows after its checkpoint are written again
                _replace(path, "".join(r.text + "\n" for r in _rows_until(path, start_step, _jsonl_rows)))
            self.files[kind] = open_append(path)

    def log(self, step, metrics):
        f = self.files["evals" if _is_eval(metrics) else "metrics"]
        f.write(json.dumps(metrics) + "\n")
        f.flush()

    def close(self):
        for f in self.files.values():
            f.close()
        self.files = {}


class Loggers:
    """A run's loggers: its own record (RunLog) first, then the plugins ``report_to``
    names (``jsonl`` there is the record: not twice). Rank 0 alone opens them."""

    def __init__(self, classes):
        self.classes, self.items = list(classes), []

    def open(self, out_dir, cfg, start_step: int) -> None:
        self.items = [RunLog(out_dir, cfg, start_step)] + [
            cls(out_dir, cfg, start_step) for cls in self.classes if cls is not RunLog]

    def log(self, step: int, row: dict) -> None:
        for logger in self.items:
            logger.log(step, row)

    def log_eval(self, step: int, label: str, evaluation: dict, **extra) -> None:
        """One row per split: ``{"step", "event": "eval", "label", "split", "accuracy", "loss", ...}``."""
        for split in ("dev", "val"):
            values = {k[len(split) + 1:]: v for k, v in evaluation.items() if k.startswith(split + "_")}
            if values:
                self.log(step, {"step": step, "event": "eval", "label": label, "split": split, **values, **extra})

    def close(self) -> None:
        """Every logger closed; one that cannot flush (a full disk) does not keep the
        others open, and its error comes last."""
        items, self.items = self.items, []
        errors = []
        for logger in items:
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]
