"""The perturbation engine: z is regenerated, never stored.

z(seed, i), for trainable tensor i (its position in the sorted canonical
names), is counter-based: element j of the flattened tensor is a pure function
of (seed, i, j), so every device, every split of the work and both
implementations below give the same z, and any process that holds the tensors
(a vLLM worker, say) regenerates it from (seed, i) alone.

The definition (``z_like`` computes it; tests pin it):

* key = mix(seed, i), split into two 32-bit words (k0 = low, k1 = high);
* elements come in tiles of 1024 = 4 lanes x 256: element j lies in tile
  j // 1024, lane (j % 1024) // 256, column j % 256, and draws from counter
  n = tile * 256 + column;
* Philox4x32-10 (Salmon et al. 2011, as in Random123) maps counter
  (n mod 2^32, n >> 32, 0, 0) and key (k0, k1) to four 32-bit words x0..x3;
  u_a = (2 * (x_a >> 9) + 1) * 2^-24 lies in (0, 1) and is exact in fp32;
* Box-Muller in fp32: lanes 0, 1 are r0 cos t0, r0 sin t0 with
  r0 = sqrt(-2 ln u0), t0 = 2 pi u1; lanes 2, 3 likewise from u2, u3.

One counter feeds four neighbouring columns of a tile, so the kernel spends one
Philox evaluation per four elements and still loads and stores contiguously.

Two implementations: torch ops on any device (below; on the CPU the integer
part runs in numpy's uint64, bit-identical), and a fused Triton kernel on CUDA
(``perturb_triton``) that reads and writes every weight once per call,
whatever the number of terms. The uniforms are bit-identical
between them; z agrees to the last bits of the fp32 log/sin/cos (~1e-6).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

TILE, LANE = 1024, 256       # elements per tile; columns per lane (= counters per tile)
CHUNK = 1 << 18              # torch path: elements per piece of work (a multiple of TILE)
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10


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


@functools.lru_cache(maxsize=1 << 14)  # a step's seeds recur in its next perturbation
def z_key(seed: int, index: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of z(seed, index)."""
    key = mix(seed, index)
    return key & _MASK32, key >> 32


# -- the torch implementation ---------------------------------------------------------
def _mulhilo(a: torch.Tensor, m: int):
    """High and low 32-bit words of a * m for int64 ``a`` < 2^32, without overflow:
    a * m = mid * 2^16 + (a * m_lo mod 2^16) with mid < 2^49."""
    low = a * (m & 0xFFFF)
    mid = a * (m >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding 32-bit words (keys: ints or tensors)."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return ((x >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def _philox_uniforms_numpy(counters: torch.Tensor, k0, k1) -> list[torch.Tensor]:
    """The four uniform lanes on the CPU, the integer work in numpy's uint64:
    a 32x32-bit product fits, so each multiply is one operation instead of the
    int64 splitting above (and numpy's per-call cost is a fraction of torch's
    on the small tensors of a LoRA adapter). Bit-identical to ``philox4x32``."""
    mask = np.uint64(_MASK32)
    n = counters.numpy().astype(np.uint64)
    c0, c1 = n & mask, n >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = (np.asarray(k.numpy() if isinstance(k, torch.Tensor) else k, dtype=np.uint64) for k in (k0, k1))
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & mask, (k1 + np.uint64(PHILOX_W[1])) & mask
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
    scale = np.float32(2.0 ** -24)
    return [torch.from_numpy(((x >> np.uint64(9)) * np.uint64(2) + np.uint64(1)).astype(np.float32) * scale)
            for x in (c0, c1, c2, c3)]


def tile_normals(tiles: torch.Tensor, k0, k1) -> torch.Tensor:
    """z of whole tiles: ``tiles`` holds tile numbers [T] (int64), the keys are ints
    or per-tile int64 tensors [T]; returns fp32 [T, TILE]."""
    counters = tiles[:, None] * LANE + torch.arange(LANE, device=tiles.device)
    if isinstance(k0, torch.Tensor):
        k0, k1 = k0[:, None], k1[:, None]
    if counters.device.type == "cpu":
        u = _philox_uniforms_numpy(counters, k0, k1)
    else:
        zero = torch.zeros_like(counters)
        u = [_uniform(x) for x in philox4x32(counters & _MASK32, counters >> 32, zero, zero, k0, k1)]
    r0 = torch.sqrt(-2.0 * torch.log(u[0]))
    r2 = torch.sqrt(-2.0 * torch.log(u[2]))
    t1, t3 = (2 * math.pi) * u[1], (2 * math.pi) * u[3]
    lanes = torch.stack([r0 * torch.cos(t1), r0 * torch.sin(t1), r2 * torch.cos(t3), r2 * torch.sin(t3)], 1)
    return lanes.view(len(tiles), TILE)


def z_range(seed: int, index: int, start: int, count: int, device="cpu") -> torch.Tensor:
    """Elements [start, start+count) of z(seed, index), fp32 (``start`` a multiple of TILE)."""
    assert start % TILE == 0
    tiles = torch.arange(start // TILE, (start + count + TILE - 1) // TILE, device=device)
    return tile_normals(tiles, *z_key(seed, index)).view(-1)[:count]


def z_like(tensor: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The whole z(seed, index) for ``tensor`` as a new fp32 tensor (tests,
    layout conversions). The engine itself never materialises it."""
    return z_range(seed, index, 0, tensor.numel(), tensor.device).view(tensor.shape)


def merge_terms(terms: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Add up coefficients of repeated seeds so each z is generated once."""
    merged: dict[int, float] = {}
    for seed, coef in terms:
        merged[int(seed)] = merged.get(int(seed), 0.0) + float(coef)
    return [(s, c) for s, c in merged.items() if c != 0.0]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def apply_z(tensors: Sequence[torch.Tensor], terms: Sequence[tuple[int, float]],
            decay: float = 1.0, indices: Sequence[int] | None = None, kernel: str = "auto") -> None:
    """In place, for every tensor i: theta_i <- decay*theta_i + sum_k coef_k*z(seed_k, i).

    Every element is read and written once per call, whatever the number of
    terms: this is what lets a MeZO step fold restore, update and the next
    step's +eps z into one pass. CUDA tensors go through the fused Triton kernel
    (``kernel="auto"``/``"triton"``; ``"torch"`` forces the torch path). The
    torch path works in CHUNK-sized pieces of fp32 scratch; small fp32 tensors
    (LoRA factors) share one piece, with one multi-tensor add per term.
    ``indices`` gives each tensor's z index when it is not its list position.
    """
    terms = merge_terms(terms)
    if not terms and decay == 1.0:
        return
    indices = list(range(len(tensors))) if indices is None else list(indices)
    for index, tensor in zip(indices, tensors):
        if not tensor.is_contiguous():
            raise ValueError(f"trainable tensor {index} is not contiguous")
    pairs = list(zip(indices, tensors))
    if kernel != "torch" and any(t.is_cuda for t in tensors) and (kernel == "triton" or triton_available()):
        from .perturb_triton import apply_z_triton
        apply_z_triton([(i, t) for i, t in pairs if t.is_cuda], terms, decay)
        pairs = [(i, t) for i, t in pairs if not t.is_cuda]
    limit = CHUNK // max(1, len(terms))  # small fp32 tensors of one device: <= CHUNK z values for all terms
    group, group_size = [], 0
    for index, tensor in pairs:
        padded = -(-tensor.numel() // TILE) * TILE
        if tensor.dtype == torch.float32 and padded <= limit:
            if group and (group_size + padded > limit or group[0][1].device != tensor.device):
                _apply_group(group, terms, decay)
                group, group_size = [], 0
            group.append((index, tensor))
            group_size += padded
        else:
            _apply_chunked(index, tensor, terms, decay)
    if group:
        _apply_group(group, terms, decay)


def _apply_group(group, terms, decay):
    """One Philox evaluation for all tensors of the group and all terms: tiles of
    every tensor side by side, each with its tensor's and term's key. The terms
    are then added one after another, in the kernel's order of rounding."""
    device = group[0][1].device
    flats = [t.view(-1) for _, t in group]
    n_tiles = [(f.numel() + TILE - 1) // TILE for f in flats]
    sizes = torch.tensor(n_tiles, device=device)
    owner = torch.repeat_interleave(torch.arange(len(group), device=device), sizes)
    first = torch.cumsum(sizes, 0) - sizes
    tiles = torch.arange(int(sizes.sum()), device=device) - first[owner]
    if decay != 1.0:
        torch._foreach_mul_(flats, decay)
    if not terms:
        return
    keys = torch.tensor([[z_key(seed, index) for index, _ in group] for seed, _ in terms], device=device)
    keys = keys[:, owner].view(-1, 2)                     # [terms x tiles, 2]
    z = tile_normals(tiles.repeat(len(terms)), keys[:, 0], keys[:, 1]).view(len(terms), -1, TILE)
    for (_, coef), z_term in zip(terms, z):
        zs = [part.view(-1)[:f.numel()] for part, f in zip(torch.split(z_term, n_tiles), flats)]
        torch._foreach_add_(flats, zs, alpha=coef)


def _apply_chunked(index, tensor, terms, decay):
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        acc = part if part.dtype == torch.float32 else part.float()
        if decay != 1.0:
            acc.mul_(decay)
        for seed, coef in terms:
            acc.add_(z_range(seed, index, start, part.numel(), part.device), alpha=coef)
        if acc is not part:
            part.copy_(acc)
