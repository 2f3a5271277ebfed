"""Metric loggers (``report_to: [jsonl, csv, tensorboard, wandb]``): each gets every
training step's row and every evaluation's rows (``"event": "eval"``).

Training rows and evaluation rows have different fields, so the file loggers keep
them apart: ``metrics.jsonl`` / ``metrics.csv`` hold the steps (the same rows as
before: ``--resume`` trims them, ``training.png`` reads them), ``evals.jsonl`` /
``evals.csv`` one row per evaluation and split. On ``--resume`` a logger drops the
rows written after the checkpoint (the resumed run writes them again).
"""
from __future__ import annotations

import csv
import importlib
import io
import json
import os
from pathlib import Path

from mezo_core.runfiles import open_append
from mezo_core.runlog import RunLog, _is_eval, _lines, _replace, _rows_until


def _scalars(metrics: dict) -> dict:
    """A row's numbers as dashboards name them: ``train/<field>`` for a step,
    ``eval/<split>/<field>`` for an evaluation, ``best/<split>/<field>`` for best/'s."""
    evaluation = _is_eval(metrics)
    # best/'s figures, named at the end of a run, are not another point of the eval curve
    group = "best" if evaluation and metrics.get("label") == "best" else "eval"
    prefix = f"{group}/{metrics.get('split', 'dev')}/" if evaluation else "train/"
    # a step row repeats its evaluation's dev_*/val_* figures (metrics.jsonl readers want them
    # there); dashboards get them once, from the eval rows
    return {prefix + k: v for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and (evaluation or not k.startswith(("dev_", "val_")))}


def _missing(module: str, package: str) -> str | None:
    """Why a logger cannot run here: its library does not import (None when it does)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{exc} (pip install {package})"
    return None


def _csv_text(path: Path) -> str:
    return "".join(line + "\n" for line in _lines(path))


#: the run's own record (metrics.jsonl, evals.jsonl) is the core's, written whatever
#: report_to says; ``jsonl`` in report_to names it (mezo_core.runlog.RunLog)
JsonlLogger = RunLog


def _cell(value):
    """Lists and dicts as JSON text: a CSV cell is one value."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class CsvLogger:
    """``metrics.csv`` and ``evals.csv``: one column per field. A field that first
    appears later (a periodic evaluation, a guard event) widens the header, and the
    file is rewritten with the wider header (small files: once per new field)."""
    name = "csv"

    def __init__(self, out_dir, cfg, start_step: int = 0):
        self.paths = {kind: Path(out_dir) / f"{kind}.csv" for kind in ("metrics", "evals")}
        self.rows = {kind: [] for kind in self.paths}
        self.fields = {kind: [] for kind in self.paths}
        for kind, path in self.paths.items():
            if path.exists():
                text = _csv_text(path)
                self.rows[kind] = _rows_until(path, start_step, lambda p: list(csv.DictReader(io.StringIO(text))))
                self.fields[kind] = next(csv.reader(io.StringIO(text)), [])
                self._rewrite(kind)

    def log(self, step, metrics):
        kind = "evals" if _is_eval(metrics) else "metrics"
        row = {k: _cell(v) for k, v in metrics.items()}
        self.rows[kind].append(row)
        new = [k for k in row if k not in self.fields[kind]]
        if new or not self.paths[kind].exists():
            self.fields[kind] += new
            self._rewrite(kind)
        else:
            with open_append(self.paths[kind], newline="") as f:
                csv.DictWriter(f, self.fields[kind]).writerow(row)

    def _rewrite(self, kind):
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.fields[kind])
        writer.writeheader()
        writer.writerows(self.rows[kind])
        _replace(self.paths[kind], text.getvalue())

    def close(self):
        pass


class TensorBoardLogger:
    """Scalars under ``out_dir/tensorboard``: ``train/<field>`` per step,
    ``eval/<split>/<field>`` per evaluation (``tensorboard --logdir runs``)."""
    name = "tensorboard"

    @classmethod
    def unavailable_reason(cls):
        return _missing("torch.utils.tensorboard", "tensorboard")

    def __init__(self, out_dir, cfg, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: on --resume, events after the checkpoint are hidden (written again)
        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step or None)

    def log(self, step, metrics):
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger:
    """Weights & Biases (``report_to: [wandb]``, when ``wandb`` is installed): one W&B
    run per run folder, its config the resolved run config, ``train/<field>`` per step
    and ``eval/<split>/<field>`` per evaluation, at the run's step.

    The W&B run id is kept in ``out_dir/wandb-run-id``, so ``--resume`` continues the
    same W&B run (``resume="allow"``). W&B refuses steps below the ones it holds, so the
    rows a resumed run writes again (after its checkpoint, up to where the first run
    stopped: the same numbers, resumes are exact) are not sent twice. W&B's own settings come from its environment:
    ``WANDB_PROJECT`` (default ``mezo-run``), ``WANDB_ENTITY``, and ``WANDB_MODE=offline``
    (no network: the run is written under ``out_dir/wandb``; ``wandb sync`` uploads it)."""

    name = "wandb"
    ID_FILE = "wandb-run-id"

    @classmethod
    def unavailable_reason(cls):
        return _missing("wandb", "wandb")

    def __init__(self, out_dir, cfg, start_step: int = 0):
        import wandb
        from omegaconf import OmegaConf
        out = Path(out_dir)
        id_file = out / self.ID_FILE
        run_id = "".join(_lines(id_file)).strip() or None
        if run_id is None:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(4).hex()
            _replace(id_file, run_id + "\n")
        kwargs = dict(project=os.environ.get("WANDB_PROJECT", "mezo-run"), name=out.name, dir=str(out),
                      id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True))
        if os.environ.get("WANDB_MODE"):
            kwargs["mode"] = os.environ["WANDB_MODE"]   # offline / disabled, as W&B reads it
        self.run = wandb.init(**kwargs)
        # on --resume: the next step W&B will take (rows below it were sent by the first run)
        self.skip_below = int(getattr(self.run, "step", 0) or 0) if start_step else 0

    def log(self, step, metrics):
        values = _scalars(metrics)
        if values and step >= self.skip_below:
            self.run.log(values, step=step)

    def close(self):
        self.run.finish()
