"""One MeZO step at a time, and what keeps a run of them safe: the forwards, the
guard's verdict before anything moves, the schedules, the fused update, the
roll-back to the guard's anchor, and the weight average.

The trainer owns the run (evaluations, selection, checkpoints, logs); a ``Stepper``
owns the weights between two of its pauses. ``applied`` is the multiple of the next
step's first z already on the weights (the fused schedule): it is 0 at every pause
(``pauses_after``), which is where the trainer reads, evaluates or saves them.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from .distributed import shard, sum_over_ranks
from .errors import MezoError
from .forwards import holds_side_by_side, objective
from .interfaces import Signals, restore, snapshot
from .mezo import direction_seeds, update
from .stats import per_step, stats_of


class Stepper:
    def __init__(self, cfg, backend, task, estimator, lr, eps, guard, average, decay_mask,
                 rank: int = 0, world: int = 1):
        self.cfg, self.backend, self.task, self.estimator = cfg, backend, task, estimator
        self.lr, self.eps, self.guard, self.average = lr, eps, guard, average
        self.decay_mask = decay_mask
        self.rank, self.world = rank, world
        self.applied = 0.0

    def batch(self, step: int):
        """This rank's share of step ``step``'s batch: a pure function of (seed, step)."""
        m = self.cfg.mezo
        return shard(self.task.train_batch(self.cfg.seed, step, m.batch_size), self.rank, self.world)

    def prepare(self, state: dict) -> None:
        """Before the first step (or the first after a resume): the guard's anchor and
        scale, the weight average, the forward noise the schedules may need."""
        if self.guard.anchor is None:
            self.take_anchor(state["step"])  # the guard can always roll back to the start
        if self.guard.start_scale is None:    # the unit of the guard's bound on |w|
            self.guard.start_scale = max((float(t.abs().max()) for t in self.guard.anchor.values()
                                          if t.numel()), default=0.0)
        if self.average.enabled and self.average.tensors is None:
            self.average.reset(self.guard.anchor)
        if "noise" not in state:
            state["noise"] = self.forward_noise(state["step"])

    def step(self, state: dict, step: int) -> dict:
        """One MeZO step: the forwards (L+/L- and the projected gradients), the guard's
        verdict before anything moves, the update (restore + decay + step + the next
        step's +eps z in one pass); a rejected step rolls back. Returns the step's
        metrics row; ``self.applied`` carries the multiple of the next step's z left on
        the weights."""
        cfg, m = self.cfg, self.cfg.mezo
        batch = self.batch(step)
        eps = self.eps(step, m.steps)
        _check_schedule("mezo.eps_schedule", m.eps_schedule, "eps", eps, step, positive=True)
        stats_before = stats_of(self.backend)
        start = time.perf_counter()
        result = self.estimator.probe(self.backend, batch, direction_seeds(cfg.seed, step, m.q), eps,
                                      applied=self.applied, reduce=sum_over_ranks)
        event, new_best = self._judge(result, step, eps, state)
        rejected = bool(event) and event["event"] in ("nonfinite", "rise")
        lr = 0.0 if rejected else self.guard.lr_scale * self.lr(step, m.steps)
        _check_schedule("mezo.lr_schedule", m.lr_schedule, "lr", lr, step)
        next_direction = None
        # (a backend holding every state of a step side by side starts from theta: nothing to fuse)
        if m.fuse_steps and self.estimator.fuses_next and not holds_side_by_side(self.backend, 2 * m.q) and not (
                rejected or self.pauses_after(step + 1) or self._anchors(step + 1, new_best)):
            next_direction = (direction_seeds(cfg.seed, step + 1, m.q)[0], self.eps(step + 1, m.steps))
        self.applied = update(self.backend, result, lr, m.weight_decay, next_direction=next_direction,
                              decay_mask=self.decay_mask,
                              coefficients=self.estimator.coefficients(result, lr) if lr else None,
                              perturb=lambda terms, decay: self.estimator.perturb(self.backend, terms, decay))
        if not rejected and next_direction is None:  # clean weights: an absurd state diverged too
            too_large = self.guard.check_weights(self._max_abs(self.pauses_after(step + 1)))
            if too_large:
                event, rejected = too_large, True
        if rejected:
            event = self._roll_back(state, event, batch, step)
        elif self._anchors(step + 1, new_best):
            self.take_anchor(step + 1)
        if not rejected and self.average.due(step + 1):
            self.average.update(snapshot(self.backend))
        if event:
            self.guard.events += 1
        seconds = time.perf_counter() - start
        tokens = self.estimator.forwards(m.q) * sum(e.num_tokens for e in batch)
        row = {"step": step + 1, "loss": result.loss, "loss_plus": result.loss_plus,
               "loss_minus": result.loss_minus, "grads": result.grads, "seeds": result.seeds,
               "eps": eps, "lr": lr, "step_seconds": seconds, "tokens_per_second": tokens / seconds,
               **per_step(stats_of(self.backend), stats_before), **({"guard": event} if event else {})}
        return row

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

    def _anchors(self, step: int, new_best: bool) -> bool:
        """Whether the guard takes an anchor after ``step`` steps: at a new best of the
        smoothed loss, at most every ``window // 5`` steps (the weights must then be
        clean: that step's update carries no next +eps z)."""
        return new_best and step - self.guard.anchor_step >= max(1, self.cfg.guard.window // 5)

    @contextlib.contextmanager
    def averaged_weights(self):
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

    def take_anchor(self, step: int) -> None:
        self.guard.anchor, self.guard.anchor_step = snapshot(self.backend), step

    def _max_abs(self, pausing: bool) -> float | None:
        """The largest |w| of the trainable tensors (the guard's bound): every clean step
        where the backend holds them; at pauses (evaluations, checkpoints, the end: before
        anything is written) from a snapshot otherwise. None: not measured this step."""
        tensors = getattr(self.backend, "trainable_tensors", None)
        if tensors is not None:
            tensors = [t.detach() for t in tensors() if t.numel()]   # peft may have turned grads on
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

    def forward_noise(self, step: int) -> float | None:
        """The noise of a batch's mean loss, for schedules that need it: the same batch
        twice, rows in the opposite order (kernels, padding and rounding differ)."""
        if not (self.lr.needs_noise or self.eps.needs_noise):
            return None
        batch = self.batch(step)
        a = objective(self.backend, batch).double()
        b = objective(self.backend, batch[::-1]).double().flip(0)
        return float(max((a.mean() - b.mean()).abs(), (a - b).std() / len(batch) ** 0.5 if len(batch) > 1 else 0))

    def pauses_after(self, step: int) -> bool:
        """Whether the weights must be clean (theta itself) after ``step`` steps: the
        run ends, evaluates, checkpoints or averages there."""
        cfg = self.cfg
        return (step >= cfg.mezo.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
                or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or self.average.due(step))


def _check_schedule(field: str, name: str, what: str, value: float, step: int, positive: bool = False) -> None:
    """A schedule's value is finite (and > 0 for eps): else the run stops naming the schedule."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise MezoError(f"config field {field!r}: schedule {name!r} gave {what}={value} at step {step + 1} "
                        f"(mezo.{what}, mezo.{what}_end): not a finite number {'> 0' if positive else '>= 0'}")
