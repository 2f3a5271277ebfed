"""The MeZO step (mezo_core.mezo) over a tiny fake Backend with a quadratic loss,
against a hand-written Algorithm 1 of Malladi et al. (2023)."""
from __future__ import annotations

import pytest
import torch

from mezo_core import Example
from mezo_core.forwards import each_direction, objective
from mezo_core.mezo import decayed, direction_seeds, mezo_step
from mezo_core.perturb import apply_z, z_like
from tiny import QuadraticBackend, seeded

class SideBySideBackend(QuadraticBackend):
    """Evaluates both signs and leaves the weights where they were: offset 0."""

    def population_losses(self, batch, seeds, eps, applied=0.0):
        return each_direction(self, batch, seeds, eps, applied, pair=self._side_by_side)

    def _side_by_side(self, batch, seed, eps, applied):
        self.perturb([(seed, eps - applied)])
        lp = objective(self, batch)
        self.perturb([(seed, -2 * eps)])
        lm = objective(self, batch)
        self.perturb([(seed, eps)])
        return lp, lm, 0.0


BATCH = [Example((0,), (1,)), Example((2,), (1,)), Example((1,), (1,))]


def reference_step(tensors, loss_fn, seeds, eps, lr, wd):
    """Algorithm 1 (MeZO), written out: for each direction, theta += eps z; L+;
    theta -= 2 eps z; L-; g = (L+ - L-)/(2 eps); theta += eps z (restore). Then
    theta <- theta - lr * (mean_i g_i z_i + wd * theta). ``wd``: a number, or one
    per tensor."""
    wds = wd if isinstance(wd, list) else [wd] * len(tensors)
    grads = []
    for seed in seeds:
        zs = [z_like(t, seed, i) for i, t in enumerate(tensors)]
        for t, z in zip(tensors, zs):
            t.add_(z, alpha=eps)
        lp = loss_fn()
        for t, z in zip(tensors, zs):
            t.add_(z, alpha=-2 * eps)
        lm = loss_fn()
        for t, z in zip(tensors, zs):
            t.add_(z, alpha=eps)
        grads.append((lp - lm) / (2 * eps))
    for i, t in enumerate(tensors):
        update = sum(g * z_like(t, s, i) for s, g in zip(seeds, grads)) / len(seeds)
        t.sub_(lr * (update + wds[i] * t))
    return grads


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("backend_cls", [QuadraticBackend, SideBySideBackend])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_mezo_step_equals_algorithm_1(q, backend_cls, wd):
    eps, lr = 1e-3, 1e-2
    backend = backend_cls()
    ref = QuadraticBackend()
    seeds = direction_seeds(7, 0, q)
    for step in range(3):
        seeds = direction_seeds(7, step, q)
        result = mezo_step(backend, BATCH, seeds, eps, lr, wd)
        grads = reference_step(ref.tensors, lambda: float(ref.losses(BATCH).mean()), seeds, eps, lr, wd)
        assert result.seeds == seeds
        # the losses at the perturbed points are computed through the same
        # operations, so the projected gradients agree closely
        assert result.grads == pytest.approx(grads, rel=1e-5, abs=1e-6)
        for a, b in zip(backend.tensors, ref.tensors):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(result.grads) == q


def test_fused_restore_and_offset_zero_give_the_same_step():
    eps, lr = 1e-3, 5e-2
    a, b = QuadraticBackend(), SideBySideBackend()
    for step in range(5):
        seeds = direction_seeds(3, step, 2)
        ra = mezo_step(a, BATCH, seeds, eps, lr, 0.01)
        rb = mezo_step(b, BATCH, seeds, eps, lr, 0.01)
        # identical on the first step; later the weights differ by fp32 rounding
        assert ra.grads == pytest.approx(rb.grads, rel=1e-6 if step == 0 else 1e-3)
        assert ra.loss_plus == pytest.approx(rb.loss_plus, rel=1e-12 if step == 0 else 1e-6)
        assert ra.loss_minus == pytest.approx(rb.loss_minus, rel=1e-12 if step == 0 else 1e-6)
    for x, y in zip(a.tensors, b.tensors):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_the_plain_step_touches_the_weights_q_plus_1_times_per_direction_pair():
    """Plain plus_minus: 2 perturbations per direction, one restore between
    directions, and the last restore fused with the update: 3q perturb calls."""
    backend = QuadraticBackend()
    mezo_step(backend, BATCH, direction_seeds(1, 0, 3), 1e-3, 1e-2)
    perturbs = [c for c in backend.calls if c[0] == "perturb"]
    assert len(perturbs) == 3 * 3
    last = perturbs[-1]
    assert len(last[1]) == 4   # three update terms and the fused restore


def test_step_result_loss_is_the_mean_of_plus_and_minus():
    backend = QuadraticBackend()
    before = float(backend.losses(BATCH).mean())
    r = mezo_step(backend, BATCH, direction_seeds(0, 0, 1), 1e-3, 0.0)
    assert r.loss == pytest.approx(0.5 * (r.loss_plus + r.loss_minus))
    assert r.loss == pytest.approx(before, rel=1e-4)
    # lr = 0, wd = 0: the weights come back (within the round-trip bound)
    for t, t0 in zip(backend.tensors, QuadraticBackend().tensors):
        torch.testing.assert_close(t, t0, rtol=1e-6, atol=1e-6)


def test_mezo_decreases_a_quadratic():
    backend = QuadraticBackend(seed=4)
    start = float(backend.losses(BATCH).mean())
    losses = []
    for step in range(200):
        r = mezo_step(backend, BATCH, direction_seeds(11, step, 1), 1e-3, 2e-2)
        losses.append(r.loss)
    end = float(backend.losses(BATCH).mean())
    assert end < 0.2 * start, (start, end)
    assert sum(losses[-20:]) < sum(losses[:20])


def test_weight_decay_alone_shrinks_the_weights():
    backend = QuadraticBackend()
    backend.targets = [t.clone() for t in backend.tensors]   # gradient zero at theta
    theta0 = [t.clone() for t in backend.tensors]
    mezo_step(backend, BATCH, direction_seeds(0, 0, 1), 1e-3, 0.1, weight_decay=0.5)
    for t, t0 in zip(backend.tensors, theta0):
        torch.testing.assert_close(t, (1 - 0.05) * t0, rtol=1e-4, atol=1e-5)


def test_direction_seeds_are_deterministic():
    assert direction_seeds(0, 5, 3) == direction_seeds(0, 5, 3)
    assert len(direction_seeds(0, 5, 4)) == 4
    assert direction_seeds(0, 5, 4)[:3] == direction_seeds(0, 5, 3)
    seeds = [s for step in range(50) for s in direction_seeds(1, step, 3)]
    assert len(set(seeds)) == len(seeds)
    assert direction_seeds(0, 5, 1) != direction_seeds(1, 5, 1)
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in seeds)


# -- the fused schedule: restore + update + next step's +eps z in one pass ---------------
def _run(backend, steps, q, fused, eps=1e-3, lr=2e-2, wd=0.01):
    applied, results = 0.0, []
    for step in range(steps):
        nxt = (direction_seeds(5, step + 1, q)[0], eps) if fused and step + 1 < steps else None
        r = mezo_step(backend, BATCH, direction_seeds(5, step, q), eps, lr, wd, applied=applied,
                      next_direction=nxt)
        applied = r.applied
        results.append(r)
    return results


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("backend_cls", [QuadraticBackend, SideBySideBackend])
def test_fused_schedule_follows_the_unfused_trajectory(q, backend_cls):
    fused, plain = backend_cls(seed=2), backend_cls(seed=2)
    rf, rp = _run(fused, 6, q, True), _run(plain, 6, q, False)
    for a, b in zip(rf, rp):
        assert a.grads == pytest.approx(b.grads, rel=1e-3, abs=1e-6)
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert rf[-1].applied == 0.0          # the last step leaves theta itself
    for x, y in zip(fused.tensors, plain.tensors):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_fused_schedule_makes_two_passes_per_step():
    """q = 1: +eps z rides on the previous step's last pass, so a step is the
    -2 eps z pass and the fused restore + update + next +eps z pass."""
    fused, plain = QuadraticBackend(), QuadraticBackend()
    _run(fused, 5, 1, True)
    _run(plain, 5, 1, False)
    count = lambda b: sum(c[0] == "perturb" for c in b.calls)
    assert count(plain) == 3 * 5
    assert count(fused) == 2 * 5 + 1      # the first step's own +eps z
    last_of_step = [c for c in fused.calls if c[0] == "perturb" and len(c[1]) == 3]
    assert len(last_of_step) == 4         # update, restore, next direction in one call


# -- weight decay that spares biases and norms (mezo.weight_decay_exempt) ----------------
class NamedBackend(QuadraticBackend):
    """Full-parameter-like names: a weight, a bias and a norm weight."""
    NAMES = ["model.layers.0.mlp.weight", "model.layers.0.mlp.bias", "model.layers.0.input_layernorm.weight"]

    def trainable_names(self):
        return list(self.NAMES)


def test_decayed_spares_the_names_that_hold_a_pattern():
    names = ["q_proj.lora_A.default.weight", "mlp.bias", "model.norm.weight", "input_layernorm.weight",
             "attn.c_attn.weight"]
    assert decayed(names, ["bias", "norm"]) == [True, False, False, False, True]
    assert decayed(names, []) == [True] * 5


def test_apply_z_with_per_tensor_decay_and_coefficients():
    """The oracle: theta_i * d_i + sum_k c_ki z(seed_k, i), computed tensor by tensor."""
    gen = seeded(1)
    tensors = [torch.randn(s, generator=gen) for s in [(4, 3), (7,), (2, 5)]]
    before = [t.clone() for t in tensors]
    decays, terms = [0.9, 1.0, 0.9], [(11, 0.5), (12, [-0.25, 0.125, -0.25])]
    apply_z(tensors, terms, decays)
    for i, (t, t0) in enumerate(zip(tensors, before)):
        expect = decays[i] * t0.double()
        for seed, c in terms:
            expect += (c if isinstance(c, float) else c[i]) * z_like(t0, seed, i).double()
        torch.testing.assert_close(t.double(), expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("backend_cls", [QuadraticBackend, SideBySideBackend])
def test_weight_decay_spares_biases_and_norms(fused, q, backend_cls):
    """Against Algorithm 1 written out with wd on the weight only."""
    eps, lr, wd = 1e-3, 1e-2, 0.5
    backend = type("Named", (NamedBackend, backend_cls), {})()
    mask = decayed(backend.trainable_names(), ["bias", "norm"])
    assert mask == [True, False, False]
    ref = QuadraticBackend()
    applied, steps = 0.0, 4
    for step in range(steps):
        seeds = direction_seeds(9, step, q)
        nxt = (direction_seeds(9, step + 1, q)[0], eps) if fused and step + 1 < steps else None
        result = mezo_step(backend, BATCH, seeds, eps, lr, wd, applied=applied, next_direction=nxt,
                           decay_mask=mask)
        applied = result.applied
        grads = reference_step(ref.tensors, lambda: float(ref.losses(BATCH).mean()), seeds, eps, lr,
                               [wd, 0.0, 0.0])
        assert result.grads == pytest.approx(grads, rel=1e-3, abs=1e-6)
    for a, b in zip(backend.tensors, ref.tensors):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_decay_of_lora_only_names_is_unchanged_bit_for_bit():
    """No name holds a pattern: the same single-decay calls as without a mask."""
    with_mask, without = QuadraticBackend(), QuadraticBackend()
    mask = decayed(["a.lora_A.weight", "a.lora_B.weight", "b.lora_A.weight"], ["bias", "norm"])
    applied = [0.0, 0.0]
    for step in range(4):
        nxt = (direction_seeds(2, step + 1, 1)[0], 1e-3)
        ra = mezo_step(with_mask, BATCH, direction_seeds(2, step, 1), 1e-3, 1e-2, 0.1, applied=applied[0],
                       next_direction=nxt, decay_mask=mask)
        rb = mezo_step(without, BATCH, direction_seeds(2, step, 1), 1e-3, 1e-2, 0.1, applied=applied[1],
                       next_direction=nxt)
        applied = [ra.applied, rb.applied]
    assert with_mask.calls == without.calls
    assert all(torch.equal(a, b) for a, b in zip(with_mask.tensors, without.tensors))
