"""The definition of z: which random number every element of every trainable tensor gets.

Pure Python, no torch: the torch ops (``perturb``) and the Triton kernel
(``perturb_triton``) both import it, and neither imports the other's code.

z(seed, i), for trainable tensor i (its position in the sorted canonical names),
is counter-based: element j of the flattened tensor is a pure function of
(seed, i, j), so every device and every split of the work give the same z, and any
process that holds the tensors (a vLLM worker, say) regenerates it from (seed, i).

Common to both distributions:

* key = mix(seed, i), split into two 32-bit words (k0 = low, k1 = high);
* Philox4x32-10 (Salmon et al. 2011, as in Random123) maps a counter
  (n mod 2^32, n >> 32, c2, 0) and the key (k0, k1) to four 32-bit words x0..x3;
  c2 = 0 for the Gaussian and 1 for Rademacher, so the two never share a stream.

``gaussian`` (the default; MeZO's z):

* elements come in tiles of 1024 = 4 lanes x 256 columns: element j lies in tile
  j // 1024, lane (j % 1024) // 256, column j % 256, and draws from counter
  n = tile * 256 + column;
* u_a = (2 * (x_a >> 9) + 1) * 2^-24 lies in (0, 1) and is exact in fp32;
* Box-Muller in fp32: lanes 0, 1 are r0 cos t0, r0 sin t0 with
  r0 = sqrt(-2 ln u0), t0 = 2 pi u1; lanes 2, 3 likewise from u2, u3.

``rademacher`` (+-1: Spall's SPSA; one bit per element):

* the 128 bits of a counter's output, read as 16 bytes (byte B = bits 8(B % 4) ..
  8(B % 4) + 7 of word x_{B // 4}), give 8 contiguous elements each:
  elements come in tiles of 32768 = 16 rows x 256 columns x 8: element j lies in
  tile j // 32768, row B = (j % 32768) // 2048, column (j % 2048) // 8, bit
  r = j % 8, and draws from counter n = tile * 256 + column;
* z = -1 if bit r (0 = least significant) of byte B is set, else +1.

Both layouts give one counter to a column of a tile: whoever owns a column
computes its Philox once and reads the rows of the tile one after another --
4 elements per Philox evaluation for the Gaussian, 128 for Rademacher -- with
loads and stores that stay contiguous (a Rademacher column's 8 elements of a row
are adjacent: one 16-byte vector of bf16 weights).
"""
from __future__ import annotations

import functools

DISTS = ("gaussian", "rademacher")   # the z distributions (``mezo.z``)
LANE = 256                           # columns of a tile (= counters per tile), both distributions
TILE = 4 * LANE                      # gaussian: elements per tile (4 lanes, one per Philox word)
RROW = 8 * LANE                      # rademacher: elements per row (one byte of each counter's output)
RROWS = 16                           # rademacher: rows per tile (16 bytes = 4 words)
RTILE = RROWS * RROW                 # rademacher: elements per tile
STREAM = {"gaussian": 0, "rademacher": 1}   # counter word c2 of each distribution

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
UNIFORM_SHIFT, UNIFORM_SCALE = 9, 2.0 ** -24   # u = (2 * (x >> 9) + 1) * 2^-24, in (0, 1)

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """SplitMix64 over the values: a well-spread 63-bit generator seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@functools.lru_cache(maxsize=1 << 14)  # a step's seeds recur in its next perturbation
def z_key(seed: int, index: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of z(seed, index)."""
    key = mix(seed, index)
    return key & MASK32, key >> 32


def check_dist(dist: str) -> str:
    if dist not in DISTS:
        raise ValueError(f"unknown z distribution {dist!r} (known: {', '.join(DISTS)})")
    return dist
