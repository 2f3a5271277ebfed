"""The perturbation engine (mezo_core.perturb): z regenerated from (seed, index),
in-place fused updates, chunking, dtypes; both distributions of z (Gaussian,
Rademacher), each against a pure-Python reference of its definition."""
from __future__ import annotations

import math
import random

import pytest
import torch

from mezo_core import perturb
from mezo_core.perturb import apply_z, merge_terms, mix, z_like
from tiny import seeded

U = 2.0 ** -24  # fp32 unit roundoff (half an ulp, relative)
SEED = 20261202  # every random draw below derives from it; the seed in use is printed


def _seed(offset: int = 0) -> int:
    seed = SEED + offset
    print(f"seed {seed}")
    return seed


def _tensors(seed=0, shapes=((5, 7), (64,), (3, 4, 5)), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


# -- +eps, -2eps, +eps -------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-4, 1e-3, 1e-2, 1.0])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0])
def test_plus_minus_plus_returns_to_start(eps, scale):
    # Not bitwise in fp32 (theta + eps*z rounds), so the bound, derived:
    # with m = max(|theta|, eps*|z|) per element and u = 2**-24, the three additions
    # round results of magnitude <= 2m, 2m, m (error <= u*(2m + 2m + m) = 5um) and the
    # three products alpha*z round values <= eps|z|, 2eps|z|, eps|z| (<= 4um); the
    # coefficients themselves cancel exactly (fl(-2eps) = -2 fl(eps)). So
    #     |theta_end - theta_start| <= 9 * u * max(|theta|, eps*|z|)   (~4.5 ulps)
    # Observed worst case is ~2.6 u*m.
    tensors = _tensors(scale=scale, shapes=((257, 33), (1000,)))
    start = [t.clone() for t in tensors]
    seed = 1234
    for coef in (eps, -2 * eps, eps):
        apply_z(tensors, [(seed, coef)])
    for i, (t, t0) in enumerate(zip(tensors, start)):
        z = z_like(t0, seed, i).double()
        m = torch.maximum(t0.double().abs(), eps * z.abs())
        err = (t.double() - t0.double()).abs()
        assert torch.all(err <= 9 * U * m), float((err / m.clamp_min(1e-300)).max() / U)


def test_plus_minus_plus_moves_in_between():
    t = _tensors()[0]
    t0 = t.clone()
    apply_z([t], [(5, 1e-2)])
    assert torch.allclose(t, t0 + 1e-2 * z_like(t0, 5, 0), atol=1e-6)
    apply_z([t], [(5, -2e-2)])
    assert torch.allclose(t, t0 - 1e-2 * z_like(t0, 5, 0), atol=1e-6)


# -- fused == unfused --------------------------------------------------------------
def test_fused_update_equals_unfused_sequence():
    terms = [(11, 0.3), (22, -0.05), (33, 1e-3), (11, 0.2)]   # a repeated seed too
    decay = 1 - 1e-2
    fused = _tensors(seed=3)
    unfused = [t.clone() for t in fused]
    apply_z(fused, terms, decay=decay)
    apply_z(unfused, [], decay=decay)            # decay alone
    for seed, coef in terms:                     # then one term at a time
        apply_z(unfused, [(seed, coef)])
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and both equal the plain formula
    ref = [t.clone() for t in _tensors(seed=3)]
    for i, t in enumerate(ref):
        expect = decay * t + sum(c * z_like(t, s, i) for s, c in terms)
        torch.testing.assert_close(fused[i], expect, rtol=1e-5, atol=1e-6)


def test_empty_terms_and_unit_decay_is_a_no_op():
    ts = _tensors()
    before = [t.clone() for t in ts]
    apply_z(ts, [])
    apply_z(ts, [(7, 0.5), (7, -0.5)])   # cancels in merge_terms
    for a, b in zip(ts, before):
        assert torch.equal(a, b)


def test_indices_select_the_z_of_a_tensor():
    ts = _tensors()
    alone = ts[2].clone()
    apply_z(ts, [(9, 0.1)])
    apply_z([alone], [(9, 0.1)], indices=[2])
    assert torch.equal(alone, ts[2])


def test_non_contiguous_tensor_is_refused():
    t = torch.zeros(4, 6).t()
    with pytest.raises(ValueError, match="not contiguous"):
        apply_z([t], [(1, 1.0)])


# -- same seed => same z --------------------------------------------------------------
def test_same_seed_same_z_different_seed_or_index_different_z():
    t = torch.empty(3000)
    a, b = z_like(t, 42, 0), z_like(t, 42, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, z_like(t, 43, 0))
    assert not torch.equal(a, z_like(t, 42, 1))
    # different (seed, index) are essentially uncorrelated
    for other in (z_like(t, 43, 0), z_like(t, 42, 1)):
        corr = float((a * other).mean() / (a.std() * other.std()))
        assert abs(corr) < 0.15
    # the z applied by the engine is z_like's
    x = torch.zeros(3000)
    apply_z([x], [(42, 1.0)])
    assert torch.equal(x, a)


def test_z_does_not_depend_on_the_other_tensors_or_the_generator_state():
    torch.manual_seed(0)
    a = z_like(torch.empty(100), 5, 3)
    torch.randn(1000)  # global RNG use does not matter
    assert torch.equal(a, z_like(torch.empty(100), 5, 3))
    assert torch.equal(z_like(torch.empty(10, 10), 5, 3).view(-1), a)   # shape only views


def test_mix_is_deterministic_and_spread():
    assert mix(1, 2, 3) == mix(1, 2, 3)
    assert 0 <= mix(1, 2, 3) < 2 ** 63
    values = {mix(s, i, c) for s in range(20) for i in range(20) for c in range(5)}
    assert len(values) == 2000
    assert mix(1, 2) != mix(2, 1)


# -- the definition of z -------------------------------------------------------------
def test_philox_matches_the_random123_known_answers():
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expect in kat:
        out = perturb.philox4x32(*[torch.tensor([c]) for c in counter], *key)
        assert tuple(int(x) for x in out) == expect


def _philox_py(c, k, rounds=10):
    """Philox4x32-``rounds`` on Python ints: the reference the torch ops must equal."""
    c, k = list(c), list(k)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
    return c


def test_numpy_philox_equals_the_torch_ops():
    """The CPU's uint64 Philox against the int64 torch ops, on random counters
    (beyond 2^32 too) and per-row keys."""
    gen = torch.Generator().manual_seed(_seed())
    counters = torch.randint(0, 2 ** 40, (64, 1), generator=gen) + torch.arange(256)
    k0, k1 = (torch.randint(0, 2 ** 32, (64, 1), generator=gen) for _ in range(2))
    zero = torch.zeros_like(counters)
    for keys in ((k0, k1), (int(k0[0]), int(k1[0]))):   # per-row keys, one key for all
        want = perturb.philox4x32(counters & 0xFFFFFFFF, counters >> 32, zero, zero, *keys)
        got = perturb._philox_words_numpy(counters, *keys)
        assert all(torch.equal(w, torch.from_numpy(g.astype("int64"))) for w, g in zip(want, got))


def test_z_follows_its_documented_definition_element_by_element():
    rng = random.Random(_seed())
    seed, index = rng.randrange(2 ** 62), rng.randrange(500)
    n = rng.randint(3000, 9000)
    z = z_like(torch.empty(n), seed, index).double()
    key = mix(seed, index)
    k = (key & 0xFFFFFFFF, key >> 32)
    for j in rng.sample(range(n), 40) + [0, 255, 256, 1023, 1024, 2047, 2048, n - 1]:
        tile, lane, col = j // 2048, (j % 2048) // 256, j % 256
        x = _philox_py(((tile * 256 + col) & 0xFFFFFFFF, (tile * 256 + col) >> 32, 0, 0), k, rounds=7)
        word = x[lane // 2]                        # two lanes per word: its 16-bit halves
        u_low, u_high = ((2 * h + 1) * 2.0 ** -17 for h in (word & 0xFFFF, word >> 16))
        r, t = math.sqrt(-2 * math.log(u_low)), 2 * math.pi * u_high
        expect = r * (math.cos(t) if lane % 2 == 0 else math.sin(t))
        assert abs(float(z[j]) - expect) < 1e-5 * max(1.0, abs(expect)), (j, float(z[j]), expect)


def test_z_range_is_random_access():
    z = z_like(torch.empty(5 * 2048 + 17), 77, 4)
    for start in (0, 2048, 3 * 2048):
        assert torch.equal(perturb.z_range(77, 4, start, 1500), z[start:start + 1500])


def test_z_does_not_depend_on_how_the_work_is_split(monkeypatch):
    n = 5 * 4096 + 3
    expect = z_like(torch.empty(n), 77, 4)
    for chunk in (2048, 4096, 1 << 18):
        monkeypatch.setattr(perturb, "CHUNK", chunk)
        big, small = torch.zeros(n, 1), torch.zeros(10)           # another shape: views only
        apply_z([small, big], [(77, 1.0)], indices=[0, 4])
        assert torch.equal(big.view(-1), expect), chunk
        assert torch.equal(small, z_like(small, 77, 0))


def test_apply_z_scratch_is_bounded_by_one_chunk(monkeypatch):
    chunk = 2 * perturb.TILE
    monkeypatch.setattr(perturb, "CHUNK", chunk)
    seen = []
    real = perturb.tile_normals

    def spy(tiles, *keys):
        seen.append(len(tiles))
        return real(tiles, *keys)

    monkeypatch.setattr(perturb, "tile_normals", spy)
    big, small, tiny = torch.zeros(10 * chunk + 5), torch.zeros(1000), torch.zeros(10)
    apply_z([big, small, tiny], [(1, 1.0), (2, 0.5)])
    # the big tensor in 11 pieces per term; the small ones one tile each, both terms at once,
    # so one per call (two tiles of z = one chunk)
    assert len(seen) == 2 * 11 + 2
    assert all(tiles * perturb.TILE <= chunk for tiles in seen)
    assert seen[-1] == 2



def test_gaussian_z_is_pinned():
    """Known values of today's Gaussian z (the MeZO default): any change of its bits
    changes every trajectory ever recorded."""
    expect = torch.tensor([-0.5363653302192688, -0.08845213055610657, -0.7130858898162842, 0.6616277694702148,
                           -1.3278402090072632, 1.034314751625061])
    assert torch.equal(z_like(torch.empty(6), 0, 0), expect)
    expect = torch.tensor([-2.236703634262085, 0.24144695699214935, -0.0776485800743103, 0.12179552018642426])
    assert torch.equal(perturb.z_range(123, 7, 2 ** 33, 4), expect)   # counters beyond 2^32


# -- rademacher ----------------------------------------------------------------------
def _mix_py(*values):
    """SplitMix64 (Steele et al. 2014) on Python ints, the key's reference."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= v % 2 ** 64
        h = (h + 0x9E3779B97F4A7C15) % 2 ** 64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        h ^= h >> 31
    return h % 2 ** 63


def _rademacher_py(seed, index, j):
    """Element j of the Rademacher z(seed, index), from its definition in mezo_core.philox."""
    key = _mix_py(seed, index)
    tile, q = divmod(j, 32768)
    row, col, bit = q // 2048, (q % 2048) // 8, j % 8
    n = tile * 256 + col
    x = _philox_py((n & 0xFFFFFFFF, n >> 32, 1, 0), (key & 0xFFFFFFFF, key >> 32))
    return -1.0 if (x[row // 4] >> (8 * (row % 4) + bit)) & 1 else 1.0


def _signs(text):
    return torch.tensor([1.0 if c == "+" else -1.0 for c in text])


def test_rademacher_z_is_pinned_and_follows_its_definition():
    # known answers (from _rademacher_py), beyond 2^32 counters too
    assert torch.equal(z_like(torch.empty(32), 0, 0, "rademacher"), _signs("+-+-++--++++++---------+++++--++"))
    assert torch.equal(perturb.z_range(123, 7, 2 ** 40 + 2048 * 5, 32, dist="rademacher"),
                       _signs("-+-++---+++++++++++---++-+---+--"))
    rng = random.Random(_seed())
    for _ in range(3):
        seed, index, n = rng.randrange(2 ** 62), rng.randrange(500), rng.randint(33000, 90000)
        z = z_like(torch.empty(n), seed, index, "rademacher")
        picks = rng.sample(range(n), 60) + [0, 7, 8, 2047, 2048, 32767, 32768, n - 1]
        for j in picks:
            assert float(z[j]) == _rademacher_py(seed, index, j), (seed, index, j)


def test_rademacher_moments_and_independence():
    """Values exactly +-1, balanced signs, no correlation between neighbours (within a
    byte, across columns, rows and tiles), between tensor indices, between seeds, or
    with the Gaussian z of the same (seed, index): each statistic of n independent
    fair signs has standard deviation 1/sqrt(n); the bound is 6 of them."""
    rng = random.Random(_seed())
    for _ in range(4):
        n, seed, index = rng.randint(100_000, 300_000), rng.randrange(2 ** 62), rng.randrange(1000)
        z = z_like(torch.empty(n), seed, index, "rademacher").double()
        bound, msg = 6 / math.sqrt(n), f"n={n}, seed={seed}, index={index}"
        assert set(z.unique().tolist()) == {-1.0, 1.0}, msg
        assert abs(float(z.mean())) < bound, msg                       # sign balance (var = 1 - mean^2)
        for lag in (1, 2, 7, 8, 9, 2048, 32768):                      # bits, bytes, columns, rows, tiles
            assert abs(float((z[lag:] * z[:-lag]).mean())) < 6 / math.sqrt(n - lag), (msg, lag)
        for bit in range(8):                                           # each bit position of a byte
            part = z[bit::8]
            assert abs(float(part.mean())) < 6 / math.sqrt(len(part)), (msg, bit)
        others = [z_like(torch.empty(n), seed, index + 1, "rademacher"),
                  z_like(torch.empty(n), seed + 1, index, "rademacher"),
                  z_like(torch.empty(n), seed, index, "gaussian")]
        for other in others:
            assert abs(float((z * other.double()).mean() / other.double().std())) < bound, msg


def test_rademacher_fused_update_equals_sequential_terms_bit_for_bit():
    """z * coef is +-coef exactly, so the fused call rounds exactly like decay, then
    one term after another (fp32 tensors)."""
    rng = random.Random(_seed())
    terms = [(rng.randrange(2 ** 62), rng.uniform(-1, 1)) for _ in range(3)] + [(5, 0.25)]
    fused = _tensors(seed=4, shapes=((5, 7), (40_000,), (3000,), (2, 300_000)))
    plain = [t.clone() for t in fused]
    apply_z(fused, terms, decay=0.97, dist="rademacher")
    apply_z(plain, [], decay=0.97, dist="rademacher")
    for term in terms:
        apply_z(plain, [term], dist="rademacher")
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert torch.equal(a, b), i
    # and both are theta*decay +- coef, element by element, with the signs of z_like
    t = _tensors(seed=4, shapes=((40_000,),))[0]
    expect = t * 0.97
    for seed, coef in terms:
        expect = expect + coef * z_like(t, seed, 0, "rademacher")
    apply_z([t], terms, decay=0.97, dist="rademacher")
    assert torch.equal(t, expect)


def test_rademacher_z_is_random_access_and_split_free(monkeypatch):
    n = 3 * 32768 + 5000
    expect = z_like(torch.empty(n), 77, 4, "rademacher")
    for start in (0, 2048, 32768 + 4096):
        assert torch.equal(perturb.z_range(77, 4, start, 40_000, dist="rademacher"), expect[start:start + 40_000])
    for chunk in (4096, 32768, 1 << 18):
        monkeypatch.setattr(perturb, "CHUNK", chunk)
        big, small, tiny = torch.zeros(n, 1), torch.zeros(3000), torch.zeros(10)
        apply_z([small, big, tiny], [(77, 1.0)], indices=[0, 4, 9], dist="rademacher")
        assert torch.equal(big.view(-1), expect), chunk
        assert torch.equal(small, z_like(small, 77, 0, "rademacher"))
        assert torch.equal(tiny, z_like(tiny, 77, 9, "rademacher"))


def test_rademacher_bf16_is_rounded_once_from_fp32():
    t = torch.randn(5000, generator=torch.Generator().manual_seed(_seed())).to(torch.bfloat16)
    got, acc = t.clone(), t.float()
    apply_z([got], [(3, 0.1), (4, -0.02)], decay=0.99, dist="rademacher")
    apply_z([acc], [(3, 0.1), (4, -0.02)], decay=0.99, dist="rademacher")
    assert torch.equal(got, acc.to(torch.bfloat16))


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="unknown z distribution 'uniform'"):
        apply_z([torch.zeros(3)], [(1, 1.0)], dist="uniform")


def test_the_kernel_module_does_not_import_the_torch_path():
    """philox.py holds the definition both implementations import: no cycle."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    code = "import sys, mezo_core.perturb_triton; print('mezo_core.perturb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


TRITON_CHECK = r"""
import os, sys, random
os.environ["TRITON_INTERPRET"] = "1"       # Triton's CPU interpreter runs the CUDA kernel's code
import torch
from mezo_core.perturb import apply_z, z_like
from mezo_core import perturb_triton
from mezo_core.perturb_triton import apply_z_triton
seed, dist = int(sys.argv[1]), sys.argv[2]
rng = random.Random(seed)
g = torch.Generator().manual_seed(seed)
shapes = [(rng.randint(1, 40), rng.randint(1, 300)) for _ in range(4)] + [(rng.randint(4097, 20000),)]
dtypes = [torch.float32] * 3 + [torch.bfloat16, torch.float16]
if dist == "rademacher":   # whole blocks (unmasked, vectorised) and tails (masked), in every dtype
    perturb_triton.CONFIG["rademacher_tiles"] = rng.choice([1, 2])
    shapes += [(32768 * 2,), (rng.randint(65537, 140000),), (rng.randint(65537, 140000),)]
    dtypes += [torch.float32, torch.bfloat16, torch.float16]
ts = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
terms = [(rng.randrange(2 ** 62), rng.uniform(-1, 1)) for _ in range(rng.randint(1, 3))]
decay = rng.choice([1.0, 0.99])
fused, plain = [t.clone() for t in ts], [t.clone() for t in ts]
perturb_triton.CONFIG["offsets64"] = bool(seed % 2)   # the 64-bit path on half of the runs
apply_z_triton(list(enumerate(fused)), terms, decay, dist)
apply_z(plain, terms, decay, kernel="torch", dist=dist)
for i, (a, b, t) in enumerate(zip(fused, plain, ts)):
    assert not torch.equal(a, t)
    if dist == "rademacher":   # bit for bit: the fp32 arithmetic is the same
        if a.dtype == torch.bfloat16:   # the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest
            acc = t.float()
            apply_z([acc], terms, decay, indices=[i], kernel="torch", dist=dist)
            assert torch.equal(b, acc.to(torch.bfloat16)), i
            b = (acc.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
        assert torch.equal(a, b), (i, a.dtype)
    elif a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    else:   # rounded once from fp32 values that agree to ~1e-7: at most one ulp apart
        ulp = b.float().abs().clamp_min(1e-3) * (2 ** -7 if a.dtype == torch.bfloat16 else 2 ** -10)
        assert bool(((a.float() - b.float()).abs() <= ulp).all()), i
z = torch.zeros(5000)
apply_z_triton([(7, z)], [(terms[0][0], 1.0)], 1.0, dist)
torch.testing.assert_close(z, z_like(z, terms[0][0], 7, dist), rtol=0, atol=2e-6)
print("ok")
"""


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_triton_kernel_matches_the_torch_path(dist):
    """The CUDA kernel's code, run by Triton's interpreter on the CPU, against the
    torch implementation on fresh random tensors, terms and decay."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    seed = _seed()
    for s in (seed, seed + 1):   # 32- and 64-bit offsets
        proc = subprocess.run([sys.executable, "-c", TRITON_CHECK, str(s), dist], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and "ok" in proc.stdout, f"seed {s}:\n{proc.stderr[-3000:]}"


# -- dtypes ------------------------------------------------------------------------
def test_bf16_tensors_are_updated_in_fp32_and_rounded_once():
    t = torch.randn(300, generator=seeded(1)).to(torch.bfloat16)
    t0 = t.clone()
    decay, terms = 0.99, [(3, 0.1), (4, -0.02)]
    apply_z([t], terms, decay=decay)
    assert t.dtype == torch.bfloat16
    assert not torch.equal(t, t0)
    acc = t0.float()
    acc.mul_(decay)
    for s, c in terms:
        acc.add_(z_like(acc, s, 0), alpha=c)
    assert torch.equal(t, acc.to(torch.bfloat16))
    # round trip within bf16 resolution
    for c in (0.05, -0.1, 0.05):
        apply_z([t], [(8, c)])
    torch.testing.assert_close(t.float(), (t0.float() * decay + 0.1 * z_like(t, 3, 0)
                                           - 0.02 * z_like(t, 4, 0)), rtol=0.03, atol=0.03)


def test_fp16_tensor_updated():
    t = torch.zeros(50, dtype=torch.float16)
    apply_z([t], [(3, 0.5)])
    torch.testing.assert_close(t.float(), 0.5 * z_like(t, 3, 0), rtol=1e-3, atol=1e-3)


# -- statistics ---------------------------------------------------------------------
def test_z_is_roughly_standard_normal_on_random_sizes():
    seed = _seed()
    rng = random.Random(seed)
    for _ in range(6):
        n = rng.randint(1000, 200_000)
        z = z_like(torch.empty(n), rng.randrange(2 ** 62), rng.randrange(1000)).double()
        msg = f"rng seed {seed}, n={n}"
        # 6 sigma: mean ~ N(0, 1/n); var ~ N(1, 2/n)
        assert abs(float(z.mean())) < 6 / math.sqrt(n), msg
        assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n), msg
        assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 6 * 0.466 / math.sqrt(n), msg
        assert abs(float((z ** 4).mean()) - 3) < 6 * math.sqrt(96 / n), msg   # var(z^4) = 105 - 9
        assert float(z.abs().max()) <= 4.8546, msg   # r_max = sqrt(-2 ln 2^-17): 16-bit uniforms


def test_gaussian_z_has_no_correlation_between_neighbours_streams_or_seeds():
    """Philox4x32-7 feeds the Gaussian: no correlation between the two lanes of a
    word, lanes of a column, columns, tiles, tensor indices or seeds (each statistic
    of n independent standard normal products has standard deviation 1/sqrt(n);
    the bound is 6 of them)."""
    rng = random.Random(_seed())
    for _ in range(3):
        n, seed, index = 2048 * rng.randint(60, 150), rng.randrange(2 ** 62), rng.randrange(1000)
        z = z_like(torch.empty(n), seed, index).double()
        msg = f"n={n}, seed={seed}, index={index}"
        lanes = z.view(-1, 8, 256)
        for a, b in ((0, 1), (0, 2), (1, 2), (6, 7), (0, 7)):            # within a word, across words
            assert abs(float((lanes[:, a] * lanes[:, b]).mean())) < 6 / math.sqrt(n / 8), (msg, a, b)
            assert abs(float((lanes[:, a] ** 2 * lanes[:, b] ** 2).mean()) - 1) < 6 * math.sqrt(8 * 8 / n), (msg, a, b)
        for lag in (1, 256, 2048):                                          # columns, lanes, tiles
            assert abs(float((z[lag:] * z[:-lag]).mean())) < 6 / math.sqrt(n - lag), (msg, lag)
        for other in (z_like(torch.empty(n), seed, index + 1), z_like(torch.empty(n), seed + 1, index)):
            assert abs(float((z * other.double()).mean())) < 6 / math.sqrt(n), msg


def test_z_radius_and_angle_grids_reach_their_extremes():
    """The 16-bit uniforms' extremes, hit through the definition: r_max at the
    smallest u and angles spread over the whole circle (every octant reached)."""
    z = z_like(torch.empty(2048 * 400), 3, 1).view(400, 8, 256)   # tiles x lanes x columns
    pairs = z.view(400, 4, 2, 256)
    r = pairs.pow(2).sum(2).sqrt()
    assert float(r.max()) <= math.sqrt(-2 * math.log(2.0 ** -17)) + 1e-5
    angle = torch.atan2(pairs[:, :, 1], pairs[:, :, 0])
    counts = torch.histc(angle, bins=8, min=-math.pi, max=math.pi)
    assert bool((counts > 0.9 * counts.mean()).all()), counts


# -- merge_terms -------------------------------------------------------------------
def test_merge_terms():
    assert merge_terms([]) == []
    assert merge_terms([(1, 0.5), (2, 1.0), (1, 0.25)]) == [(1, 0.75), (2, 1.0)]
    assert merge_terms([(1, 0.5), (1, -0.5), (3, 2)]) == [(3, 2.0)]
    out = merge_terms([(torch.tensor(5).item(), 1), (5, 2)])
    assert out == [(5, 3.0)] and isinstance(out[0][0], int) and isinstance(out[0][1], float)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_cuda_kernel_matches_the_torch_path_and_the_cpu(dtype, dist):
    gen = torch.Generator().manual_seed(_seed())
    shapes = [(3, 5), (4096, 257), (70000,), (16, 2048), (2048, 16)]
    ts = [torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
    terms, decay = [(11, 0.3), (22, -0.05), (33, 1e-3)], 0.99
    fused, plain = [t.clone() for t in ts], [t.clone() for t in ts]
    apply_z(fused, terms, decay, dist=dist)                       # the Triton kernel
    apply_z(plain, terms, decay, kernel="torch", dist=dist)
    for a, b in zip(fused, plain):
        if dist == "rademacher":     # +-coef exactly, no contraction: bit for bit
            assert torch.equal(a, b)
        elif dtype == torch.float32:   # the kernel's approximate sin/cos/log: z within ~2e-5
            torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
        else:
            assert bool(((a.float() - b.float()).abs() <= b.float().abs().clamp_min(1e-3) * 2 ** -7).all())
    z = torch.zeros(70000, device="cuda")
    apply_z([z], [(22, 1.0)], indices=[2], dist=dist)
    torch.testing.assert_close(z.cpu(), z_like(torch.empty(70000), 22, 2, dist), rtol=0,
                               atol=0 if dist == "rademacher" else 5e-5)
