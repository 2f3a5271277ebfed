"""Rewards on generated text: the plugin interface (``Reward``) and what turns a
batch of reward rows into the per-row loss a step minimises (``Rewarder``).

A reward task (``task.kind=reward``) has prompts, each with an optional reference.
For every perturbed state a step measures, the backend generates completions of
the batch's prompts under that state (greedy, or ``task.samples`` samples at
``task.temperature``), the reward plugin scores each completion against its row's
reference, and the row's loss is minus its mean reward. So every estimator works
unchanged: two-sided SPSA's projected gradient (L+ - L-)/2eps is then
-(R(theta + eps z) - R(theta - eps z))/2eps, and its update theta - lr g z climbs
the reward.

Sampling is reproducible: sample j of a row draws from a generator seeded with
``mix(row.sample_seed, j)``, and a row's ``sample_seed`` is a pure function of
(run seed, step, position in the step's batch) (``Task.train_batch``). Every
perturbed state of a step therefore samples with the same random numbers (common
random numbers: the difference of two rewards measures the perturbation, not the
sampling noise), and a resumed run draws exactly the samples it would have.
"""
from __future__ import annotations

import abc
import inspect
from typing import ClassVar, Sequence

import torch

from .errors import MezoError
from .philox import mix


class Reward(abc.ABC):
    """Registered with ``register_rewards(register)``; chosen by ``task.reward``; built
    as ``cls(options)`` with its ``options`` dataclass filled from
    ``task.reward_options`` (None for a reward without options)."""

    name: ClassVar[str]
    #: the dataclass of ``task.reward_options``, or None
    options: ClassVar[type | None] = None
    #: whether a row needs a reference (a reward that checks the text alone does not)
    needs_reference: ClassVar[bool] = True

    def __init__(self, options=None):
        self.opts = options

    @abc.abstractmethod
    def score(self, completion: str, reference: str | None) -> float:
        """The reward of one completion (the generated text after the prompt, without
        EOS) for a row with ``reference`` (None where the row has none). Higher is
        better; built-ins give 1.0 or 0.0."""


class Rewarder:
    """A reward task's objective: ``reward`` (a Reward), completions of at most
    ``max_new_tokens`` tokens, ``samples`` per prompt (1: the greedy completion;
    more: sampled at ``temperature``)."""

    def __init__(self, reward: Reward, max_new_tokens: int, samples: int = 1, temperature: float = 1.0):
        if max_new_tokens < 1 or samples < 1 or (samples > 1 and not temperature > 0):
            raise ValueError("Rewarder: max_new_tokens >= 1, samples >= 1, temperature > 0 when sampling")
        self.reward, self.max_new_tokens = reward, int(max_new_tokens)
        self.samples, self.temperature = int(samples), float(temperature)

    def completions(self, backend, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None,
                    greedy: bool = False, **route) -> list[list[str]]:
        """The texts generated for each prompt under the backend's current adapter (or
        the per-row adapters of ``route``): one greedy completion per prompt where
        ``greedy`` or ``samples`` is 1, else ``samples`` sampled ones, sample j of row i
        seeded by ``mix(seeds[i], j)``."""
        route = {k: v for k, v in route.items() if k != "on_device"}   # rewards are read on the host
        n = 1 if greedy else self.samples
        if n > 1:
            rows = [p for p in prompts for _ in range(n)]
            route = {k: ([x for x in v for _ in range(n)] if isinstance(v, (list, tuple)) and len(v) == len(prompts)
                         else v) for k, v in route.items()}
            row_seeds = [mix(s, j) for s in (seeds or [0] * len(prompts)) for j in range(n)]
            if "seeds" not in inspect.signature(backend.generate).parameters:
                raise MezoError(f"task.samples={n}: backend {getattr(backend, 'name', '?')!r} cannot sample "
                                f"(its generate takes no temperature/seeds): set task.samples=1")
            ids = backend.generate(rows, self.max_new_tokens, temperature=self.temperature, seeds=row_seeds, **route)
        else:
            rows = list(prompts)
            ids = backend.generate(rows, self.max_new_tokens, **route)
        texts = [backend.tokenizer.decode(list(t), skip_special_tokens=True) for t in ids]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def rewards(self, texts: Sequence[str], reference: str | None) -> list[float]:
        """The reward of each text for a row with ``reference`` (a finite float each)."""
        return [float(self.reward.score(text, reference)) for text in texts]

    def losses(self, backend, batch, **route) -> torch.Tensor:
        """Minus the mean reward of each row's completions, float64, shape [B] (the
        loss ``forwards.objective`` returns for reward rows)."""
        texts = self.completions(backend, [e.prompt_ids for e in batch], [e.sample_seed for e in batch], **route)
        return torch.tensor([0.0 - sum(r) / len(r) for r in (self.rewards(t, e.reference) for t, e in zip(texts, batch))],
                            dtype=torch.float64)


def make_reward(registry, task_cfg) -> Reward:
    """The reward plugin ``task.reward`` built with its ``task.reward_options``."""
    from .config import choice_options
    cls = registry.get("rewards", task_cfg.reward)
    return cls(choice_options(cls, task_cfg.get("reward_options"), "task.reward_options", "reward"))
