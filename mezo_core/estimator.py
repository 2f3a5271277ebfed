"""The fourth plugin interface: an Estimator turns a step's forward passes into
an update direction.

A step draws its seeds from (run seed, step) (``mezo.direction_seeds``). The
estimator chooses which perturbed states of the weights to evaluate and measures
them (``probe``), then says how much of each seeded z the update moves
(``coefficients``). The core applies that update -- restore of the last perturbed
state, weight decay and the step -- in one pass (``mezo.update``), so an
estimator never stores a z and never touches the weights outside ``probe``.

``probe`` must leave the weights at theta + ``offset`` * z(seeds[-1]) (its
``StepResult.offset``): the update folds that restore in. Estimators with
``fuses_next`` let the update also apply the next step's first +eps z, where
their next probe starts (two-sided SPSA does; one that first evaluates theta
itself does not).
"""
from __future__ import annotations

import abc
from typing import ClassVar, Sequence

from .forwards import Example
from .mezo import StepResult


class Estimator(abc.ABC):
    """Registered with ``register_estimators(register)``; chosen by ``mezo.estimator``;
    built as ``cls(options)`` with its ``options`` dataclass filled from
    ``mezo.estimator_options`` (None for an estimator without options)."""

    name: ClassVar[str]
    #: the dataclass of ``mezo.estimator_options``, or None
    options: ClassVar[type | None] = None
    #: the directions per step (mezo.q) it needs at least
    min_directions: ClassVar[int] = 1
    #: whether its probe starts at theta + eps z(seeds[0]) (the update may apply it)
    fuses_next: ClassVar[bool] = False

    def __init__(self, options=None):
        self.opts = options

    def perturb(self, backend, terms, decay=1.0) -> None:
        """Apply a pass of seeded terms (the update's, with its restore and decay): the
        backend's own ``perturb`` unless the estimator's directions are not plain z."""
        backend.perturb(terms, decay)

    def state_dict(self) -> dict:
        """What a resume needs to continue bitwise: JSON values, and tensors (saved beside
        the checkpoint's adapter). Seed-only estimators keep nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def forwards(self, q: int) -> int:
        """Forward passes of a step over its batch with q directions (two-sided: 2q)."""
        return 2 * q

    @abc.abstractmethod
    def probe(self, backend, batch: Sequence[Example], seeds: Sequence[int], eps: float,
              applied: float = 0.0, reduce=None) -> StepResult:
        """The step's forwards. ``applied``: the multiple of z(seeds[0]) already on the
        weights; ``reduce``: sums a list of floats over data-parallel ranks (None: one
        rank), so every rank measures the same step."""

    @abc.abstractmethod
    def coefficients(self, result: StepResult, lr: float) -> list[float]:
        """The update's multiple of z(seed) for each seed of ``result`` (before decay)."""
