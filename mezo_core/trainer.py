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

import contextlib
import functools
import math
import os
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from .adapter import write_json_atomic
from .average import WeightAverage
from .checkpoints import write_adapter
from .data import Task
from .evaluation import evaluate_splits
from .distributed import rank_and_world, shard, sum_over_ranks
from .errors import MezoError, warn
from .guard import Guard
from .forwards import objective
from .interfaces import Signals, restore, snapshot
from .mezo import decayed, direction_seeds, probe, update
from .runlog import Loggers
from .runstate import RunState
from .stats import per_step, stats_of
from .selection import Selection, best_level, best_tests, sign_test_p  # noqa: F401 (re-exported)
from .threads import SlowStepWatch


def make_schedule(registry, field, name, start, end, warmup, options, q):
    """A schedule plugin with its options, tried at both ends before anything is written."""
    cls = registry.get("epsilon_schedules", name)
    if q < cls.min_directions:
        raise MezoError(f"config field {field!r}: schedule {name!r} needs mezo.q >= {cls.min_directions}")
    try:
        schedule = cls(start, end, warmup, **dict(options))
        schedule(0, 1)
        schedule.value(1.0)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise MezoError(f"config field {field!r}: schedule {name!r} cannot run: {exc}") from None
    return schedule


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
        self.decay_mask = decayed(backend.trainable_names(), list(m.weight_decay_exempt))
        self.task = Task(cfg.task, backend.tokenizer, batch_size=cfg.mezo.batch_size)
        split = "val" if self.task.val else "dev"
        self.selection = Selection(cfg, len(self.task.val if self.task.val else self.task.dev), split)
        self.logs = Loggers([logger_class(registry, name) for name in cfg.report_to])  # checked before any file
        self.hook = registry.hook()
        # data parallel: every rank steps alike on its shard; rank 0 alone writes files
        self.rank, self.world = rank_and_world()
        self.writes = self.rank == 0
        self.run = RunState(cfg, backend, self.writes, self.world)   # the folder: start/resume, checkpoints

    # -- the run ---------------------------------------------------------------
    @_releases_the_lock
    def train(self, resume: bool = False) -> dict:
        """The run, top to bottom: start (or resume), evaluate the starting adapter, then
        steps -- forwards, the guard's verdict, the schedules, the update -- with the
        evaluations and checkpoints they are due, then the final evaluation and files."""
        cfg, m = self.cfg, self.cfg.mezo
        state = self.run.start(resume, {"mezo.eps_schedule": self.eps, "mezo.lr_schedule": self.lr})
        self.run.restore(state, self.lr, self.eps, self.guard, self.average)
        self._open_logs(state)
        self._prepare(state)
        bar = tqdm(total=m.steps, initial=state["step"], desc="mezo", dynamic_ncols=True,
                   disable=not (cfg.progress and self.writes))
        slow = SlowStepWatch(enabled=self.writes and str(cfg.model.device).startswith("cpu"))  # a hint, once
        applied = 0.0  # multiple of this step's first z already on the weights
        for step in range(state["step"], m.steps):
            slow.begin()
            row, applied = self._step(state, step, applied)
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
        if self.guard.anchor is None:
            self._take_anchor(state["step"])  # the guard can always roll back to the start
        if self.guard.start_scale is None:    # the unit of the guard's bound on |w|
            self.guard.start_scale = max((float(t.abs().max()) for t in self.guard.anchor.values()
                                          if t.numel()), default=0.0)
        if self.average.enabled and self.average.tensors is None:
            self.average.reset(self.guard.anchor)
        if "noise" not in state:
            state["noise"] = self._forward_noise(state["step"])

    def _step(self, state: dict, step: int, applied: float) -> tuple[dict, float]:
        """One MeZO step: the forwards (L+/L- and the projected gradients), the guard's
        verdict before anything moves, the update (restore + decay + step + the next
        step's +eps z in one pass); a rejected step rolls back. Returns the step's
        metrics row and the multiple of the next step's z already applied."""
        cfg, m = self.cfg, self.cfg.mezo
        batch = shard(self.task.train_batch(cfg.seed, step, m.batch_size), self.rank, self.world)
        eps = self.eps(step, m.steps)
        _check_schedule("mezo.eps_schedule", m.eps_schedule, "eps", eps, step, positive=True)
        stats_before = stats_of(self.backend)
        start = time.perf_counter()
        result = probe(self.backend, batch, direction_seeds(cfg.seed, step, m.q), eps,
                       reduce=sum_over_ranks, applied=applied)
        event, new_best = self._judge(result, step, eps, state)
        rejected = bool(event) and event["event"] in ("nonfinite", "rise")
        lr = 0.0 if rejected else self.guard.lr_scale * self.lr(step, m.steps)
        _check_schedule("mezo.lr_schedule", m.lr_schedule, "lr", lr, step)
        next_direction = None
        if m.fuse_steps and not (rejected or self._pauses_after(step + 1) or self._anchors(step + 1, new_best)):
            next_direction = (direction_seeds(cfg.seed, step + 1, m.q)[0], self.eps(step + 1, m.steps))
        applied = update(self.backend, result, lr, m.weight_decay, next_direction=next_direction,
                         decay_mask=self.decay_mask)
        if not rejected and next_direction is None:  # clean weights: an absurd state diverged too
            too_large = self.guard.check_weights(self._max_abs(self._pauses_after(step + 1)))
            if too_large:
                event, rejected = too_large, True
        if rejected:
            event = self._roll_back(state, event, batch, step)
        elif self._anchors(step + 1, new_best):
            self._take_anchor(step + 1)
        if not rejected and self.average.due(step + 1):
            self.average.update(snapshot(self.backend))
        if event:
            self.guard.events += 1
        seconds = time.perf_counter() - start
        tokens = 2 * m.q * sum(e.num_tokens for e in batch)
        row = {"step": step + 1, "loss": result.loss, "loss_plus": result.loss_plus,
               "loss_minus": result.loss_minus, "grads": result.grads, "seeds": result.seeds,
               "eps": eps, "lr": lr, "step_seconds": seconds, "tokens_per_second": tokens / seconds,
               **per_step(stats_of(self.backend), stats_before), **({"guard": event} if event else {})}
        return row, applied

    def _judge(self, result, step: int, eps: float, state: dict) -> tuple[dict | None, bool]:
        """The guard's verdict on the forwards (non-finite, clipped, a sustained rise) and,
        on finite ones, the schedules' observations; (event, a new best of the smoothed loss)."""
        event = self.guard.check(result)
        if not result.finite:
            return event, False
        m = self.cfg.mezo
        signals = Signals(step, m.steps, eps, tuple(result.losses_plus), tuple(result.losses_minus),
                          tuple(result.grads), state["noise"])
        self.lr.observe(signals)
        self.eps.observe(signals)
        new_best, rise = self.guard.observe_loss(step + 1, result.loss)
        return rise or event, new_best

    def _roll_back(self, state: dict, event: dict, batch, step: int) -> dict:
        """Back to the guard's anchor (the best state seen) with a smaller step."""
        g = self.cfg.guard
        cut = g.nonfinite_cut if event["event"] in ("nonfinite", "weights") else g.cut
        restore(self.backend, self.guard.anchor)
        if event["event"] == "nonfinite":
            self._nonfinite_cause(event, batch, step)
        event = self.guard.roll_back(step + 1, event, cut)
        if self.average.enabled:  # the average forgets the weights rolled back
            self.average.reset(self.guard.anchor)
        state.setdefault("guard_events", []).append(event)
        return event

    def _evaluate_if_due(self, state: dict, row: dict) -> bool:
        """A periodic evaluation (eval_every, before the last step), its figures added to
        the step's row; True when early stopping should stop the run."""
        cfg = self.cfg
        if not (cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.mezo.steps):
            return False
        with self._averaged_weights():
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

    def _anchors(self, step: int, new_best: bool) -> bool:
        """Whether the guard takes an anchor after ``step`` steps: at a new best of the
        smoothed loss, at most every ``window // 5`` steps (the weights must then be
        clean: that step's update carries no next +eps z)."""
        return new_best and step - self.guard.anchor_step >= max(1, self.cfg.guard.window // 5)

    @contextlib.contextmanager
    def _averaged_weights(self):
        """Evaluate (and keep as best/) the averaged weights, then step on from the raw ones."""
        if not self.average.enabled:
            yield
            return
        raw = snapshot(self.backend)
        restore(self.backend, self.average.tensors)
        try:
            yield
        finally:
            restore(self.backend, raw)

    def _take_anchor(self, step: int) -> None:
        self.guard.anchor, self.guard.anchor_step = snapshot(self.backend), step

    def _max_abs(self, pausing: bool) -> float | None:
        """The largest |w| of the trainable tensors (the guard's bound): every clean step
        where the backend holds them; at pauses (evaluations, checkpoints, the end: before
        anything is written) from a snapshot otherwise. None: not measured this step."""
        tensors = getattr(self.backend, "trainable_tensors", None)
        if tensors is not None:
            tensors = [t for t in tensors() if t.numel()]
            import torch
            return float(torch.stack(torch._foreach_norm(tensors, float("inf"))).max()) if tensors else 0.0
        if pausing:
            return max((float(t.abs().max()) for t in snapshot(self.backend).values() if t.numel()), default=0.0)
        return None

    def _nonfinite_cause(self, event: dict, batch, step: int) -> None:
        """Name what went non-finite (``event["cause"]``): the loss of this batch at the
        anchor itself (the weights restored: the start, or the best state since) is not
        finite -- then no roll-back or step size helps, the model, adapter or data give
        NaN/inf, and the run stops here (MezoError) --, or the perturbation alone (no
        update since the anchor: mezo.eps), or the updates since the anchor (mezo.lr)."""
        loss = objective(self.backend, batch).double()
        total = sum_over_ranks([float(loss.sum()), float(len(batch))])
        if not math.isfinite(total[0]):
            where = ("the starting weights (no update applied yet)" if self.guard.anchor_step == 0
                     else f"the weights of step {self.guard.anchor_step} (the guard's anchor)")
            raise MezoError(f"the training loss of step {step + 1}'s batch is not finite at {where}: the "
                            f"model (model.dtype={self.cfg.model.dtype}), the adapter or the data give NaN/inf, "
                            f"not mezo.lr (nothing was written from this step)")
        if self.guard.anchor_step == step:
            event["cause"] = (f"the training loss went non-finite at the weights +- mezo.eps z alone (no update "
                              f"since step {step}): lower mezo.eps")

    def _forward_noise(self, step: int) -> float | None:
        """The noise of a batch's mean loss, for schedules that need it: the same batch
        twice, rows in the opposite order (kernels, padding and rounding differ)."""
        if not (self.lr.needs_noise or self.eps.needs_noise):
            return None
        m = self.cfg.mezo
        batch = shard(self.task.train_batch(self.cfg.seed, step, m.batch_size), self.rank, self.world)
        a = objective(self.backend, batch).double()
        b = objective(self.backend, batch[::-1]).double().flip(0)
        return float(max((a.mean() - b.mean()).abs(), (a - b).std() / len(batch) ** 0.5 if len(batch) > 1 else 0))

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

    def _pauses_after(self, step: int) -> bool:
        """Whether the weights must be clean (theta itself) after ``step`` steps: the
        run ends, evaluates, checkpoints or averages there."""
        cfg = self.cfg
        return (step >= cfg.mezo.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
                or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or self.average.due(step))

    def _save(self, state: dict) -> None:
        self.run.save(state, self.lr, self.eps, self.guard, self.average)

    def _release(self) -> None:
        """However the run ends; a logger whose file cannot be flushed (a full disk, the
        error already on its way out) does not keep the lock from being released."""
        try:
            self.logs.close()
        except Exception:   # noqa: BLE001 -- the run's own error, if any, is the one reported
            pass
        finally:
            self.run.release()


def _check_schedule(field: str, name: str, what: str, value: float, step: int, positive: bool = False) -> None:
    """A schedule's value is finite (and > 0 for eps): else the run stops naming the schedule."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise MezoError(f"config field {field!r}: schedule {name!r} gave {what}={value} at step {step + 1} "
                        f"(mezo.{what}, mezo.{what}_end): not a finite number {'> 0' if positive else '>= 0'}")


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
