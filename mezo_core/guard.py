"""The convergence guard: MeZO runs that blow up are caught and rolled back.

MeZO with a constant step size tends to run well, then collapse: the projected
gradient grows, the training loss climbs back to chance and stays there (seen
on SST-2 after ~1000 steps at lr 1e-2). The guard watches three signals:

* a step whose losses or projected gradient are not finite: its update is not
  applied (the weights are only restored), and the run rolls back;
* a projected gradient far outside its running scale: clipped to
  ``clip`` x the running RMS (zeroth-order gradient clipping), kept as an event;
* a sustained rise of the smoothed training loss: the EMA (span ``window``)
  stays more than ``rise`` (relative) above its best for ``patience`` steps;
* an absurd but finite state: after an update, a weight larger than
  ``MAX_WEIGHT_RATIO`` (1000) x the starting weights' largest |w| (at least
  ``MIN_START_SCALE``) -- rolled back as a non-finite step. Why 1000: LoRA starts
  with B = 0 and A ~ U(+-1/sqrt(d)), so the largest |w| is 1/sqrt(d) (0.016 at
  d = 4096), and MeZO moves a weight by lr * |g| * |z| per step (lr 1e-6..1e-2):
  a run that learns stays within a few times its start. A B entry 1000/sqrt(d)
  makes adapter deltas (alpha/r) * B @ A of order alpha * 1000 / d -- hundreds of
  times the base weights' own scale (~1/sqrt(d)): the model is destroyed well
  before, and such a state (mezo.lr=1e30 wrote weights of 1e22) is never written;
  full-parameter runs start from the base weights, where 1000 x their largest is as far.

Rolling back restores the anchor -- a snapshot of the weights taken where the
smoothed loss was at its best -- and multiplies the step size by ``cut``
(``nonfinite_cut`` after a non-finite step). After ``max_recoveries`` roll-backs
the run stops with ``DivergedError``. Everything is a pure function of the
run's own measurements, so the same seed gives the same events, and the state
(JSON + the anchor tensors) goes into every checkpoint.
"""
from __future__ import annotations

import math

from .errors import DivergedError

MAX_WEIGHT_RATIO = 1000.0   # a weight beyond this x the start's largest |w| is a divergence (see above)
MIN_START_SCALE = 0.01      # ... the start's largest |w| taken as at least this


class Guard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.lr_scale = 1.0
        self.ema = None            # smoothed training loss
        self.best = math.inf       # its best value since the last roll-back
        self.best_step = 0
        self.above = 0             # consecutive steps above the tolerated rise
        self.g_sq = None           # running mean of g^2 (for clipping)
        self.seen = 0
        self.recoveries = 0
        self.events = 0
        self.anchor = None         # tensors (by name) of the best state; the trainer fills it
        self.anchor_step = 0
        self.start_scale = None    # the starting weights' largest |w| (the bound's unit)

    def weight_limit(self) -> float:
        return MAX_WEIGHT_RATIO * max(self.start_scale or 0.0, MIN_START_SCALE)

    def check_weights(self, max_abs: float | None) -> dict | None:
        """An event when the largest |w| after an update (clean weights) is not finite or
        past ``weight_limit``: an absurd state, rolled back like a non-finite step."""
        if not self.cfg.enabled or max_abs is None or self.start_scale is None:
            return None
        limit = self.weight_limit()
        if math.isfinite(max_abs) and max_abs <= limit:
            return None
        return {"event": "weights", "max_abs": _num(max_abs), "limit": limit,
                "cause": ("the weights went non-finite in an update" if not math.isfinite(max_abs) else
                          f"the weights grew to |w| = {max_abs:.3g}, past {MAX_WEIGHT_RATIO:g} x the starting "
                          f"weights' largest |w| ({self.start_scale:.3g})") + ": lower mezo.lr"}

    # -- before the update ---------------------------------------------------------
    def check(self, result) -> dict | None:
        """Inspect a step's measurements before its update: an event for a
        non-finite step (skip the update) or clipped gradients (in ``result``)."""
        if not self.cfg.enabled:
            return None
        if not result.finite:
            losses = all(math.isfinite(v) for v in (*result.losses_plus, *result.losses_minus))
            return {"event": "nonfinite", "loss_plus": _num(result.loss_plus),
                    "loss_minus": _num(result.loss_minus),
                    "cause": ("the projected gradient overflowed (the losses are finite): lower mezo.lr" if losses
                              else "the training loss went non-finite: lower mezo.lr (or mezo.eps)")}
        event = None
        if self.cfg.clip and self.g_sq is not None and self.seen >= self.cfg.warmup:
            limit = self.cfg.clip * math.sqrt(self.g_sq)
            if any(abs(g) > limit for g in result.grads):
                event = {"event": "clip", "grads": list(result.grads), "limit": limit}
                result.grads = [max(-limit, min(limit, g)) for g in result.grads]
        mean_sq = sum(g * g for g in result.grads) / len(result.grads)
        beta = 1.0 - 2.0 / (self.cfg.window + 1)
        self.g_sq = mean_sq if self.g_sq is None else beta * self.g_sq + (1 - beta) * mean_sq
        self.seen += 1
        return event

    # -- after the update ----------------------------------------------------------
    def observe_loss(self, step: int, loss: float) -> tuple[bool, dict | None]:
        """Feed one step's training loss. Returns (new best: take an anchor,
        roll-back event or None)."""
        if not self.cfg.enabled:
            return False, None
        alpha = 2.0 / (self.cfg.window + 1)
        self.ema = loss if self.ema is None else (1 - alpha) * self.ema + alpha * loss
        if self.seen < self.cfg.warmup:
            return False, None
        if self.ema < self.best:
            self.best, self.best_step, self.above = self.ema, step, 0
            return True, None
        if self.ema > self.best * (1 + self.cfg.rise) + self.cfg.rise_abs:
            self.above += 1
            if self.above >= self.cfg.patience:
                return False, {"event": "rise", "smoothed_loss": self.ema, "best_smoothed_loss": self.best,
                               "best_step": self.best_step,
                               "cause": f"the smoothed training loss stayed above its best for "
                                        f"{self.cfg.patience} steps: lower mezo.lr"}
        else:
            self.above = 0
        return False, None

    def roll_back(self, step: int, event: dict, cut: float) -> dict:
        """Account a roll-back; raise DivergedError past ``max_recoveries``."""
        self.recoveries += 1
        self.lr_scale *= cut
        self.above = 0
        self.ema = self.best if math.isfinite(self.best) else None
        event.update(step=step, lr_scale=self.lr_scale, recoveries=self.recoveries,
                     rolled_back_to=self.anchor_step)
        if self.recoveries > self.cfg.max_recoveries:
            cause = event.get("cause") or "lower mezo.lr (or mezo.eps)"
            raise DivergedError(
                f"training diverged: {event['event']} at step {step} after {self.cfg.max_recoveries} "
                f"roll-backs (step size cut to {self.lr_scale:.3g} x mezo.lr): {cause}, and start again; "
                f"checkpoints hold only finite weights from before the divergence")
        return event

    def state_dict(self) -> dict:
        keys = ("lr_scale", "ema", "best", "best_step", "above", "g_sq", "seen", "recoveries", "events",
                "anchor_step", "start_scale")
        return {k: _num(getattr(self, k)) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, math.inf if v == "inf" else v)


def _num(x):
    """JSON has no inf/nan: keep them as strings."""
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)
