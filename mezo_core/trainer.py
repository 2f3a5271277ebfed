"""The training loop, read top to bottom: evaluate zero-shot, then MeZO steps
(forwards, the guard's verdict, the schedules, the update) with metrics,
periodic evaluation that keeps the best adapter, and atomic checkpoints, then
a final evaluation, the adapter and a plot.

Everything random is a pure function of (seed, step): the batch, the z seeds;
everything adaptive (guard, schedules) a pure function of the run's own
measurements. A checkpoint holds the adapter, that state and the guard's
anchor, so a resume continues the uninterrupted trajectory exactly.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .adapter import write_json_atomic
from .average import WeightAverage
from .checkpoints import write_adapter
from .data import Task
from .evaluation import evaluate_splits
from .distributed import rank_and_world
from .errors import MezoError, warn
from .guard import Guard
from .interfaces import restore
from .mezo import decayed
from .runlog import Loggers
from .runstate import RunState
from .stepper import Stepper
from .selection import Selection
from .threads import SlowStepWatch


def make_schedule(registry, field, name, start, end, warmup, options, q):
    """A schedule plugin built with its options (``options``: the ``{field}_options``
    mapping, checked against the schedule's ``options`` dataclass), tried at both ends
    before anything is written."""
    from .config import choice_options
    cls = registry.get("epsilon_schedules", name)
    if q < cls.min_directions:
        raise MezoError(f"config field {field!r}: schedule {name!r} needs mezo.q >= {cls.min_directions}")
    settings = choice_options(cls, options, f"{field}_options")
    try:
        schedule = cls(start, end, warmup) if settings is None else cls(start, end, warmup, settings)
        schedule(0, 1)
        schedule.value(1.0)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise MezoError(f"config field {field!r}: schedule {name!r} cannot run: {exc}") from None
    return schedule


def make_estimator(registry, name: str, options, q: int):
    """The estimator plugin ``mezo.estimator`` with its options (``mezo.estimator_options``)."""
    from .config import choice_options
    cls = registry.get("estimators", name)
    if q < cls.min_directions:
        raise MezoError(f"config field 'mezo.estimator': estimator {name!r} needs mezo.q >= {cls.min_directions}")
    settings = choice_options(cls, options, "mezo.estimator_options", "estimator")
    return cls(settings)


def logger_class(registry, name: str):
    """The logger plugin ``name`` of ``report_to``, refused (one line) when it cannot run here."""
    cls = registry.get("loggers", name)
    reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
    if reason:
        raise MezoError(f"config field 'report_to': logger {name!r} is unavailable: {reason}")
    return cls


def _releases_the_lock(train):
    """However the run ends (finished, error, Ctrl-C), out_dir's lock is released."""
    @functools.wraps(train)
    def run(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            self._release()
    return run



class Trainer:
    def __init__(self, cfg, backend, registry):
        self.cfg, self.backend, self.registry = cfg, backend, registry
        self.out = Path(cfg.out_dir)
        m = cfg.mezo
        self.eps = make_schedule(registry, "mezo.eps_schedule", m.eps_schedule, m.eps, m.eps_end, 0,
                                 m.eps_schedule_options, m.q)
        self.lr = make_schedule(registry, "mezo.lr_schedule", m.lr_schedule, m.lr, m.lr_end, m.warmup_steps,
                                m.lr_schedule_options, m.q)
        self.guard = Guard(cfg.guard)
        self.average = WeightAverage(m.ema_half_life)
        self.task = Task(cfg.task, backend.tokenizer, batch_size=cfg.mezo.batch_size)
        split = "val" if self.task.val else "dev"
        self.selection = Selection(cfg, len(self.task.val if self.task.val else self.task.dev), split)
        self.logs = Loggers([logger_class(registry, name) for name in cfg.report_to])  # checked before any file
        self.hook = registry.hook()
        # data parallel: every rank steps alike on its shard; rank 0 alone writes files
        self.rank, self.world = rank_and_world()
        self.writes = self.rank == 0
        self.run = RunState(cfg, backend, self.writes, self.world)   # the folder: start/resume, checkpoints
        estimator = make_estimator(registry, m.estimator, m.estimator_options, m.q)
        self.stepper = Stepper(cfg, backend, self.task, estimator, self.lr, self.eps, self.guard, self.average,
                               decayed(backend.trainable_names(), list(m.weight_decay_exempt)), self.rank, self.world)

    # -- the run ---------------------------------------------------------------
    @_releases_the_lock
    def train(self, resume: bool = False) -> dict:
        """The run, top to bottom: start (or resume), evaluate the starting adapter, then
        steps -- forwards, the guard's verdict, the schedules, the update -- with the
        evaluations and checkpoints they are due, then the final evaluation and files."""
        cfg, m = self.cfg, self.cfg.mezo
        state = self.run.start(resume, {"mezo.eps_schedule": self.eps, "mezo.lr_schedule": self.lr})
        self.run.restore(state, self.lr, self.eps, self.guard, self.average, self.stepper.estimator)
        self._open_logs(state)
        self._prepare(state)
        bar = tqdm(total=m.steps, initial=state["step"], desc="mezo", dynamic_ncols=True,
                   disable=not (cfg.progress and self.writes))
        slow = SlowStepWatch(enabled=self.writes and str(cfg.model.device).startswith("cpu"))  # a hint, once
        for step in range(state["step"], m.steps):
            slow.begin()
            row = self.stepper.step(state, step)
            slow.end()
            state["step"] = step + 1
            stop = self._evaluate_if_due(state, row)
            self._record(row, bar)
            if stop:  # early stopping: evaluations stopped improving
                state["stopped_early"] = state["step"]
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                self._save(state)
        bar.close()
        self._finish(state)
        summary = self._summary(state)
        self.logs.close()
        if self.writes:
            self._write_outputs(state, summary)
        return summary

    # -- its parts, in the order train() calls them --------------------------------
    def _open_logs(self, state: dict) -> None:
        if not self.writes:
            return
        self.logs.open(self.out, self.cfg, state["step"])
        if self.cfg.eval_every and "note" in self.selection.plan:
            warn(f"best/ selection: {self.selection.plan['note']}")

    def _prepare(self, state: dict) -> None:
        """Before the first step: the zero-shot evaluation (the starting adapter is a
        candidate for best/: a run never ends below it), the guard's anchor and scale,
        the weight average, the forward noise the schedules may need."""
        if self.cfg.zero_shot and "zero_shot" not in state:
            state["zero_shot"], outcomes = self.evaluate_all("zero-shot", state["step"])
            if self.cfg.eval_every:
                self._consider_best(state, state["zero_shot"], outcomes)
            self._save(state)
        self.stepper.prepare(state)

    def _evaluate_if_due(self, state: dict, row: dict) -> bool:
        """A periodic evaluation (eval_every, before the last step), its figures added to
        the step's row; True when early stopping should stop the run."""
        cfg = self.cfg
        if not (cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.mezo.steps):
            return False
        with self.stepper.averaged_weights():
            evaluation, outcomes = self.evaluate_all(f"step {state['step']}")
            stop = self._consider_best(state, evaluation, outcomes)
        row.update(evaluation)
        state.setdefault("evals", []).append({"step": state["step"], **evaluation})
        return stop

    def _record(self, row: dict, bar) -> None:
        """The step's row to the loggers and the plugins' hook; the progress bar."""
        if self.writes:
            self.logs.log(row["step"], row)
            self.hook.on_step_end(step=row["step"], metrics=row)
        postfix = dict(loss=f"{row['loss']:.4f}", eps=f"{row['eps']:.1e}", lr=f"{row['lr']:.1e}",
                       tok_s=f"{row['tokens_per_second']:.0f}")
        if self.guard.events:
            postfix["guard"] = self.guard.events
        bar.set_postfix(**postfix)
        bar.update(1)

    def _finish(self, state: dict) -> None:
        """The final evaluation of the trained (or averaged) weights, best/'s last chance,
        and their checkpoint: the trained weights, which best/ never replaces."""
        if "final" in state:
            return
        if self.average.enabled:  # training is over: the run ends on the averaged weights
            restore(self.backend, self.average.tensors)
        state["final"], outcomes = self.evaluate_all("fine-tuned", state["step"])
        if self.cfg.eval_every:
            self._consider_best(state, state["final"], outcomes)
            if state["best"]["step"] != state["step"]:  # evals.jsonl names best/ beside the last adapter
                self.logs.log_eval(state["step"], "best", _scores(state["best"]), adapter_step=state["best"]["step"])
        self._save(state)

    def _summary(self, state: dict) -> dict:
        summary = {k: state.get(k) for k in ("zero_shot", "final", "best", "step", "stopped_early")}
        summary["result"] = self._result(state)
        if summary["best"]:
            summary["best"] = {k: v for k, v in summary["best"].items() if k != "outcomes"}
            summary["selection"] = self.selection.plan
        if self.cfg.task.max_tokens:
            summary["truncated_examples"] = self.task.truncated
        if self.task.overlap_dropped:
            summary["train_rows_overlapping_val"] = self.task.overlap_dropped   # left out of training
        summary["guard"] = {"events": self.guard.events, "roll_backs": self.guard.recoveries,
                            "lr_scale": self.guard.lr_scale, "roll_back_log": state.get("guard_events", [])}
        return summary

    def _write_outputs(self, state: dict, summary: dict) -> None:
        """last/ (the trained weights, always), adapter/ (the run's result: a copy of best/
        or of last/), summary.json and training.png."""
        write_adapter(self.backend, self.out / "last")
        if summary["result"]["adapter"] == "best":
            _copy_adapter(self.out / "best", self.out / "adapter")
        else:
            write_adapter(self.backend, self.out / "adapter")  # checked finite, atomic
        write_json_atomic(self.out / "summary.json", summary)
        if self.cfg.plot:
            from .plot import plot_run
            plot_run(self.out / "metrics.jsonl", state, self.out / "training.png")

    def _result(self, state: dict) -> dict:
        """The adapter the run hands over in adapter/: best/ when the run selects one
        (eval_every, selection.load_best_at_end) and it is not the last, else the last one."""
        best = state.get("best")
        if self.cfg.eval_every and self.cfg.selection.load_best_at_end and best and best["step"] != state["step"]:
            return {"adapter": "best", "step": best["step"], **_scores(best)}
        return {"adapter": "last", "step": state["step"], **_scores(state.get("final") or {})}

    def evaluate_all(self, label: str, step: int | None = None) -> tuple[dict, str | None]:
        """evaluation.evaluate_splits, logged as eval rows; (metrics, selection outcomes)."""
        result, outcomes = evaluate_splits(self.task, self.backend, self.cfg.eval_batch_size, label,
                                           bool(self.cfg.progress and self.writes))
        kind = "zero-shot" if label == "zero-shot" else "final" if label == "fine-tuned" else "periodic"
        self.logs.log_eval(step if step is not None else int(label.split()[-1]), kind, result)
        return result, outcomes

    def _consider_best(self, state: dict, evaluation: dict, outcomes: str | None = None) -> bool:
        """best/ follows the selection rule (mezo_core/selection.py); True when early
        stopping should stop the run."""
        kept, stop = self.selection.consider(state, evaluation, outcomes)
        if kept and self.writes:
            write_adapter(self.backend, self.out / "best")
            write_json_atomic(self.out / "best" / "best.json", state["best"])
        return stop

    def _save(self, state: dict) -> None:
        self.run.save(state, self.lr, self.eps, self.guard, self.average, self.stepper.estimator)

    def _release(self) -> None:
        """However the run ends; a logger whose file cannot be flushed (a full disk, the
        error already on its way out) does not keep the lock from being released."""
        try:
            self.logs.close()
        except Exception:   # noqa: BLE001 -- the run's own error, if any, is the one reported
            pass
        finally:
            self.run.release()


def _scores(evaluation: dict) -> dict:
    """The dev_* and val_* figures of an evaluation record."""
    return {k: v for k, v in evaluation.items() if k.startswith(("dev_", "val_"))}


def _copy_adapter(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the adapter folder ``src``, atomically (copied beside, renamed)."""
    from .adapter import replace_dir
    from .runfiles import writing
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(dst, cleanup=tmp):   # a full disk: one line naming the folder, no part left
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("best.json"))
    replace_dir(tmp, dst)
