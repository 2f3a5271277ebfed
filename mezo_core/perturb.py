"""The perturbation engine: z is regenerated, never stored.

What z is -- the key, the counters, Philox4x32 and how its words become a
Gaussian or a Rademacher (+-1) element -- is pinned in ``mezo_core.philox``;
``z_like`` computes it and the tests check it element by element. The
distribution is chosen per run (``mezo.z``, default ``gaussian``) and passed as
``dist`` to every function below.

Two implementations: torch ops on any device (below; on the CPU the integer
part runs in numpy's uint64, bit-identical), and a fused Triton kernel on CUDA
(``perturb_triton``) that reads and writes every weight once per call,
whatever the number of terms. The uniforms and the Rademacher signs are
bit-identical between them; the Gaussian z agrees to the last bits of the fp32
log/sin/cos (~1e-6).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .philox import (LANE, MASK32 as _MASK32, PHILOX_M, PHILOX_ROUNDS, PHILOX_W, ROUNDS, RROW, RROWS,  # noqa: F401
                     RTILE, STREAM, TILE, UNIFORM_BITS, UNIFORM_SCALE, check_dist, mix, z_key)

CHUNK = 1 << 18              # torch path: elements per piece of work (a multiple of TILE)


# -- Philox on tensors ------------------------------------------------------------------
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


def _uniform_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 16-bit uniforms of a Philox word (int64 holding 32 bits): low half, high half."""
    half = (1 << UNIFORM_BITS) - 1
    return tuple(((h * 2 + 1).to(torch.float32) * UNIFORM_SCALE) for h in (x & half, x >> UNIFORM_BITS))


def _philox_words_numpy(counters: torch.Tensor, k0, k1, stream: int = 0,
                        rounds: int = PHILOX_ROUNDS) -> list[np.ndarray]:
    """Philox4x32-``rounds`` of counters (n mod 2^32, n >> 32, stream, 0) on the CPU, the
    integer work in numpy's uint64: a 32x32-bit product fits, so each multiply is
    one operation instead of the int64 splitting above (and numpy's per-call cost
    is a fraction of torch's on the small tensors of a LoRA adapter). Returns the
    four words as uint64 arrays, bit-identical to ``philox4x32``."""
    mask = np.uint64(_MASK32)
    n = counters.numpy().astype(np.uint64)
    c0, c1 = n & mask, n >> np.uint64(32)
    c3 = np.zeros_like(c0)
    c2 = c3 if stream == 0 else np.full_like(c0, stream)
    k0, k1 = (np.asarray(k.numpy() if isinstance(k, torch.Tensor) else k, dtype=np.uint64) for k in (k0, k1))
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & mask, (k1 + np.uint64(PHILOX_W[1])) & mask
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
    return [c0, c1, c2, c3]


def _counters(tiles: torch.Tensor, k0, k1):
    """The counters [T, LANE] of whole tiles, and the keys shaped to match."""
    counters = tiles[:, None] * LANE + torch.arange(LANE, device=tiles.device)
    if isinstance(k0, torch.Tensor):
        k0, k1 = k0[:, None], k1[:, None]
    return counters, k0, k1


# -- gaussian ----------------------------------------------------------------------------
def tile_normals(tiles: torch.Tensor, k0, k1) -> torch.Tensor:
    """Gaussian z of whole tiles: ``tiles`` holds tile numbers [T] (int64), the keys are
    ints or per-tile int64 tensors [T]; returns fp32 [T, TILE]."""
    counters, k0, k1 = _counters(tiles, k0, k1)
    if counters.device.type == "cpu":   # values < 2^32: the uint64 bits read as int64 are the same numbers
        words = [torch.from_numpy(w.view(np.int64))
                 for w in _philox_words_numpy(counters, k0, k1, rounds=ROUNDS["gaussian"])]
    else:
        zero = torch.zeros_like(counters)
        words = philox4x32(counters & _MASK32, counters >> 32, zero, zero, k0, k1, ROUNDS["gaussian"])
    lanes = []
    for word in words:   # one Box-Muller pair per word: r from its low half, t from its high half
        u_low, u_high = _uniform_pair(word)
        r, t = torch.sqrt(-2.0 * torch.log(u_low)), (2 * math.pi) * u_high
        lanes += [r * torch.cos(t), r * torch.sin(t)]
    lanes = torch.stack(lanes, 1)
    return lanes.view(len(tiles), TILE)


# -- rademacher --------------------------------------------------------------------------
def tile_words(tiles: torch.Tensor, k0, k1) -> torch.Tensor:
    """The Rademacher Philox words of whole tiles: int64 [T, 4, LANE] (keys as in
    ``tile_normals``)."""
    counters, k0, k1 = _counters(tiles, k0, k1)
    stream = STREAM["rademacher"]
    if counters.device.type == "cpu":   # values < 2^32: the uint64 bits read as int64 are the same numbers
        words = [torch.from_numpy(w.view(np.int64))
                 for w in _philox_words_numpy(counters, k0, k1, stream, ROUNDS["rademacher"])]
    else:
        zero = torch.zeros_like(counters)
        words = philox4x32(counters & _MASK32, counters >> 32, zero + stream, zero, k0, k1, ROUNDS["rademacher"])
    return torch.stack(words, 1)


def row_signs(words: torch.Tensor, row_tile: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Rademacher z of rows: row r is row ``row[r]`` (0..15: byte B of every column's
    output) of tile ``row_tile[r]`` (an index into ``words``, from ``tile_words``);
    fp32 [R, RROW]. Each tile's Philox is evaluated once, however many rows are read."""
    picked = words[row_tile, row // 4]                                 # [R, LANE]
    byte = (picked >> (8 * (row % 4))[:, None]) & 0xFF
    bits = (byte[:, :, None] >> torch.arange(8, device=byte.device)) & 1   # [R, LANE, 8]
    return (1 - 2 * bits).to(torch.float32).view(len(row), RROW)


def _rows(n_rows: torch.Tensor):
    """For tensors of ``n_rows`` Rademacher rows each: every row's tile (an index
    among all tensors' tiles, each tensor's first) and row within it; every tile's
    owner and tile number."""
    n_tiles = (n_rows + RROWS - 1) // RROWS
    device = n_rows.device
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    tile_owner = torch.repeat_interleave(torch.arange(len(n_rows), device=device), n_tiles)
    tiles = torch.arange(int(n_tiles.sum()), device=device) - first_tile[tile_owner]
    row_owner = torch.repeat_interleave(torch.arange(len(n_rows), device=device), n_rows)
    row = torch.arange(int(n_rows.sum()), device=device) - (torch.cumsum(n_rows, 0) - n_rows)[row_owner]
    return first_tile[row_owner] + row // RROWS, row % RROWS, tile_owner, tiles


# -- z of a range, of a tensor -------------------------------------------------------------
def z_range(seed: int, index: int, start: int, count: int, device="cpu", dist: str = "gaussian") -> torch.Tensor:
    """Elements [start, start+count) of z(seed, index), fp32 (``start`` a multiple of
    TILE for the Gaussian, of RROW for Rademacher)."""
    if check_dist(dist) == "gaussian":
        assert start % TILE == 0
        tiles = torch.arange(start // TILE, (start + count + TILE - 1) // TILE, device=device)
        return tile_normals(tiles, *z_key(seed, index)).view(-1)[:count]
    assert start % RROW == 0
    rows = torch.arange(start // RROW, (start + count + RROW - 1) // RROW, device=device)
    first = start // RTILE
    tiles = torch.arange(first, (start + max(count, 1) - 1) // RTILE + 1, device=device)
    words = tile_words(tiles, *z_key(seed, index))
    return row_signs(words, rows // RROWS - first, rows % RROWS).view(-1)[:count]


def z_like(tensor: torch.Tensor, seed: int, index: int, dist: str = "gaussian") -> torch.Tensor:
    """The whole z(seed, index) for ``tensor`` as a new fp32 tensor (tests,
    layout conversions). The engine itself never materialises it."""
    return z_range(seed, index, 0, tensor.numel(), tensor.device, dist).view(tensor.shape)


def configured_dist(cfg) -> str:
    """The run's z distribution, ``cfg.mezo.z`` (``gaussian`` for a config without one)."""
    mezo = getattr(cfg, "mezo", None)
    return check_dist(str(getattr(mezo, "z", "gaussian")) if mezo is not None else "gaussian")


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
def apply_z(tensors: Sequence[torch.Tensor], terms: Sequence[tuple[int, float | Sequence[float]]],
            decay: float | Sequence[float] = 1.0, indices: Sequence[int] | None = None, kernel: str = "auto",
            dist: str = "gaussian") -> None:
    """In place, for every tensor i: theta_i <- decay*theta_i + sum_k coef_k*z(seed_k, i).

    ``decay`` and any ``coef_k`` may instead hold one value per tensor (weight decay
    that exempts some tensors, and the restore term it scales): the tensors that
    share their values then go through one call each, still one pass per tensor.

    Every element is read and written once per call, whatever the number of
    terms: this is what lets a MeZO step fold restore, update and the next
    step's +eps z into one pass. CUDA tensors go through the fused Triton kernel
    (``kernel="auto"``/``"triton"``; ``"torch"`` forces the torch path). The
    torch path works in CHUNK-sized pieces of fp32 scratch; small fp32 tensors
    (LoRA factors) share one piece, with one multi-tensor add per term.
    ``indices`` gives each tensor's z index when it is not its list position;
    ``dist`` is the distribution of z (``philox.DISTS``).
    """
    check_dist(dist)
    if not isinstance(decay, (int, float)) or any(not isinstance(c, (int, float)) for _, c in terms):
        _apply_per_tensor(tensors, terms, decay, indices, kernel, dist)
        return
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
        apply_z_triton([(i, t) for i, t in pairs if t.is_cuda], terms, decay, dist)
        pairs = [(i, t) for i, t in pairs if not t.is_cuda]
    unit = TILE if dist == "gaussian" else RROW   # the torch path's z comes in whole tiles / rows
    limit = CHUNK // max(1, len(terms))  # small fp32 tensors of one device: <= CHUNK z values for all terms
    group, group_size = [], 0
    for index, tensor in pairs:
        padded = -(-tensor.numel() // unit) * unit
        if tensor.dtype == torch.float32 and padded <= limit:
            if group and (group_size + padded > limit or group[0][1].device != tensor.device):
                _apply_group(group, terms, decay, dist)
                group, group_size = [], 0
            group.append((index, tensor))
            group_size += padded
        else:
            _apply_chunked(index, tensor, terms, decay, dist)
    if group:
        _apply_group(group, terms, decay, dist)


def _apply_per_tensor(tensors, terms, decay, indices, kernel, dist):
    """``apply_z`` with per-tensor decay or coefficients: one call per set of
    tensors with equal values, each tensor under its own z index."""
    n = len(tensors)
    indices = list(range(n)) if indices is None else list(indices)
    per = lambda v: [float(v)] * n if isinstance(v, (int, float)) else [float(x) for x in v]  # noqa: E731
    decays, coefs = per(decay), [per(c) for _, c in terms]
    if len(decays) != n or any(len(c) != n for c in coefs):
        raise ValueError(f"per-tensor decay and coefficients need {n} values, one per tensor")
    groups: dict[tuple, list[int]] = {}
    for pos in range(n):
        groups.setdefault((decays[pos], *(c[pos] for c in coefs)), []).append(pos)
    for (d, *cs), members in groups.items():
        apply_z([tensors[p] for p in members], [(seed, c) for (seed, _), c in zip(terms, cs)], d,
                [indices[p] for p in members], kernel, dist)


def _apply_group(group, terms, decay, dist):
    """One Philox evaluation for all tensors of the group and all terms: tiles of
    every tensor side by side, each with its tensor's and term's key. The terms
    are then added one after another, in the kernel's order of rounding."""
    device = group[0][1].device
    flats = [t.view(-1) for _, t in group]
    if decay != 1.0:
        torch._foreach_mul_(flats, decay)
    if not terms:
        return
    unit = TILE if dist == "gaussian" else RROW
    n_units = [(f.numel() + unit - 1) // unit for f in flats]
    sizes = torch.tensor(n_units, device=device)
    if dist == "gaussian":
        owner = torch.repeat_interleave(torch.arange(len(group), device=device), sizes)
        tiles = torch.arange(int(sizes.sum()), device=device) - (torch.cumsum(sizes, 0) - sizes)[owner]
    else:
        row_tile, row, owner, tiles = _rows(sizes)
    keys = torch.tensor([[z_key(seed, index) for index, _ in group] for seed, _ in terms], device=device)
    keys = keys[:, owner].view(-1, 2)                     # [terms x tiles, 2]
    if dist == "gaussian":
        z = tile_normals(tiles.repeat(len(terms)), keys[:, 0], keys[:, 1]).view(len(terms), -1)
    else:
        words = tile_words(tiles.repeat(len(terms)), keys[:, 0], keys[:, 1])
        term_tile = (torch.arange(len(terms), device=device) * len(tiles))[:, None] + row_tile
        z = row_signs(words, term_tile.view(-1), row.repeat(len(terms))).view(len(terms), -1)
    for (_, coef), z_term in zip(terms, z):
        zs = [part[:f.numel()] for part, f in zip(torch.split(z_term, [n * unit for n in n_units]), flats)]
        torch._foreach_add_(flats, zs, alpha=coef)


def _apply_chunked(index, tensor, terms, decay, dist):
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        acc = part if part.dtype == torch.float32 else part.float()
        if decay != 1.0:
            acc.mul_(decay)
        for seed, coef in terms:
            acc.add_(z_range(seed, index, start, part.numel(), part.device, dist), alpha=coef)
        if acc is not part:
            part.copy_(acc)
