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

``EngineState`` is the master copy and its arithmetic; ``SeededWorker`` the
worker methods the backends call over RPC (``mezo_perturb``, ``mezo_load``,
``mezo_state_bytes``, ``mezo_save``). An engine's worker subclasses it and
supplies ``_mezo_write`` (how a state reaches a slot) plus its attach and fill
calls (how slots are named and found in that engine).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from mezo_core.adapter import read_peft_adapter
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
