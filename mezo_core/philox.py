"""The definition of z: which random number every element of every trainable tensor gets.

Pure Python, no torch: the torch ops (``perturb``) and the Triton kernel
(``perturb_triton``) both import it, and neither imports the other's code.

z(seed, i), for trainable tensor i (its position in the sorted canonical names),
is counter-based: element j of the flattened tensor is a pure function of
(seed, i, j), so every device and every split of the work give the same z, and any
process that holds the tensors (a vLLM worker, say) regenerates it from (seed, i).

Common to both distributions:

* key = mix(seed, i), split into two 32-bit words (k0 = low, k1 = high);
* Philox4x32-R (Salmon et al. 2011, as in Random123) maps a counter
  (n mod 2^32, n >> 32, c2, 0) and the key (k0, k1) to four 32-bit words x0..x3;
  c2 = 0 for the Gaussian and 1 for Rademacher, so the two never share a stream.
  R = 7 rounds for the Gaussian, 10 for Rademacher (``ROUNDS``). Seven is the
  fewest with which Philox4x32 passes TestU01's BigCrush in Salmon et al.
  (Table 2); 10 is their default with a safety margin. The Gaussian kernel is
  compute-bound, so its z takes the 7 (30 % less integer work); the Rademacher
  kernel runs at the bandwidth floor with 10, so it keeps them.

``gaussian`` (the default; MeZO's z):

* elements come in tiles of 2048 = 8 lanes x 256 columns: element j lies in tile
  j // 2048, lane (j % 2048) // 256, column j % 256, and draws from counter
  n = tile * 256 + column;
* each word x_a gives two 16-bit uniforms, u = (2 h + 1) * 2^-17 in (0, 1) for its
  low half h = x_a & 0xFFFF and its high half h = x_a >> 16 (exact in fp32);
* Box-Muller in fp32: lanes 2a, 2a + 1 are r cos t, r sin t with
  r = sqrt(-2 ln u_low), t = 2 pi u_high, from word x_a.

  Why 16-bit uniforms: one Philox evaluation then feeds 8 elements instead of 4,
  which halves the integer work that made the fused kernel compute-bound
  (2.17x its bandwidth floor on the H200 with 32-bit uniforms). What it costs:
  |z| <= r_max = sqrt(34 ln 2) = 4.85 (a Gaussian pair exceeds that radius with
  probability exp(-r_max^2 / 2) = 7.6e-6) and angles on a grid of 2^16. Exact
  over the 2^16 values: variance 1 - 5.3e-6, fourth moment 3 (1 - 7.0e-5), mean
  and odd moments 0 (the angle grid is symmetric); ``tests/test_perturb.py``
  checks the moments. A perturbation direction needs isotropy and unit
  variance, not far tails.

``rademacher`` (+-1: Spall's SPSA; one bit per element):

* the 128 bits of a counter's output, read as 16 bytes (byte B = bits 8(B % 4) ..
  8(B % 4) + 7 of word x_{B // 4}), give 8 contiguous elements each:
  elements come in tiles of 32768 = 16 rows x 256 columns x 8: element j lies in
  tile j // 32768, row B = (j % 32768) // 2048, column (j % 2048) // 8, bit
  r = j % 8, and draws from counter n = tile * 256 + column;
* z = -1 if bit r (0 = least significant) of byte B is set, else +1.

Both layouts give one counter to a column of a tile: whoever owns a column
computes its Philox once and reads the rows of the tile one after another --
8 elements per Philox evaluation for the Gaussian, 128 for Rademacher -- with
loads and stores that stay contiguous (a Rademacher column's 8 elements of a row
are adjacent: one 16-byte vector of bf16 weights).
"""
from __future__ import annotations

import functools

DISTS = ("gaussian", "rademacher")   # the z distributions (``mezo.z``)
LANE = 256                           # columns of a tile (= counters per tile), both distributions
LANES = 8                            # gaussian: lanes of a tile (two per Philox word: its 16-bit halves)
TILE = LANES * LANE                  # gaussian: elements per tile
RROW = 8 * LANE                      # rademacher: elements per row (one byte of each counter's output)
RROWS = 16                           # rademacher: rows per tile (16 bytes = 4 words)
RTILE = RROWS * RROW                 # rademacher: elements per tile
STREAM = {"gaussian": 0, "rademacher": 1}   # counter word c2 of each distribution

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10                    # Random123's default (its known-answer tests)
ROUNDS = {"gaussian": 7, "rademacher": 10}   # the rounds each distribution's z uses
UNIFORM_BITS, UNIFORM_SCALE = 16, 2.0 ** -17   # u = (2 * h + 1) * 2^-17 for a 16-bit half h, in (0, 1)

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
