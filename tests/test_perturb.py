"""The perturbation engine (mezo_core.perturb): z regenerated from (seed, index),
in-place fused updates, chunking, dtypes."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from mezo_core import perturb
from mezo_core.perturb import apply_z, merge_terms, mix, z_chunk, z_like

U = 2.0 ** -24  # fp32 unit roundoff (half an ulp, relative)


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


# -- chunking ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_z_chunks(monkeypatch, chunk):
    monkeypatch.setattr(perturb, "CHUNK", chunk)
    n = 5 * chunk + 3                         # several chunks and a partial one
    t = torch.empty(n)
    z = z_like(t, 77, 4)
    assert torch.equal(z, z_like(t, 77, 4))   # a fresh regeneration gives the same z
    # each chunk is reproducible on its own (random access: chunk c from (seed, index, c))
    for c, start in enumerate(range(0, n, chunk)):
        part = torch.empty(min(chunk, n - start))
        assert torch.equal(z_chunk(part, 77, 4, c), z[start:start + chunk])
    # the engine applies exactly this z, chunk by chunk, on a tensor of another shape
    x = torch.zeros(n, 1)
    apply_z([torch.zeros(2), x], [(77, 1.0)], indices=[0, 4])
    assert torch.equal(x.view(-1), z)
    # and the chunks are not copies of each other
    if chunk >= 16:
        assert not torch.equal(z[:chunk], z[chunk:2 * chunk])


def test_apply_z_scratch_is_bounded_by_one_chunk(monkeypatch):
    chunk = 64
    monkeypatch.setattr(perturb, "CHUNK", chunk)
    seen = []
    real = perturb.z_chunk

    def spy(out, *args, **kw):
        seen.append((out.numel(), out.untyped_storage().nbytes()))
        return real(out, *args, **kw)

    monkeypatch.setattr(perturb, "z_chunk", spy)
    big = torch.zeros(10 * chunk + 5)
    small = torch.zeros(10)
    apply_z([big, small], [(1, 1.0), (2, 0.5)])
    assert len(seen) == 2 * (11 + 1)
    assert all(numel <= chunk and nbytes <= 4 * chunk for numel, nbytes in seen)
    # one scratch chunk is shared by all tensors of a call: the small tensor
    # uses a 10-element view of it
    assert seen[-1][0] == 10 and len({nbytes for _, nbytes in seen}) == 1


# -- dtypes ------------------------------------------------------------------------
def test_bf16_tensors_are_updated_in_fp32_and_rounded_once():
    t = torch.randn(300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
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
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    for _ in range(6):
        n = rng.randint(1000, 200_000)
        z = z_like(torch.empty(n), rng.randrange(2 ** 62), rng.randrange(1000)).double()
        msg = f"rng seed {seed}, n={n}"
        # 6 sigma: mean ~ N(0, 1/n); var ~ N(1, 2/n)
        assert abs(float(z.mean())) < 6 / math.sqrt(n), msg
        assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n), msg
        assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 6 * 0.466 / math.sqrt(n), msg
        assert float(z.abs().max()) < 7, msg


# -- merge_terms -------------------------------------------------------------------
def test_merge_terms():
    assert merge_terms([]) == []
    assert merge_terms([(1, 0.5), (2, 1.0), (1, 0.25)]) == [(1, 0.75), (2, 1.0)]
    assert merge_terms([(1, 0.5), (1, -0.5), (3, 2)]) == [(3, 2.0)]
    out = merge_terms([(torch.tensor(5).item(), 1), (5, 2)])
    assert out == [(5, 3.0)] and isinstance(out[0][0], int) and isinstance(out[0][1], float)
