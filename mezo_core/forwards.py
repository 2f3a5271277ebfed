"""What a step asks of a backend's forwards, as plain functions over its callables.

``objective`` turns ``losses``/``choice_losses`` into the per-example loss MeZO
minimises; ``plus_minus`` and ``each_direction`` run the SPSA forwards of a step
in the plain sequence. A backend that can do better (both signs in one engine
call, every direction in one batch) overrides ``Backend.population_losses`` and
hands its own pair function to ``each_direction``. A backend that holds several
perturbed states side by side (``side_by_side`` of them: hf's side adapters, an
engine's extra adapter slots) evaluates them in one call with ``state_losses``:
every direction of a step (``all_directions``), every one-sided state. Per-row routing of a
side-by-side batch (which adapter each row runs under) travels as keyword
arguments (``route``) to every ``losses``/``choice_losses`` call, never as state
on the backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class Example:
    """One scored sequence: the loss is the mean cross-entropy of ``target_ids``
    given ``prompt_ids`` (prompt tokens are context only)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    #: classification (the verbalizer's words, shared by every row) and multiple choice
    #: (the row's own candidates): the candidate completions; the loss MeZO minimises is
    #: then the cross-entropy of ``target_ids`` among them (MeZO's train_as_classification)
    choices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if not self.target_ids or not self.prompt_ids:
            raise ValueError("an Example needs at least one prompt token and one target token")
        if self.choices is not None and self.target_ids not in self.choices:
            raise ValueError("Example target must be one of its choices")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass(frozen=True)
class Prompt:
    """One reward row (``task.kind=reward``): the loss is minus the mean reward of
    the completions generated after ``prompt_ids`` (``rewarder``, a
    ``mezo_core.rewards.Rewarder``, generates and scores them); ``reference`` is
    what the reward compares them with (None: the row has none); ``sample_seed``
    seeds the row's samples (``Task.train_batch`` sets it from (run seed, step))."""

    prompt_ids: tuple[int, ...]
    reference: str | None
    rewarder: Any = field(compare=False, repr=False)
    sample_seed: int = 0

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("a Prompt needs at least one prompt token")

    @property
    def num_tokens(self) -> int:
        """The prompt and the longest completions it may get (each sample's)."""
        return len(self.prompt_ids) + self.rewarder.max_new_tokens * self.rewarder.samples


# A perturbation: theta <- decay * theta + sum(coef * z(seed)) over the terms.
Terms = Sequence[tuple[int, float]]


def objective(backend, batch: Sequence[Example], **route) -> torch.Tensor:
    """The per-example losses MeZO minimises: ``backend.losses`` for plain examples;
    for examples with ``choices``, the cross-entropy of the gold choice over the
    choices, each scored by its mean token loss (MeZO's length-normalised score, the
    one its evaluation ranks candidates by).

    A batch that shares one set of choices (a verbalizer) scores them with
    ``choice_losses``. Rows with candidates of their own (multiple choice) are scored
    by ``losses`` in one pass per candidate index, each over all rows of the batch in
    order, so a per-row ``route`` still fits its rows.

    Reward rows (``Prompt``): minus the mean reward of the completions generated
    under the current adapter, or each row's adapter of ``route``
    (``rewards.Rewarder.losses``)."""
    if batch and isinstance(batch[0], Prompt):
        if not all(isinstance(e, Prompt) for e in batch):
            raise ValueError("a batch mixes reward rows with scored examples")
        return batch[0].rewarder.losses(backend, batch, **route)
    with_choices = [e.choices is not None for e in batch]
    if not any(with_choices):
        return backend.losses(batch, **route)
    if not all(with_choices):
        raise ValueError("a batch mixes examples with and without choices")
    choices = batch[0].choices
    if all(e.choices == choices for e in batch):
        scores = backend.choice_losses([e.prompt_ids for e in batch], choices, **route)
        gold = torch.tensor([choices.index(e.target_ids) for e in batch], device=scores.device)
        return torch.nn.functional.cross_entropy(-scores, gold, reduction="none")
    width = max(len(e.choices) for e in batch)
    passes = []
    for j in range(width):  # a row with fewer candidates repeats its last one, masked below
        passes.append(backend.losses([Example(e.prompt_ids, e.choices[min(j, len(e.choices) - 1)])
                                      for e in batch], **route))
    scores = torch.stack(passes, 1)
    device = scores.device  # the hf backend keeps a step's losses on its device
    n_choices = torch.tensor([len(e.choices) for e in batch], device=device)
    scores = scores.masked_fill(torch.arange(width, device=device)[None, :] >= n_choices[:, None], float("inf"))
    gold = torch.tensor([e.choices.index(e.target_ids) for e in batch], device=device)
    return torch.nn.functional.cross_entropy(-scores, gold, reduction="none")


def plus_minus(backend, batch: Sequence[Example], seed: int, eps: float, applied: float = 0.0, **route):
    """L+ and L- of one SPSA direction, one sign after the other.

    ``applied`` is the multiple of z(seed) already on the weights (the previous
    step's update may have folded in +eps*z). Returns ``(loss_plus, loss_minus,
    offset)``, ``offset`` the multiple of z(seed) left applied: here -eps, which the
    update folds into its own pass instead of restoring now."""
    if eps != applied:
        backend.perturb([(seed, eps - applied)])
    loss_plus = objective(backend, batch, **route)
    backend.perturb([(seed, -2.0 * eps)])
    loss_minus = objective(backend, batch, **route)
    return loss_plus, loss_minus, -eps


#: a pair function: (batch, seed, eps, applied) -> (loss_plus, loss_minus, offset)
Pair = Callable[[Sequence[Example], int, float, float], tuple]


def each_direction(backend, batch: Sequence[Example], seeds: Sequence[int], eps: float,
                   applied: float = 0.0, pair: Pair | None = None):
    """L+ and L- of every direction of a step, one direction after another, each by
    ``pair`` (default: ``plus_minus``). ``applied``: the multiple of z(seeds[0])
    already on the weights. Returns ``([(loss_plus, loss_minus), ...], offset)``,
    ``offset`` the multiple of z(seeds[-1]) left on the weights."""
    pair = pair or (lambda b, s, e, a: plus_minus(backend, b, s, e, a))
    pairs, offset = [], 0.0
    for i, seed in enumerate(seeds):
        if offset:
            backend.perturb([(seeds[i - 1], -offset)])  # restore before the next direction
        loss_plus, loss_minus, offset = pair(batch, seed, eps, applied if i == 0 else 0.0)
        pairs.append((loss_plus, loss_minus))
    return pairs, offset


def holds_side_by_side(backend, states: int) -> bool:
    """Whether ``backend.state_losses`` evaluates ``states`` perturbed states in one call
    (``side_by_side``: how many it holds; none without the attribute)."""
    return states > 1 and getattr(backend, "side_by_side", 0) >= states


def slot_losses(backend, batch: Sequence[Example], states: int) -> torch.Tensor:
    """An engine's ``state_losses`` once its adapter slots 1..states hold the states
    (slot 0, the trained adapter, stays theta): the batch once per slot in one
    objective call, shape [states, len(batch)]."""
    n = len(batch)
    losses = objective(backend, list(batch) * states, adapters=[k for k in range(1, states + 1) for _ in range(n)])
    return losses.view(states, n)


def all_directions(backend, batch: Sequence[Example], seeds: Sequence[int], eps: float, applied: float = 0.0):
    """L+ and L- of every direction in one call (``state_losses`` of theta + eps z(seed)
    and theta - eps z(seed) for each seed). Returns ``(pairs, 0.0)``: the trained
    adapter does not move (``applied`` is taken off first)."""
    if applied:
        backend.perturb([(seeds[0], -applied)])
    losses = backend.state_losses(batch, [[(seed, sign * eps)] for seed in seeds for sign in (1.0, -1.0)])
    return [(losses[2 * j], losses[2 * j + 1]) for j in range(len(seeds))], 0.0


def one_sided(backend, batch: Sequence[Example], seeds: Sequence[int], eps: float) -> list[torch.Tensor]:
    """The losses at theta + eps z(seed) for each seed: side by side in one call where the
    backend holds them, else one state after another (each move undoes the last
    direction and applies the next in one pass). Leaves +eps z(seeds[-1]) either way."""
    if holds_side_by_side(backend, len(seeds)):
        losses = list(backend.state_losses(batch, [[(seed, eps)] for seed in seeds]))
        backend.perturb([(seeds[-1], eps)])
        return losses
    losses, previous = [], None
    for seed in seeds:
        backend.perturb(([(previous, -eps)] if previous is not None else []) + [(seed, eps)])
        losses.append(objective(backend, batch))
        previous = seed
    return losses


def one_direction(backend, batch: Sequence[Example], seed: int, eps: float, applied: float = 0.0):
    """``(loss_plus, loss_minus, offset)`` of one direction through the backend's own
    ``population_losses`` (paired signs, side-by-side batches included)."""
    pairs, offset = backend.population_losses(batch, [seed], eps, applied)
    return (*pairs[0], offset)


def nothing_to_generate(prompts, max_new_tokens: int, temperature: float, seeds):
    """What ``Backend.generate`` returns without running anything ([] for no prompts,
    empty rows for no new tokens), else None; sampling needs one seed per prompt."""
    if not prompts:
        return []
    if max_new_tokens < 1:
        return [() for _ in prompts]
    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    return None
