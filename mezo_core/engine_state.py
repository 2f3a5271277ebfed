"""The seeded state of an inference engine's worker: the protocol that the vLLM
and SGLang backends share, written once.

An engine runs the model in its own worker (vLLM's worker, SGLang's scheduler),
often in another process. The driver never sends it tensors per step, only
seeds and coefficients: the worker keeps the trainable state itself and
regenerates z there.

- **The master copy**: the adapter's tensors in fp32, PEFT layout, on the
  worker's device, by canonical PEFT name sorted -- the z-index order of every
  mezo backend, so tensor i gets z(seed, i) as in the hf backend.
- **z from seeds**: ``mezo_core.perturb.apply_z`` on that device -- the same call,
  hence the same z and the same rounding, as the driver's copy on the same
  device type (the CPU tests compare them bit for bit).
- **Slots**: the engine serves an adapter from its own buffers (its *slot*: the
  engine's layout and dtype). After every change of the master copy the worker
  writes it into the trained adapter's slot; a second slot holds a perturbed
  copy (``filled``), so that both signs of a direction are evaluated in one
  engine call: the driver moves theta to theta + eps z, then asks for the minus
  slot to be filled with (theta + eps z) - 2 eps z -- the sequential path's own
  arithmetic.

With ``mezo.q`` > 1 the engine may hold 2q slots beside the trained one, every
perturbed state of a step, so that a step is one engine call (``state_losses``).

``EngineState`` is the master copy and its arithmetic; ``SeededWorker`` the
worker methods the backends call over RPC (``mezo_perturb``, ``mezo_load``,
``mezo_state_bytes``, ``mezo_save``). An engine's worker subclasses it and
supplies ``_mezo_write`` (how a state reaches a slot) plus its attach and fill
calls (how slots are named and found in that engine). ``SlotStates`` is the
driver's side of the slots, the same for both engines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from mezo_core.adapter import read_peft_adapter, write_peft_adapter
from mezo_core.config import setting
from mezo_core.forwards import all_directions, each_direction, holds_side_by_side, objective, slot_losses
from mezo_core.perturb import apply_z


def _value(v):
    """A coefficient or decay as ``apply_z`` takes it: a float, or one float per tensor."""
    return float(v) if isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0 else [float(x) for x in v]


def _terms(terms) -> list[tuple[int, float | list[float]]]:
    return [(int(seed), _value(coef)) for seed, coef in terms]


class EngineState:
    """The fp32 master copy of an adapter in an engine's worker (module docstring)."""

    def __init__(self, state: Mapping[str, torch.Tensor], device):
        self.names = sorted(state)
        self.tensors = [state[n].to(device=device, dtype=torch.float32).contiguous() for n in self.names]

    @classmethod
    def from_folder(cls, adapter_dir, device) -> "EngineState":
        """The state of a PEFT adapter folder, on ``device``."""
        return cls(read_peft_adapter(Path(adapter_dir)), device)

    @torch.no_grad()
    def load(self, adapter_dir) -> None:
        """theta <- a PEFT folder's tensors, which must have the trained names and shapes."""
        state = read_peft_adapter(Path(adapter_dir))
        if sorted(state) != self.names:
            missing = sorted(set(self.names) - set(state))
            extra = sorted(set(state) - set(self.names))
            raise ValueError(f"{adapter_dir}: adapter tensors differ from the trained ones "
                             f"(missing {missing[:2]}, unexpected {extra[:2]})")
        for name, tensor in zip(self.names, self.tensors):
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{adapter_dir}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the trained one {tuple(tensor.shape)}")
        for name, tensor in zip(self.names, self.tensors):
            tensor.copy_(state[name])

    def perturb(self, terms: Sequence, decay=1.0, dist: str = "gaussian") -> None:
        """theta <- decay*theta + sum coef*z(seed, i), z of distribution ``dist``."""
        apply_z(self.tensors, _terms(terms), _value(decay), dist=str(dist))

    def filled(self, terms: Sequence, dist: str = "gaussian") -> list[torch.Tensor]:
        """theta + sum coef*z(seed, i), on copies (theta is left as it is): what a
        second slot holds, e.g. the minus side of a paired evaluation."""
        tensors = [t.clone() for t in self.tensors]
        apply_z(tensors, _terms(terms), dist=str(dist))
        return tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors (fp32 CPU copies) by canonical PEFT name."""
        return {n: t.detach().to("cpu", copy=True) for n, t in zip(self.names, self.tensors)}

    def state_bytes(self) -> dict[str, tuple[list[int], bytes]]:
        """``state_dict`` as (shape, raw fp32 bytes): survives any RPC serialiser."""
        return {n: (list(t.shape), t.numpy().tobytes()) for n, t in self.state_dict().items()}

    def save(self, path) -> None:
        """Write theta (fp32) to ``path`` as safetensors."""
        from safetensors.torch import save_file
        save_file({n: t.contiguous() for n, t in self.state_dict().items()}, str(path))


class SeededWorker:
    """The worker methods of the protocol, over ``self._mezo`` (an ``EngineState``
    set by the engine's attach call). A subclass supplies ``_mezo_write(slot=None,
    tensors=None)``: write ``tensors`` (default: the master copy) into ``slot``
    (default: the trained adapter's), in the engine's layout."""

    _mezo: EngineState

    def _mezo_write(self, slot=None, tensors=None) -> None:
        raise NotImplementedError

    def mezo_perturb(self, terms, decay=1.0, dist: str = "gaussian") -> None:
        """theta <- decay*theta + sum coef*z(seed, i), then into the trained slot."""
        self._mezo.perturb(terms, decay, dist)
        self._mezo_write()

    def mezo_load(self, adapter_dir: str) -> None:
        """theta <- a PEFT folder's tensors (the trained names), then into the trained slot."""
        self._mezo.load(adapter_dir)
        self._mezo_write()

    def mezo_state_bytes(self) -> dict[str, tuple[list[int], bytes]]:
        """theta as (shape, raw fp32 bytes) by canonical PEFT name."""
        return self._mezo.state_bytes()

    def mezo_save(self, path: str) -> None:
        """Write theta (fp32) to ``path`` as safetensors (tests compare it with the driver's)."""
        self._mezo.save(path)


@dataclass
class SlotOptions:
    """The slots' options, the same in the ``vllm`` and ``sglang`` sections (their
    options dataclasses extend this one)."""
    paired_signs: bool = setting(True, "both signs of a direction in one engine call, a second adapter slot "
                                       "holding theta - eps z (sglang: with adapter_transport in_place)")
    all_directions: bool = setting(True, "with mezo.q > 1 and paired_signs: every perturbed state of a step in "
                                         "one engine call, 2q adapter slots beside the trained one (vllm: "
                                         "engine max_loras 2q + 1; sglang: pinned slots)")

    def extra_slots(self, directions: int) -> int:
        """Adapter slots beside the trained one: none without paired signs, one (the
        minus side) for one direction, 2q with ``all_directions``."""
        if not self.paired_signs:
            return 0
        return 2 * directions if self.all_directions and directions > 1 else 1


class SlotStates:
    """The driver's side of an engine's perturbed-state slots, mixed into the vLLM and
    SGLang backends. They supply ``paired`` (both signs of a direction in one call),
    ``side_by_side`` (how many states the slots beside the trained one hold) and
    ``_fill_slots(states)``: the worker writes theta + sum(coef * z(seed)) of
    ``states[k]`` into slot k + 1, the trained slot 0 stays; and ``generation``,
    their package's ``generation.generate``."""

    generation: Callable

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, adapters=None, *, temperature=0.0, seeds=None):
        """Continuations of ``prompts`` (``Backend.generate``), the rows of every state in
        one engine call through ``adapters`` (a slot per row)."""
        return type(self).generation(self, prompts, max_new_tokens, adapters, temperature, seeds)

    def save_adapter(self, path):
        write_peft_adapter(self.state_dict(), self.lora, self.model_name, path)

    def population_losses(self, batch, seeds, eps, applied=0.0):
        """Every direction and sign in one engine call when the slots hold them
        (``all_directions``), else each direction in turn, both signs of each in one
        call when paired."""
        if len(seeds) > 1 and holds_side_by_side(self, 2 * len(seeds)):
            return all_directions(self, batch, seeds, eps, applied)
        return each_direction(self, batch, seeds, eps, applied, pair=self._both_signs if self.paired else None)

    def state_losses(self, batch, states):
        """The losses under theta + sum(coef * z(seed)) of every state (a list of terms),
        shape [len(states), B], in one engine call; the trained adapter does not move."""
        if len(states) > self.side_by_side:
            raise ValueError(f"{self.name} backend: {len(states)} states, {self.side_by_side} slots")
        self._fill_slots([[(int(s), float(c)) for s, c in terms] for terms in states])
        return slot_losses(self, batch, len(states))

    def _both_signs(self, batch, seed, eps, applied):
        """L+ and L- in one engine call. The trained adapter moves to theta + eps*z (as
        in the plain sequence); slot 1 is filled with (theta + eps*z) - 2*eps*z -- the
        sequential path's own arithmetic -- and the objective runs once over ``batch +
        batch``, the second half routed to slot 1. Leaves theta + eps*z: offset +eps."""
        if eps != applied:
            self.perturb([(seed, eps - applied)])
        self._fill_slots([[(int(seed), -2.0 * float(eps))]])
        losses = objective(self, list(batch) + list(batch), adapters=[0] * len(batch) + [1] * len(batch))
        return losses[:len(batch)], losses[len(batch):], eps
