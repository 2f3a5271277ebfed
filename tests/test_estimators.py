"""Estimators (``mezo.estimator``): each against a hand-worked reference written with
plain torch and explicit z tensors, the built-in ``mezo`` bit for bit the MeZO step
it replaced, and a run with each through the CLI (resume bitwise, listed, refused
where it cannot run)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mezo_core import Example, LocalTensorsBackend, MezoError
from mezo_core.cli import main
from mezo_core.mezo import direction_seeds, mezo_step, update
from mezo_core.perturb import z_like
from mezo_core.registry import Registry, make_plugin_manager
from mezo_core.testing import write_run_config
from tiny import QuadraticBackend

SEED = 20261207
SHAPES = [(3, 4), (5,)]
BATCH = [Example((0,), (1,)), Example((2,), (1,)), Example((1,), (1,))]


def Quadratic(dist="gaussian"):
    return QuadraticBackend(SEED, dist, SHAPES)


def forwards(backend) -> int:
    return sum(call[0] == "losses" for call in backend.calls)


def estimator(name, **options):
    cls = Registry(make_plugin_manager()).get("estimators", name)
    return cls(cls.options(**options) if cls.options else None)


def test_mezo_estimator_is_the_mezo_step_bit_for_bit():
    print("seed", SEED)
    spsa = estimator("mezo")
    a, b = Quadratic(), Quadratic()
    applied_a = applied_b = 0.0
    for step in range(4):
        seeds, nxt = direction_seeds(3, step, 2), (direction_seeds(3, step + 1, 2)[0], 1e-3)
        result = mezo_step(a, BATCH, seeds, 1e-3, 1e-2, 0.1, applied=applied_a, next_direction=nxt)
        applied_a = result.applied
        got = spsa.probe(b, BATCH, seeds, 1e-3, applied=applied_b)
        applied_b = update(b, got, 1e-2, 0.1, next_direction=nxt, coefficients=spsa.coefficients(got, 1e-2))
        assert got.grads == result.grads
        assert all(x.equal(y) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("n", [2, 5])
def test_fzoo_equals_the_formula_written_out(n):
    """FZOO (arXiv:2506.09034): l_0 = L(theta), l_i = L(theta + eps u_i), sigma = std(l_i),
    theta <- theta - lr / (n sigma) * sum (l_i - l_0) u_i, with Rademacher u_i."""
    print("seed", SEED)
    eps, lr, wd = 1e-2, 1e-3, 0.0
    fzoo = estimator("fzoo", delta=0.0)
    backend, ref = Quadratic("rademacher"), [t.clone().double() for t in Quadratic().tensors]
    targets = [c.double() for c in Quadratic().targets]
    mean_loss = lambda ts: sum(0.5 * (1 + e.prompt_ids[0]) * sum(float(((t - c) ** 2).sum()) for t, c in zip(ts, targets))
                               for e in BATCH) / len(BATCH)
    for step in range(3):
        seeds = direction_seeds(11, step, n)
        before = forwards(backend)
        result = fzoo.probe(backend, BATCH, seeds, eps)
        assert forwards(backend) - before == n + 1                      # one unperturbed forward, n perturbed
        update(backend, result, lr, wd, coefficients=fzoo.coefficients(result, lr))
        us = [[z_like(t, s, i, "rademacher").double() for i, t in enumerate(ref)] for s in seeds]
        l0 = mean_loss(ref)
        ls = [mean_loss([t + eps * u for t, u in zip(ref, u_i)]) for u_i in us]
        sigma = math.sqrt(sum((x - sum(ls) / n) ** 2 for x in ls) / (n - 1))
        assert result.losses_minus[0] == pytest.approx(l0, rel=1e-6)
        assert result.losses_plus == pytest.approx(ls, rel=1e-6)
        ref = [t - lr / (n * sigma) * sum((li - l0) * u_i[i] for li, u_i in zip(ls, us)) for i, t in enumerate(ref)]
        for got, want in zip(backend.tensors, ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_fzoo_starts_from_theta_when_a_step_was_applied():
    """An estimator that does not fuse is never handed an applied z by the trainer, but
    a caller that passes one gets theta's own loss first all the same."""
    fzoo = estimator("fzoo")
    a, b = Quadratic(), Quadratic()
    b.perturb([(1, 0.5)])                                   # theta + 0.5 z(seeds[0])
    want = fzoo.probe(a, BATCH, [1, 2], 1e-2)
    got = fzoo.probe(b, BATCH, [1, 2], 1e-2, applied=0.5)
    assert got.losses_minus[0] == pytest.approx(want.losses_minus[0], rel=1e-6)
    assert got.losses_plus == pytest.approx(want.losses_plus, rel=1e-6)


# -- through the CLI ---------------------------------------------------------------------
def run_config(tmp_path, model, **extra):
    return write_run_config(tmp_path, model, {"mezo.steps": 6, "checkpoint_every": 3, "mezo.q": 3,
                                              "mezo.lr": 1e-3, "mezo.eps": 1e-2, "mezo.z": "rademacher",
                                              **extra})


def test_fzoo_run_resumes_bitwise_and_logs_its_losses(tmp_path, tiny_llama, fresh_registry, capsys):
    cfg = run_config(tmp_path / "a", tiny_llama)
    assert main(["train", "-c", str(cfg), "mezo.estimator=fzoo"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["grads"]) for r in rows] == [3] * 6
    for r in rows:   # g_i = (l_i - l_0) / eps, logged as loss_plus (mean l_i) and loss_minus (l_0)
        assert sum(r["grads"]) / 3 * 1e-2 == pytest.approx(r["loss_plus"] - r["loss_minus"], rel=1e-6, abs=1e-9)
    cut = run_config(tmp_path / "b", tiny_llama, **{"mezo.steps": 3})
    assert main(["train", "-c", str(cut), "mezo.estimator=fzoo"]) == 0
    assert main(["train", "-c", str(cut), "mezo.estimator=fzoo", "mezo.steps=6", "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "run" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    moved = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step-0000003" / "adapter_model.safetensors"))
    assert any(not moved[k].equal(a[k]) for k in a)            # training moved the adapter


def test_estimator_refusals_name_the_field(tmp_path, tiny_llama, fresh_registry, capsys):
    cfg = run_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "mezo.estimator=fzoo", "mezo.q=1"]) == 2
    err = capsys.readouterr().err
    assert "mezo.estimator" in err and "mezo.q >= 2" in err, err
    assert main(["train", "-c", str(cfg), "mezo.estimator=fzoo", "mezo.estimator_options={width: 3}"]) == 2
    err = capsys.readouterr().err
    assert "mezo.estimator_options" in err and "width" in err, err
    assert main(["train", "-c", str(cfg), "mezo.estimator=nope"]) == 2
    assert "unknown estimator 'nope'" in capsys.readouterr().err


def test_fzoo_batched_states_match_the_sequence(tiny_llama):
    """hf.pm_batch evaluates FZOO's q + 1 states in one batch of side adapters: the same
    losses as one state after another (fp32 rounding of the sequence's restores apart),
    and the trained adapter left at theta itself (offset 0)."""
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.config import load_config
    from tiny import seeded
    gen = seeded(SEED)
    batch = [Example(tuple(torch.randint(4, 250, (n,), generator=gen).tolist()), (11, 12)) for n in (4, 7, 5)]
    fzoo, got = estimator("fzoo"), {}
    for pm_batch in (False, True):
        backend = HFBackend(load_config(None, [f"model.path={tiny_llama}", "mezo.z=rademacher", "lora.r=4",
                                               f"hf.pm_batch={str(pm_batch).lower()}", "lora.layers=[2,3]"]))
        backend.perturb([(5, 0.01)])                      # a trained adapter that is not B = 0
        start = [t.clone() for t in backend.trainable_tensors()]
        got[pm_batch] = fzoo.probe(backend, batch, [21, 22, 23], 1e-2)
        moved = [t - s for t, s in zip(backend.trainable_tensors(), start)]
        if pm_batch:
            assert got[pm_batch].offset == 0.0 and all(not m.any() for m in moved)
        else:
            assert got[pm_batch].offset == 1e-2 and any(m.any() for m in moved)
    assert got[True].losses_minus == pytest.approx(got[False].losses_minus, rel=1e-6)
    assert got[True].losses_plus == pytest.approx(got[False].losses_plus, rel=1e-5)
    assert len(set(got[True].losses_plus)) == 3                # three directions, three losses


def test_estimators_are_listed_with_their_distribution(capsys, fresh_registry):
    assert main(["backends"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("estimators:"))
    assert "fzoo (mezo-run)" in line and "mezo (mezo-run)" in line, line


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("normalize", ["zscore", "rank"])
def test_es_equals_the_formula_written_out(antithetic, normalize):
    """ES with rewards R = -L normalised across the population, written out with explicit z:
    antithetic theta + lr/(2q) sum (R~+_i - R~-_i) z_i, one-sided theta + lr/q sum R~_i z_i."""
    print("seed", SEED)
    q, eps, lr = 4, 1e-2, 1e-2
    es = estimator("es", normalize=normalize, antithetic=antithetic)
    backend, ref = Quadratic(), [t.clone().double() for t in Quadratic().tensors]
    targets = [c.double() for c in Quadratic().targets]
    mean_loss = lambda ts: sum(0.5 * (1 + e.prompt_ids[0]) * sum(float(((t - c) ** 2).sum()) for t, c in zip(ts, targets))
                               for e in BATCH) / len(BATCH)

    def norm(values):
        if normalize == "zscore":
            m = sum(values) / len(values)
            s = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
            return [(v - m) / s for v in values]
        ranked = sorted(values)
        return [ranked.index(v) / (len(values) - 1) - 0.5 for v in values]   # no ties here

    for step in range(3):
        seeds = direction_seeds(13, step, q)
        before = forwards(backend)
        result = es.probe(backend, BATCH, seeds, eps)
        assert forwards(backend) - before == (2 * q if antithetic else q)
        update(backend, result, lr, 0.0, coefficients=es.coefficients(result, lr))
        zs = [[z_like(t, s, i).double() for i, t in enumerate(ref)] for s in seeds]
        plus = [-mean_loss([t + eps * z for t, z in zip(ref, z_i)]) for z_i in zs]
        if antithetic:
            minus = [-mean_loss([t - eps * z for t, z in zip(ref, z_i)]) for z_i in zs]
            r = norm(plus + minus)
            coef = [(r[i] - r[q + i]) / (2 * q) for i in range(q)]
        else:
            coef = [x / q for x in norm(plus)]
        ref = [t + lr * sum(c * z_i[i] for c, z_i in zip(coef, zs)) for i, t in enumerate(ref)]
        for got, want in zip(backend.tensors, ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_es_ranks_share_ties():
    from mezo_builtin.estimators import normalized
    assert normalized([3.0, 1.0, 3.0, 2.0], "rank") == [pytest.approx(5 / 6 - 0.5)] * 1 + [-0.5] + \
        [pytest.approx(5 / 6 - 0.5), pytest.approx(1 / 3 - 0.5)]
    assert normalized([1.0, 1.0], "zscore") == [0.0, 0.0]


class LocalQuadratic(LocalTensorsBackend):
    """The quadratic loss over tensors held in this process (hizoo scales z elementwise)."""
    name = "local-quadratic"

    def __init__(self):
        q = Quadratic()
        self._names, self._tensors, self.targets = q.trainable_names(), q.tensors, q.targets
        self.z_dist, self.calls = "gaussian", []

    losses = QuadraticBackend.losses

    @property
    def tensors(self):   # what QuadraticBackend.losses reads
        return self._tensors

    def save_adapter(self, path):
        raise NotImplementedError

    def load_adapter(self, path):
        raise NotImplementedError


def test_hizoo_equals_the_formula_written_out():
    """HiZOO (arXiv:2402.15173), written out with explicit z: s = D^-1/2, l_0, l_+- at
    theta +- eps s*u, theta - lr g s*u, then D <- (1-a) D + a h D u^2 before the next step."""
    print("seed", SEED)
    eps, lr, alpha = 1e-2, 1e-2, 0.3
    hizoo = estimator("hizoo", alpha=alpha)
    backend = LocalQuadratic()
    ref = [t.clone().double() for t in backend.trainable_tensors()]
    targets = [c.double() for c in backend.targets]
    d = [torch.ones_like(t) for t in ref]
    mean_loss = lambda ts: sum(0.5 * (1 + e.prompt_ids[0]) * sum(float(((t - c) ** 2).sum()) for t, c in zip(ts, targets))
                               for e in BATCH) / len(BATCH)
    for step in range(4):
        seed = direction_seeds(17, step, 1)[0]
        result = hizoo.probe(backend, BATCH, [seed], eps)
        update(backend, result, lr, 0.0, coefficients=hizoo.coefficients(result, lr),
               perturb=lambda terms, decay: hizoo.perturb(backend, terms, decay))
        u = [z_like(t, seed, i).double() for i, t in enumerate(ref)]
        s = [x.rsqrt() for x in d]
        l0 = mean_loss(ref)
        lp = mean_loss([t + eps * si * ui for t, si, ui in zip(ref, s, u)])
        lm = mean_loss([t - eps * si * ui for t, si, ui in zip(ref, s, u)])
        assert result.losses_plus[0] == pytest.approx(lp, rel=1e-6)
        g, h = (lp - lm) / (2 * eps), abs(lp + lm - 2 * l0) / (2 * eps ** 2)
        ref = [t - lr * g * si * ui for t, si, ui in zip(ref, s, u)]
        d = [(1 - alpha) * x + alpha * h * x * ui ** 2 for x, ui in zip(d, u)]
        for got, want in zip(backend.trainable_tensors(), ref):   # fp32 weights against a float64 oracle
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    hizoo.fold_pending(backend.trainable_tensors(), "gaussian")
    for got, want in zip(hizoo.curvature, d):   # h is a second difference: loss rounding / eps^2
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-6)
    assert any(not torch.allclose(x, torch.ones_like(x)) for x in hizoo.curvature)   # it learned something


def test_hizoo_state_round_trips_and_refuses_engines():
    hizoo = estimator("hizoo")
    backend = LocalQuadratic()
    hizoo.probe(backend, BATCH, [5], 1e-2)
    again = estimator("hizoo")
    again.load_state_dict(hizoo.state_dict())
    assert again.pending == hizoo.pending and all(a.equal(b) for a, b in zip(again.curvature, hizoo.curvature))
    with pytest.raises(MezoError, match="hizoo needs mezo.q=1 and a backend holding its tensors"):
        hizoo.probe(Quadratic(), BATCH, [5], 1e-2)


def test_hizoo_run_resumes_bitwise(tmp_path, tiny_llama, fresh_registry, capsys):
    """The curvature estimate lives in the checkpoints: 3 steps + a resume to 6 end on the
    adapter of 6 straight steps, bit for bit."""
    extra = ["mezo.estimator=hizoo", "mezo.q=1", "mezo.estimator_options={alpha: 0.1}"]
    cfg = run_config(tmp_path / "a", tiny_llama, **{"mezo.q": 1})
    assert main(["train", "-c", str(cfg), *extra]) == 0
    cut = run_config(tmp_path / "b", tiny_llama, **{"mezo.steps": 3, "mezo.q": 1})
    assert main(["train", "-c", str(cut), *extra]) == 0
    assert (tmp_path / "b" / "run" / "checkpoints" / "step-0000003" / "estimator.safetensors").exists()
    assert main(["train", "-c", str(cut), *extra, "mezo.steps=6", "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "run" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_sparse_equals_the_formula_written_out():
    """Sparse-MeZO (arXiv:2402.15751): per tensor, m = 1 on the density-smallest |theta|
    (read at the step's clean weights), SPSA along m*z_i, written out with explicit z."""
    print("seed", SEED)
    q, eps, lr, density = 2, 1e-2, 1e-2, 0.5
    sparse = estimator("sparse", density=density)
    backend = LocalQuadratic()
    ref = [t.clone().double() for t in backend.trainable_tensors()]
    targets = [c.double() for c in backend.targets]
    mean_loss = lambda ts: sum(0.5 * (1 + e.prompt_ids[0]) * sum(float(((t - c) ** 2).sum()) for t, c in zip(ts, targets))
                               for e in BATCH) / len(BATCH)
    for step in range(3):
        seeds = direction_seeds(19, step, q)
        masks = []
        for t in ref:   # the rule, by sorting: the k smallest magnitudes
            k = max(1, round(density * t.numel()))
            masks.append((t.abs() <= t.abs().flatten().sort().values[k - 1]).double())
        result = sparse.probe(backend, BATCH, seeds, eps)
        update(backend, result, lr, 0.0, coefficients=sparse.coefficients(result, lr),
               perturb=lambda terms, decay: sparse.perturb(backend, terms, decay))
        zs = [[z_like(t, s, i).double() * m for i, (t, m) in enumerate(zip(ref, masks))] for s in seeds]
        grads = [(mean_loss([t + eps * z for t, z in zip(ref, z_i)]) - mean_loss([t - eps * z for t, z in zip(ref, z_i)]))
                 / (2 * eps) for z_i in zs]
        assert result.grads == pytest.approx(grads, rel=1e-4, abs=1e-6)
        ref = [t - lr / q * sum(g * z_i[i] for g, z_i in zip(grads, zs)) for i, t in enumerate(ref)]
        for got, want, m in zip(backend.trainable_tensors(), ref, masks):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert 0 < sum(float(m.sum()) for m in sparse.masks) < sum(m.numel() for m in sparse.masks)


def test_sparse_full_params_run_resumes_bitwise(tmp_path, tiny_llama, fresh_registry, capsys):
    """hf.full_params with the sparse mask: the mask is read from the weights, so a resume
    recomputes it and continues bit for bit (no estimator state in the checkpoint)."""
    extra = ["mezo.estimator=sparse", "mezo.estimator_options={density: 0.5}", "hf.full_params=[.*layers\\.3\\.mlp.*]"]
    cfg = run_config(tmp_path / "a", tiny_llama)
    assert main(["train", "-c", str(cfg), *extra]) == 0
    cut = run_config(tmp_path / "b", tiny_llama, **{"mezo.steps": 3})
    assert main(["train", "-c", str(cut), *extra]) == 0
    assert not (tmp_path / "b" / "run" / "checkpoints" / "step-0000003" / "estimator.safetensors").exists()
    assert main(["train", "-c", str(cut), *extra, "mezo.steps=6", "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "run" / "last" / "mezo_params.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "last" / "mezo_params.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    start = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step-0000003" / "mezo_params.safetensors"))
    moved = [(a[k] != start[k]).float().mean().item() for k in a]
    assert all(0 < m < 1 for m in moved), moved        # some entries moved, the largest ones did not


def test_lozo_moves_each_matrix_in_rank_r_and_follows_the_formula():
    """LOZO (arXiv:2410.07698): two-sided SPSA along Z = U V^T / sqrt(r) for matrices
    (plain z for vectors), V kept for lazy_steps; the update of a matrix over steps that
    share V stays in V's r-dimensional row space."""
    from mezo_core.perturb import z_range
    print("seed", SEED)
    eps, lr, r = 1e-2, 1e-2, 2
    lozo = estimator("lozo", rank=r, lazy_steps=3)
    backend = LocalQuadratic()
    start = [t.clone() for t in backend.trainable_tensors()]
    ref = [t.clone().double() for t in start]
    targets = [c.double() for c in backend.targets]
    mean_loss = lambda ts: sum(0.5 * (1 + e.prompt_ids[0]) * sum(float(((t - c) ** 2).sum()) for t, c in zip(ts, targets))
                               for e in BATCH) / len(BATCH)
    v_seeds = []
    for step in range(3):
        seed = direction_seeds(23, step, 1)[0]
        result = lozo.probe(backend, BATCH, [seed], eps)
        v_seeds.append(lozo.v_seed)
        update(backend, result, lr, 0.0, coefficients=lozo.coefficients(result, lr),
               perturb=lambda terms, decay: lozo.perturb(backend, terms, decay))
        zs = []
        for i, t in enumerate(ref):
            if t.dim() == 2:
                (m, n) = t.shape
                u = z_range(seed, i, 0, m * r).view(m, r).double()
                v = z_range(lozo.v_seed, i, 0, n * r).view(n, r).double()
                zs.append(u @ v.T / r ** 0.5)
            else:
                zs.append(z_like(t, seed, i).double())
        g = (mean_loss([t + eps * z for t, z in zip(ref, zs)]) - mean_loss([t - eps * z for t, z in zip(ref, zs)])) / (2 * eps)
        assert result.grads[0] == pytest.approx(g, rel=1e-4, abs=1e-6)
        ref = [t - lr * g * z for t, z in zip(ref, zs)]
        for got, want in zip(backend.trainable_tensors(), ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert len(set(v_seeds)) == 1                                   # one V for the 3 lazy steps
    for t, t0 in zip(backend.trainable_tensors(), start):
        if t.dim() == 2:
            assert torch.linalg.matrix_rank((t - t0).double(), atol=1e-6) == r


def test_lozo_run_resumes_bitwise_across_a_new_v(tmp_path, tiny_llama, fresh_registry, capsys):
    extra = ["mezo.estimator=lozo", "mezo.q=1", "mezo.estimator_options={rank: 2, lazy_steps: 2}",
             "hf.full_params=[.*layers\\.3\\.mlp.*]"]
    cfg = run_config(tmp_path / "a", tiny_llama, **{"mezo.q": 1})
    assert main(["train", "-c", str(cfg), *extra]) == 0
    cut = run_config(tmp_path / "b", tiny_llama, **{"mezo.steps": 3, "mezo.q": 1})
    assert main(["train", "-c", str(cut), *extra]) == 0
    state = json.loads((tmp_path / "b" / "run" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["estimator"]["age"] == 3                             # V's age: step 3 of a pair of 2
    assert main(["train", "-c", str(cut), *extra, "mezo.steps=6", "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "run" / "last" / "mezo_params.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "last" / "mezo_params.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fzoo", "hizoo", "sparse", "lozo", "es"])
def test_estimators_on_cuda_match_the_cpu(name, tiny_llama):
    """The estimators' own directions drawn on the GPU are the CPU's (z is counter-based):
    three steps of each on the hf backend, fp32, CPU against CUDA."""
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.config import load_config
    from tiny import seeded
    gen = seeded(SEED)
    batch = [Example(tuple(torch.randint(4, 250, (n,), generator=gen).tolist()), (11, 12)) for n in (4, 7, 5)]
    got = {}
    for device in ("cpu", "cuda"):
        backend = HFBackend(load_config(None, [f"model.path={tiny_llama}", f"model.device={device}", "lora.r=4",
                                               "lora.layers=[2,3]", "hf.pm_batch=true"]))
        backend.perturb([(5, 0.01)])
        est = estimator(name)
        q = 1 if name == "hizoo" else 3
        for step in range(3):
            seeds = direction_seeds(31, step, q)
            result = est.probe(backend, batch, seeds, 1e-2)
            update(backend, result, 1e-3, 0.0, coefficients=est.coefficients(result, 1e-3),
                   perturb=lambda terms, decay: est.perturb(backend, terms, decay))
        got[device] = [t.detach().cpu() for t in backend.trainable_tensors()]
    for a, b in zip(got["cpu"], got["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
