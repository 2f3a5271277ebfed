"""The fused perturbation kernels: theta <- decay*theta + sum_k coef_k z(seed_k) in
one read and one write of every weight, z drawn in registers (Philox4x32,
the definition in ``philox``; the Gaussian kernel turns each Philox word into a
Box-Muller pair, 8 elements per evaluation): one kernel per distribution. Tensors of one dtype
and similar size share a launch through a table of pointers, so a LoRA adapter
of many small factors costs one launch per call rather than one per tensor.

The Gaussian kernel is bound by instruction issue, not by memory, so its GPU path
(``fast``) is written for instruction count (per element and term, from the SASS
for sm_90): Philox multiplies as one ``mul.wide`` each, the uniforms' floats built
with a shift-and-add, lg2/sqrt/sin/cos in their ``.approx.ftz`` forms (no subnormal
fix-ups: every argument is normal), -2 ln 2 and the term's coefficient folded into
one scalar, no multiply by ``decay`` when it is 1, and 4-byte loads and stores where
the tensors start on 16 bytes. Its z agrees with the torch path to ~1e-5.

The Rademacher kernel evaluates Philox once per column of a 32768-element tile
(128 lanes x 256 columns) and term, then walks the 128 lanes, 256 contiguous
elements at a time: z * coef is +-coef exactly (the sign bit of coef flipped by
the element's bit), so the result is the torch path's bit for bit on any device
(FP contraction is off for it: x * decay is rounded before the add, as in torch).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .philox import PHILOX_M, PHILOX_W, ROUNDS, RTILE, TILE, check_dist, z_key

#: launch shape (Gaussian tiles of 2048 elements per program, warps) and whether to use
#: the GPU's approximate sin/cos/log2/sqrt (z then agrees with the torch path
#: to ~1e-6 instead of bit for bit; Triton's CPU interpreter cannot run them);
#: rademacher_*: the Rademacher kernel's launch shape (tiles of 32768 elements)
CONFIG = dict(tiles=1, num_warps=8, fast=os.environ.get("TRITON_INTERPRET") != "1",
              offsets64=False,  # 64-bit offsets for every tensor, not just those of >= 2^31 elements
              rademacher_tiles=1, rademacher_warps=4)

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _counter_words(counter, BIG: tl.constexpr):
    """The low and high 32-bit words of a Philox counter (high is 0 below 2^32)."""
    if BIG:
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = (counter >> 32).to(tl.uint32)
    else:
        c0 = counter.to(tl.uint32)
        c1 = tl.zeros_like(c0)
    return c0, c1


@triton.jit
def _mul_wide(c, M: tl.constexpr, WIDE: tl.constexpr):
    """(high, low) 32-bit words of the 64-bit product c * M; WIDE: one PTX
    mul.wide (one instruction where umulhi and mul take two; not in the interpreter)."""
    if WIDE:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$0, $1}, t; }", "=r,=r,r,r",
            [c, tl.full(c.shape, M, tl.uint32)], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        return hi, lo
    return tl.umulhi(c, M), c * M


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1, M0: tl.constexpr, M1: tl.constexpr,
            W0: tl.constexpr, W1: tl.constexpr, ROUNDS: tl.constexpr, WIDE: tl.constexpr = False):
    for r in tl.static_range(ROUNDS):
        if r > 0:
            k0 = k0 + W0
            k1 = k1 + W1
        hi0, lo0 = _mul_wide(c0, M0, WIDE)
        hi1, lo1 = _mul_wide(c2, M1, WIDE)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _float16(h):
    """The float 1 + h 2^-16 of the 16-bit value h, built from its bits (no int-to-float
    conversion, which runs at a quarter of the FP32 rate): one shift-and-add."""
    return ((h << 7) + 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _floats16(word):
    """_float16 of the low and the high half of a word, in 4 instructions (PTX, so that
    the compiler keeps the shift-and-add rather than its mask-and-or form, 6)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 l, h; and.b32 l, $2, 65535; shr.u32 h, $2, 16; "
        "mad.lo.u32 $0, l, 128, 1065353216; mad.lo.u32 $1, h, 128, 1065353216; }",
        "=r,=r,r", [word], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _uniform16(h):
    """(2 h + 1) * 2^-17 for the 16-bit value h, exactly: 1 - 2^-17 subtracted from
    1 + h 2^-16 (exact: Sterbenz)."""
    return _float16(h) - 0.999992370605468750   # 1 - 2^-17


@triton.jit
def _approx(x, op: tl.constexpr):
    return tl.inline_asm_elementwise(op + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _sqrt_neg_log2(u):
    """sqrt(-log2 u) with the GPU's approximate lg2 and sqrt (the sign folds into sqrt's operand)."""
    return tl.inline_asm_elementwise(
        "{ .reg .f32 t; lg2.approx.ftz.f32 t, $1; neg.f32 t, t; sqrt.approx.ftz.f32 $0, t; }", "=r,r", [u],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _box_muller_step(word, coef, coef_fast, FAST: tl.constexpr):
    """coef * (r cos t, r sin t) of one Philox word: r = sqrt(-2 ln u_low), t = 2 pi
    u_high from its 16-bit halves. FAST (the GPU's approximate lg2/sqrt/sin/cos,
    accurate on [-pi, pi]) folds the constants into the term's ``coef_fast`` =
    -coef sqrt(2 ln 2): -2 ln u = 2 ln 2 (-log2 u), and t - pi flips both signs."""
    if FAST:
        fa, fb = _floats16(word)
        ua = fa - 0.999992370605468750   # 1 - 2^-17, as in _uniform16
        # t - pi = 2 pi u_high - pi, straight from the float 1 + h 2^-16 that _uniform16 subtracts from
        t = 6.283185307179586 * fb - 9.424730023869758   # pi + 2 pi (1 - 2^-17)
        cr = coef_fast * _sqrt_neg_log2(ua)
        return cr * _approx(t, "cos"), cr * _approx(t, "sin")
    ua = _uniform16(word & 0xFFFF)     # low half
    ub = _uniform16(word >> 16)     # high half
    r = tl.sqrt_rn(-2.0 * tl.log(ua))
    t = 6.283185307179586 * ub
    return coef * (r * tl.cos(t)), coef * (r * tl.sin(t))


@triton.jit
def _load(base, e, n, decay, MASKED: tl.constexpr, DECAY: tl.constexpr):
    if MASKED:
        x = tl.load(base + e, mask=e < n)
    else:
        x = tl.load(base + e)
    x = x.to(tl.float32)
    return x * decay if DECAY else x


@triton.jit
def _store(base, e, n, x, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        tl.store(base + e, x.to(DTYPE), mask=e < n)
    else:
        tl.store(base + e, x.to(DTYPE))


@triton.jit
def _gaussian_tiles(base, e0, n, c0, c1, keys, coefs, decay, t, NTERMS: tl.constexpr, DTYPE: tl.constexpr,
                    M0: tl.constexpr, M1: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                    ROUNDS: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, DECAY: tl.constexpr):
    """The 8 lanes of a block of tiles (lane L at e0 + 256 L); without MASKED (every
    element in bounds) loads and stores are unmasked."""
    zero = tl.zeros_like(c0)
    x0 = _load(base, e0, n, decay, MASKED, DECAY)
    x1 = _load(base, e0 + 256, n, decay, MASKED, DECAY)
    x2 = _load(base, e0 + 512, n, decay, MASKED, DECAY)
    x3 = _load(base, e0 + 768, n, decay, MASKED, DECAY)
    x4 = _load(base, e0 + 1024, n, decay, MASKED, DECAY)
    x5 = _load(base, e0 + 1280, n, decay, MASKED, DECAY)
    x6 = _load(base, e0 + 1536, n, decay, MASKED, DECAY)
    x7 = _load(base, e0 + 1792, n, decay, MASKED, DECAY)
    for k in tl.static_range(NTERMS):
        k0 = tl.load(keys + (t * NTERMS + k) * 2).to(tl.uint32)
        k1 = tl.load(keys + (t * NTERMS + k) * 2 + 1).to(tl.uint32)
        coef = tl.load(coefs + k)
        coef_fast = coef * -1.1774100225154747   # -coef sqrt(2 ln 2)
        r0, r1, r2, r3 = _philox(c0, c1, zero, zero, k0, k1, M0, M1, W0, W1, ROUNDS, FAST)
        d0, d1 = _box_muller_step(r0, coef, coef_fast, FAST)
        d2, d3 = _box_muller_step(r1, coef, coef_fast, FAST)
        d4, d5 = _box_muller_step(r2, coef, coef_fast, FAST)
        d6, d7 = _box_muller_step(r3, coef, coef_fast, FAST)
        x0 += d0
        x1 += d1
        x2 += d2
        x3 += d3
        x4 += d4
        x5 += d5
        x6 += d6
        x7 += d7
    _store(base, e0, n, x0, DTYPE, MASKED)
    _store(base, e0 + 256, n, x1, DTYPE, MASKED)
    _store(base, e0 + 512, n, x2, DTYPE, MASKED)
    _store(base, e0 + 768, n, x3, DTYPE, MASKED)
    _store(base, e0 + 1024, n, x4, DTYPE, MASKED)
    _store(base, e0 + 1280, n, x5, DTYPE, MASKED)
    _store(base, e0 + 1536, n, x6, DTYPE, MASKED)
    _store(base, e0 + 1792, n, x7, DTYPE, MASKED)


@triton.jit
def _perturb_kernel(ptrs, numels, keys, coefs, decay, NTERMS: tl.constexpr, TILES: tl.constexpr,
                    DTYPE: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr,
                    W0: tl.constexpr, W1: tl.constexpr, FAST: tl.constexpr, BIG: tl.constexpr,
                    ROUNDS: tl.constexpr, DECAY: tl.constexpr = True, ALIGNED: tl.constexpr = False):
    """Tiles of 2048 = 8 lanes x 256 columns: one Philox per column and term feeds
    the column's 8 elements (two per word)."""
    t = tl.program_id(1)                                  # which tensor of the table
    n = tl.load(numels + t)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every tensor of the table starts on 16 bytes: each thread's adjacent columns are one vector
        base = tl.multiple_of(base, 16)
    first = tl.program_id(0) * TILES
    col = tl.arange(0, 256)[None, :]
    if BIG:  # a tensor of 2^31 elements or more: 64-bit offsets and counters
        first = first.to(tl.int64)
        col = col.to(tl.int64)
    tile = (first + tl.arange(0, TILES))[:, None]
    counter = tile * 256 + col                            # [TILES, 256]
    c0, c1 = _counter_words(counter, BIG)
    e0 = tile * 2048 + col                                # lane L at e0 + 256 L
    if (first + TILES) * 2048 <= n:
        _gaussian_tiles(base, e0, n, c0, c1, keys, coefs, decay, t, NTERMS, DTYPE, M0, M1, W0, W1, ROUNDS, FAST,
                        False, DECAY)
    else:
        _gaussian_tiles(base, e0, n, c0, c1, keys, coefs, decay, t, NTERMS, DTYPE, M0, M1, W0, W1, ROUNDS, FAST,
                        True, DECAY)


@triton.jit
def _rademacher_rows(base, e, n, words, signs, decay, NTERMS: tl.constexpr, DTYPE: tl.constexpr,
                     MASKED: tl.constexpr):
    """The 16 rows of a block of tiles (row B at e + 2048 B); without MASKED (every
    element in bounds) loads and stores are unmasked, so they vectorise."""
    bit = tl.arange(0, 8)[:, None].to(tl.uint32)                      # [8, 1]
    for row in tl.static_range(16):
        off = e + row * 2048
        if MASKED:
            x = tl.load(base + off, mask=off < n)
        else:
            x = tl.load(base + off)
        x = x.to(tl.float32) * decay
        for k in tl.static_range(NTERMS):   # bit r of byte `row` set: -coef, else +coef
            flip = (words[4 * k + row // 4] << (31 - 8 * (row % 4) - bit)) & 0x80000000
            x += (signs[k] ^ flip).to(tl.float32, bitcast=True)
        if MASKED:
            tl.store(base + off, x.to(DTYPE), mask=off < n)
        else:
            tl.store(base + off, x.to(DTYPE))


@triton.jit
def _rademacher_kernel(ptrs, numels, keys, coefs, decay, NTERMS: tl.constexpr, TILES: tl.constexpr,
                       DTYPE: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr,
                       W0: tl.constexpr, W1: tl.constexpr, BIG: tl.constexpr, ALIGNED: tl.constexpr,
                       ROUNDS: tl.constexpr):
    """Blocks of [8, TILES x 256]: dim 1 the counters (columns of TILES tiles), dim 0
    the 8 adjacent elements of a column's byte -- one thread holds all 8 (one vector),
    so the Philox words need no exchange between threads."""
    t = tl.program_id(1)                                  # which tensor of the table
    n = tl.load(numels + t)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every tensor of the table starts on 16 bytes: 16-byte vector loads and stores
        base = tl.multiple_of(base, 16)
    cc = tl.arange(0, TILES * 256)[None, :]               # [1, TILES x 256]
    first = tl.program_id(0) * TILES
    if BIG:  # a tensor of 2^31 elements or more: 64-bit offsets and counters
        first = first.to(tl.int64)
        cc = cc.to(tl.int64)
    counter = first * 256 + cc
    c0, c1 = _counter_words(counter, BIG)
    zero = tl.zeros_like(c0)
    words = ()                                            # 4 Philox words per term
    signs = ()                                            # the bits of each coef
    for k in tl.static_range(NTERMS):
        k0 = tl.load(keys + (t * NTERMS + k) * 2).to(tl.uint32)
        k1 = tl.load(keys + (t * NTERMS + k) * 2 + 1).to(tl.uint32)
        r0, r1, r2, r3 = _philox(c0, c1, zero + 1, zero, k0, k1, M0, M1, W0, W1, ROUNDS)   # stream 1
        words = words + (r0, r1, r2, r3)
        signs = signs + (tl.load(coefs + k).to(tl.uint32, bitcast=True),)
    # row 0 of each element: tile * 32768 + column * 8 + bit
    e = (first + cc // 256) * 32768 + (cc % 256) * 8 + tl.arange(0, 8)[:, None]    # [8, TILES x 256]
    if (first + TILES) * 32768 <= n:
        _rademacher_rows(base, e, n, words, signs, decay, NTERMS, DTYPE, False)
    else:
        _rademacher_rows(base, e, n, words, signs, decay, NTERMS, DTYPE, True)


_TABLES: dict = {}  # layout -> launch groups with their device tables


def _launch_groups(pairs, per_program):
    """[(device, dtype, programs, big, aligned, indices, pointer table, size table)]:
    tensors grouped by (device, dtype, programs needed rounded up to a power of two,
    64-bit offsets, start on 16 bytes), one launch per group, at most half of its
    programs idle. The tables live on the device and are kept per layout (addresses
    and sizes), so a training run uploads them once."""
    layout = (per_program, CONFIG["offsets64"]) + tuple(
        (index, t.data_ptr(), t.numel(), t.dtype, t.device) for index, t in pairs)
    groups = _TABLES.get(layout)
    if groups is not None:
        return groups
    by_key: dict = {}
    for index, tensor in pairs:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"trainable tensor {index}: dtype {tensor.dtype} is not supported")
        programs = max(1, -(-tensor.numel() // per_program))
        key = (tensor.device, tensor.dtype, 1 << (programs - 1).bit_length(),
               CONFIG["offsets64"] or tensor.numel() >= 2**31 - max(4096, per_program),
               tensor.data_ptr() % 16 == 0)
        by_key.setdefault(key, []).append((index, tensor))
    groups = [(*key, [i for i, _ in group],
               torch.tensor([t.data_ptr() for _, t in group], dtype=torch.int64).to(key[0]),
               torch.tensor([t.numel() for _, t in group], dtype=torch.int64).to(key[0]))
              for key, group in by_key.items()]
    if len(_TABLES) >= 64:
        _TABLES.clear()
    _TABLES[layout] = groups
    return groups


def apply_z_triton(pairs, terms, decay: float, dist: str = "gaussian") -> None:
    """``perturb.apply_z`` for (index, tensor) pairs, every tensor on one pass."""
    if not pairs:
        return
    gaussian = check_dist(dist) == "gaussian"
    terms = terms or [(0, 0.0)]  # decay alone: one zero term keeps one kernel
    tiles = CONFIG["tiles"] if gaussian else CONFIG["rademacher_tiles"]
    per_program = tiles * (TILE if gaussian else RTILE)
    for device, dtype, programs, big, aligned, indices, ptrs, numels in _launch_groups(pairs, per_program):
        keys = torch.tensor([[z_key(seed, index) for seed, _ in terms] for index in indices], dtype=torch.int64)
        coefs = torch.tensor([coef for _, coef in terms], dtype=torch.float32)
        keys, coefs = (x.to(device, non_blocking=True) for x in (keys, coefs))
        args = dict(NTERMS=len(terms), TILES=tiles, DTYPE=_DTYPES[dtype], M0=PHILOX_M[0], M1=PHILOX_M[1],
                    W0=PHILOX_W[0], W1=PHILOX_W[1], BIG=big, ROUNDS=ROUNDS[dist])
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if gaussian:
                _perturb_kernel[(programs, len(indices))](
                    ptrs, numels, keys, coefs, float(decay), **args,
                    FAST=CONFIG["fast"] and device.type == "cuda", DECAY=decay != 1.0, ALIGNED=aligned, num_warps=CONFIG["num_warps"])
            else:
                _rademacher_kernel[(programs, len(indices))](
                    ptrs, numels, keys, coefs, float(decay), **args,
                    ALIGNED=aligned, num_warps=CONFIG["rademacher_warps"], enable_fp_fusion=False)
