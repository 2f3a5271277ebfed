"""The perturbation engine: z is regenerated, never stored.

z for trainable tensor ``index`` under ``seed`` is a standard normal tensor of
the tensor's shape, produced in chunks of ``CHUNK`` elements; chunk ``c`` comes
from a ``torch.Generator`` on the tensor's device seeded with
``mix(seed, index, c)``. Fixing the chunk size makes z independent of how the
work is split and bounds the extra memory by one chunk, whatever the tensor's
size. Any process that holds the tensors (a vLLM worker, say) regenerates the
same z from the same (seed, index).
"""
from __future__ import annotations

from typing import Sequence

import torch

CHUNK = 1 << 20  # elements per z chunk: 4 MiB of fp32 scratch at most
_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """SplitMix64 over the values: a well-spread 63-bit generator seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


_GENERATORS: dict = {}  # one per device, re-seeded for every chunk (creating one costs more than seeding)


def _generator(device: torch.device, cache: dict) -> torch.Generator:
    if device not in cache:
        cache[device] = torch.Generator(device=device)
    return cache[device]


def z_chunk(out: torch.Tensor, seed: int, index: int, chunk: int,
            generators: dict | None = None) -> torch.Tensor:
    """Fill ``out`` (fp32, 1-D) with chunk ``chunk`` of z(seed, index)."""
    gen = _generator(out.device, _GENERATORS if generators is None else generators)
    gen.manual_seed(mix(seed, index, chunk))
    return out.normal_(generator=gen)


def z_like(tensor: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The whole z(seed, index) for ``tensor`` as a new fp32 tensor (tests,
    layout conversions). The engine itself never materialises it."""
    flat = torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        z_chunk(flat[start:start + CHUNK], seed, index, c)
    return flat.view(tensor.shape)


def merge_terms(terms: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Add up coefficients of repeated seeds so each z is generated once."""
    merged: dict[int, float] = {}
    for seed, coef in terms:
        merged[int(seed)] = merged.get(int(seed), 0.0) + float(coef)
    return [(s, c) for s, c in merged.items() if c != 0.0]


@torch.no_grad()
def apply_z(tensors: Sequence[torch.Tensor], terms: Sequence[tuple[int, float]],
            decay: float = 1.0, indices: Sequence[int] | None = None) -> None:
    """In place, for every tensor i: theta_i <- decay*theta_i + sum_k coef_k*z(seed_k, i).

    One pass over each tensor, chunk by chunk; scratch is one fp32 chunk per
    device (plus one for non-fp32 tensors, which are updated in fp32 and
    rounded once). Small fp32 tensors (LoRA factors) are handled in groups that
    fill one chunk, with one multi-tensor add per group and term instead of one
    add per tensor: the per-tensor overhead is what a LoRA step pays for.
    ``indices`` gives each tensor's z index when it is not its list position.
    """
    terms = merge_terms(terms)
    if not terms and decay == 1.0:
        return
    indices = list(range(len(tensors))) if indices is None else list(indices)
    for index, tensor in zip(indices, tensors):
        if not tensor.is_contiguous():
            raise ValueError(f"trainable tensor {index} is not contiguous")
    scratch: dict = {}

    def chunk_buffer(device):
        if device not in scratch:
            size = min(CHUNK, sum(t.numel() for t in tensors))
            scratch[device] = torch.empty(size, dtype=torch.float32, device=device)
        return scratch[device]

    group, group_size = [], 0  # small fp32 tensors of one device, together <= CHUNK elements
    for index, tensor in zip(indices, tensors):
        if tensor.dtype == torch.float32 and tensor.numel() <= CHUNK:
            if group and (group_size + tensor.numel() > CHUNK or group[0][1].device != tensor.device):
                _apply_group(group, terms, decay, chunk_buffer(group[0][1].device))
                group, group_size = [], 0
            group.append((index, tensor))
            group_size += tensor.numel()
        else:
            _apply_chunked(index, tensor, terms, decay, chunk_buffer(tensor.device))
    if group:
        _apply_group(group, terms, decay, chunk_buffer(group[0][1].device))


def _apply_group(group, terms, decay, buffer):
    flats = [t.view(-1) for _, t in group]
    zs = torch.split(buffer[:sum(f.numel() for f in flats)], [f.numel() for f in flats])
    if decay != 1.0:
        torch._foreach_mul_(flats, decay)
    for seed, coef in terms:
        for (index, _), z in zip(group, zs):
            z_chunk(z, seed, index, 0)
        torch._foreach_add_(flats, zs, alpha=coef)


def _apply_chunked(index, tensor, terms, decay, buffer):
    flat = tensor.view(-1)
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        part = flat[start:start + CHUNK]
        z = buffer[:part.numel()]
        acc = part if part.dtype == torch.float32 else part.float()
        if decay != 1.0:
            acc.mul_(decay)
        for seed, coef in terms:
            acc.add_(z_chunk(z, seed, index, c), alpha=coef)
        if acc is not part:
            part.copy_(acc)
