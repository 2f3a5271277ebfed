"""The convergence guard and the adaptive schedules.

Oracles: hand-computed gain sequences and EMA thresholds; a quadratic toy backend
whose weights we can read exactly; real `mezo-run train` runs on the tiny Llama
scanned for non-finite tensors on disk."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mezo_core.cli import main
from mezo_core.config import GuardConfig
from mezo_core.errors import DivergedError
from mezo_core.guard import Guard
from mezo_core.interfaces import Signals
from mezo_core.mezo import StepResult
from mezo_core.registry import get_registry
from mezo_core.trainer import make_schedule
from mezo_core.interfaces import restore, snapshot
from tiny import InterruptAt, write_run_config

SEED = 1234


def guard(**kw):
    return Guard(OmegaConf.structured(GuardConfig(**kw)))


def result(loss, g=1.0):
    return StepResult([1], [g], [loss], [loss])


# -- the guard on synthetic signals ----------------------------------------------------
def test_nonfinite_step_is_an_event():
    g = guard()
    assert g.check(result(float("nan")))["event"] == "nonfinite"
    assert g.check(StepResult([1], [float("inf")], [1.0], [0.0]))["event"] == "nonfinite"
    assert g.check(result(0.5)) is None


def test_clip_limits_g_to_its_running_scale():
    g = guard(clip=10.0, warmup=3, window=3)
    for _ in range(3):
        assert g.check(result(0.5, g=2.0)) is None          # running RMS of g: 2
    r = result(0.5, g=-1000.0)
    event = g.check(r)
    assert event["event"] == "clip" and event["limit"] == pytest.approx(20.0)
    assert r.grads == [-20.0]                                # sign kept, magnitude = clip x RMS


def test_sustained_rise_triggers_after_patience():
    """EMA span 1 (alpha = 1) makes the smoothed loss the loss itself: a hand-checkable rule."""
    g = guard(window=1, warmup=0, rise=0.2, rise_abs=0.0, patience=3)
    g.seen = 1
    assert g.observe_loss(1, 1.0) == (True, None)           # first best
    assert g.observe_loss(2, 0.5) == (True, None)           # new best 0.5: threshold 0.6
    assert g.observe_loss(3, 0.59) == (False, None)         # inside the tolerance
    assert g.observe_loss(4, 0.7)[1] is None                # above: 1 of 3
    assert g.observe_loss(5, 0.7)[1] is None                # 2 of 3
    new_best, event = g.observe_loss(6, 0.7)                # 3 of 3
    assert event["event"] == "rise" and event["best_step"] == 2 and event["best_smoothed_loss"] == 0.5
    g.roll_back(6, event, cut=0.5)
    assert g.lr_scale == 0.5 and g.recoveries == 1 and g.ema == 0.5


def test_roll_backs_past_the_limit_raise():
    g = guard(max_recoveries=2)
    for i in range(2):
        g.roll_back(i, {"event": "nonfinite"}, cut=0.1)
    with pytest.raises(DivergedError, match="diverged"):
        g.roll_back(3, {"event": "nonfinite"}, cut=0.1)


def test_guard_state_round_trips_through_json():
    g = guard(window=1, warmup=0)
    g.seen = 1
    g.observe_loss(1, 0.3)
    g.roll_back(1, {"event": "rise"}, 0.5)
    h = guard(window=1, warmup=0)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict()
    fresh = guard()
    fresh.load_state_dict(json.loads(json.dumps(guard().state_dict())))  # best = inf survives JSON
    assert fresh.best == math.inf


# -- adaptive schedules ------------------------------------------------------------------
def schedule(name, start, **options):
    """The schedule the trainer builds for ``mezo.lr_schedule=name`` with these options."""
    return make_schedule(get_registry(), "mezo.lr_schedule", name, start, None, 0, options, q=8)


def signals(step, grads, noise=None):
    return Signals(step, 100, 1e-3, tuple(0.0 for _ in grads), tuple(0.0 for _ in grads), tuple(grads), noise)


def test_spall_gain_sequences(fresh_registry):
    s = schedule("spall", 0.1)                              # A = 0.1 * 100 = 10
    for k in (0, 1, 50, 99):
        assert s(k, 100) == pytest.approx(0.1 * (11 / (k + 11)) ** 0.602)
    e = schedule("spall_eps", 1e-2)
    for k in (0, 9, 99):
        assert e(k, 100) == pytest.approx(1e-2 / (k + 1) ** 0.101)


def test_spall_calibrates_a_from_the_probe_steps(fresh_registry):
    s = schedule("spall", 0.1, target_step=0.02, probe_steps=3)
    for step, g in enumerate([4.0, -1.0, 2.0]):             # |g|: 4, 1, 2 -> median 2
        s.observe(signals(step, [g]))
    assert s(0, 100) == pytest.approx(0.01)                 # a_0 * 2 = 0.02
    assert s(5, 100) == pytest.approx(0.01 * (11 / 16) ** 0.602)


def test_rms_divides_by_the_running_rms_of_g(fresh_registry):
    s = schedule("rms", 1e-2, beta=0.5)
    s.observe(signals(0, [2.0]))                             # v = 0.5*4 = 2, bias-corrected 4 -> rms 2
    assert s(0, 100) == pytest.approx(1e-2 / 2.0)
    s.observe(signals(1, [4.0]))                             # v = 0.5*2 + 0.5*16 = 9; /(1-0.25) = 12
    assert s(1, 100) == pytest.approx(1e-2 / math.sqrt(12.0))


def test_fzoo_normalises_by_the_spread_of_the_directions(fresh_registry):
    s = schedule("fzoo", 1e-2)
    s.observe(signals(0, [1.0, 3.0, 5.0]))                   # sample std 2
    assert s(0, 100) == pytest.approx(1e-2 / 2.0)


def test_noise_floor_raises_eps_above_the_noise(fresh_registry):
    s = schedule("noise_floor", 1e-3, ratio=10.0, window=3)
    s.observe(signals(0, [0.5], noise=0.0))
    assert s(1, 100) == 1e-3                                 # no noise: eps stays
    s.observe(signals(1, [0.5], noise=1e-3))                # 10 * 1e-3 / (2 * 0.5) = 1e-2
    assert s(2, 100) == pytest.approx(1e-2)
    s.observe(signals(2, [0.5], noise=1.0))                 # capped at max_eps
    assert s(3, 100) == pytest.approx(0.1)


def test_schedule_state_round_trips(fresh_registry):
    a = schedule("rms", 1e-2)
    for step, g in enumerate([1.0, 2.0, 3.0]):
        a.observe(signals(step, [g]))
    b = schedule("rms", 1e-2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b(3, 100) == a(3, 100)


def test_bad_schedule_options_are_one_line(tmp_path, tiny_llama, capsys, fresh_registry):
    cfg = write_run_config(tmp_path, tiny_llama)
    assert main(["train", "-c", str(cfg), "mezo.lr_schedule=rms", "mezo.lr_schedule_options={betta: 0.9}"]) == 2
    err = capsys.readouterr().err
    assert "'mezo.lr_schedule_options.betta' (schedule 'rms'): unknown option (its keys: beta, delta)" in err
    assert "Traceback" not in err
    assert main(["train", "-c", str(cfg), "mezo.lr_schedule=fzoo"]) == 2     # q = 1
    assert "mezo.q >= 2" in capsys.readouterr().err
    assert main(["backends"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("spall", "noise_floor", "fzoo", "rms"))


def test_schedule_options_are_checked_like_every_plugins(fresh_registry):
    """A schedule's settings are its ``options`` dataclass, read from the mapping by the
    path every plugin's options take: unknown keys and wrong types refused when the
    config loads (before a model), ints taken as floats as a typed section takes them."""
    from mezo_backend_hf.options import HFOptions
    from mezo_core.config import load_config, options_from
    from mezo_core.errors import MezoError
    from mezo_builtin.schedules import RMSOptions, SpallOptions

    registry = get_registry()
    assert registry.get("epsilon_schedules", "rms").options is RMSOptions
    cases = [(["mezo.lr_schedule=rms", "mezo.lr_schedule_options={beta: fast}"],
              "config field 'mezo.lr_schedule_options.beta': expected a float (like the default 0.99), got 'fast'"),
             (["mezo.eps_schedule=noise_floor", "mezo.eps_schedule_options={window: 2.5}"],
              "config field 'mezo.eps_schedule_options.window': expected a int (like the default 20), got 2.5"),
             (["mezo.eps_schedule_options={ratio: 2}"],   # the constant eps schedule takes none
              "config field 'mezo.eps_schedule_options.ratio' (schedule 'constant'): unknown option (it takes none)"),
             (["mezo.lr_schedule=spall", "mezo.lr_schedule_options={target_step: big}"],
              "config field 'mezo.lr_schedule_options' (schedule 'spall'): target_step: expected a number or null")]
    for overrides, message in cases:
        with pytest.raises(MezoError) as caught:
            load_config(None, overrides, registry)
        assert str(caught.value).startswith(message), str(caught.value)
    # the same messages as a backend's options from a mapping
    with pytest.raises(MezoError, match=r"^config field 'hf.trunk_cache': expected a bool"):
        options_from(HFOptions, {"trunk_cache": "maybe"}, "hf")
    rms = schedule("rms", 1e-2, beta=1)
    assert type(rms.beta) is float and rms.beta == 1.0 and type(rms.delta) is float
    spall = schedule("spall", 0.1, target_step=2)
    assert spall.target_step == 2 and spall.probe_steps == 10 and spall.alpha == SpallOptions().alpha


# -- whole runs ------------------------------------------------------------------------
def safetensors_under(folder: Path):
    return sorted(folder.rglob("*.safetensors"))


def assert_all_finite(folder: Path):
    files = safetensors_under(folder)
    for f in files:
        for name, t in load_file(str(f)).items():
            assert torch.isfinite(t).all(), (f, name)
    return len(files)


def test_absurd_lr_is_refused_and_no_nan_reaches_disk(tmp_path, tiny_llama, capsys, fresh_registry):
    print("seed", SEED)
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 30, "checkpoint_every": 5,
                                                  "guard.max_recoveries": 3, "seed": SEED})
    code = main(["train", "-c", str(cfg), "mezo.lr=1e30"])
    err = capsys.readouterr().err
    assert code == 3 and "diverged" in err and "Traceback" not in err
    run = tmp_path / "run"
    assert assert_all_finite(run) >= 1                      # the checkpoints kept are finite
    assert not (run / "adapter").exists()                    # no result written for a diverged run
    events = [json.loads(l).get("guard") for l in (run / "metrics.jsonl").read_text().splitlines()]
    # a non-finite step, or (issue #31) an absurd but finite state: weights past 1000 x the start's
    assert [e["event"] for e in events if e] == ["nonfinite", "nonfinite", "weights"]
    from mezo_core.guard import MAX_WEIGHT_RATIO
    start = 1 / 64 ** 0.5                                   # LoRA A's init bound on the tiny model (hidden 64)
    assert max(float(t.abs().max()) for f in safetensors_under(run) for t in load_file(str(f)).values()) \
        <= MAX_WEIGHT_RATIO * start                          # nothing absurd is written (1.5e22 before)


def test_guard_recovers_a_run_and_is_reproducible(tmp_path, tiny_llama, capsys, fresh_registry):
    """An lr that blows up once: the guard rolls back and the run finishes with a finite
    adapter; the same seed gives the same events and the same adapter, bit for bit."""
    print("seed", SEED)
    runs = []
    for i in range(2):
        folder = tmp_path / f"r{i}"
        cfg = write_run_config(folder, tiny_llama, {"mezo.steps": 25, "checkpoint_every": 10, "seed": SEED,
                                                   "guard.warmup": 2, "guard.nonfinite_cut": 1e-6})
        get_registry.cache_clear()
        assert main(["train", "-c", str(cfg), "mezo.lr=1e30"]) == 0, capsys.readouterr().err
        runs.append(folder / "run")
    capsys.readouterr()
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert summaries[0]["guard"]["roll_backs"] >= 1
    assert summaries[0]["guard"] == summaries[1]["guard"]
    assert assert_all_finite(runs[0]) >= 2
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs)
    assert all(a[k].equal(b[k]) for k in a)


def test_snapshot_restore_is_exact(tiny_llama, fresh_registry):
    """What a roll-back does to the weights: restore(snapshot) gives them back bit for bit."""
    from mezo_core.config import load_config
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(write_run_config(Path(tmp), tiny_llama), ["mezo.steps=0", "zero_shot=false"])
        backend = get_registry().get("backends", "hf")(cfg)
        anchor = snapshot(backend)
        backend.perturb([(7, 0.5)])
        assert any(not snapshot(backend)[k].equal(anchor[k]) for k in anchor)
        restore(backend, anchor)
        now = snapshot(backend)
        assert all(now[k].equal(anchor[k]) for k in anchor)


def test_best_adapter_is_kept_and_early_stopping(tmp_path, tiny_llama, capsys, fresh_registry):
    print("seed", SEED)
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 12, "seed": SEED, "eval_every": 2,
                                                  "checkpoint_every": 4, "task.n_val": 0,
                                                  "selection.load_best_at_end": False, "selection.significance": 0})
    assert main(["train", "-c", str(cfg)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    evals = [(0, summary["zero_shot"])] + [(r["step"], r) for r in rows if "dev_accuracy" in r]
    evals.append((12, summary["final"]))
    # the oracle: highest accuracy, ties to the lowest loss, exact ties to the earliest
    first_best = max(evals, key=lambda e: (e[1]["dev_accuracy"], -e[1]["dev_loss"], -e[0]))[0]
    assert summary["best"]["step"] == first_best
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == first_best
    assert (run / "best" / "adapter_model.safetensors").exists()
    # the per-example outcomes the selection compares live in best.json, not in the summary or metrics
    assert len(best["outcomes"]) == summary["best"]["dev_examples"] and set(best["outcomes"]) <= {"0", "1"}
    assert "outcomes" not in summary["best"] and not any("outcomes" in k for r in rows for k in r)


def test_resume_after_roll_backs_is_bitwise(tmp_path, tiny_llama, capsys, fresh_registry):
    """Guard state, schedule state and the anchor travel in the checkpoint: a run
    interrupted after its roll-backs resumes to the uninterrupted adapter."""
    print("seed", SEED)
    over = {"mezo.steps": 20, "checkpoint_every": 10, "seed": SEED, "guard.warmup": 2,
            "guard.nonfinite_cut": 1e-6, "mezo.lr_schedule": "rms"}
    runs = []
    for i, interrupt in enumerate((False, True)):
        folder = tmp_path / f"r{i}"
        cfg = write_run_config(folder, tiny_llama, over)
        get_registry.cache_clear()
        reg = get_registry()
        if interrupt:
            stopper = InterruptAt(13)
            reg.pm.register(stopper)
            assert main(["train", "-c", str(cfg), "mezo.lr=1e30"], reg) == 130
            reg.pm.unregister(stopper)
            assert main(["train", "-c", str(cfg), "mezo.lr=1e30", "--resume"]) == 0
        else:
            assert main(["train", "-c", str(cfg), "mezo.lr=1e30"]) == 0
        runs.append(folder / "run")
    capsys.readouterr()
    s0, s1 = (json.loads((r / "summary.json").read_text()) for r in runs)
    assert s0["guard"]["roll_backs"] >= 1 and s0["guard"] == s1["guard"]
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs)
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("significance", [0.0, 0.05])
def test_run_ends_on_the_best_adapter_zero_shot_included(tmp_path, tiny_llama, capsys, fresh_registry,
                                                         significance):
    """selection.load_best_at_end: adapter/ is best/'s, and the zero-shot adapter is a
    candidate: the final validation score is the maximum of all evaluations (with
    the significance rule: never below the zero-shot one)."""
    print("seed", SEED)
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 8, "seed": SEED, "eval_every": 2,
                                                  "checkpoint_every": 4, "task.n_val": 0,
                                                  "selection.significance": significance})
    assert main(["train", "-c", str(cfg), "mezo.lr=0.5"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    scores = [summary["zero_shot"]["dev_accuracy"]] + [r["dev_accuracy"] for r in rows if "dev_accuracy" in r]
    assert summary["result"]["dev_accuracy"] == summary["best"]["dev_accuracy"]
    assert summary["result"]["dev_accuracy"] == max(scores)
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "best" / "adapter_model.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
    # the trained weights are kept beside it, and the last checkpoint holds them too
    last = load_file(str(run / "last" / "adapter_model.safetensors"))
    ckpt = load_file(str(run / "checkpoints" / "step-0000008" / "adapter_model.safetensors"))
    assert all(last[k].equal(ckpt[k]) for k in last) and any(last[k].abs().sum() > 0 for k in last if "lora_B" in k)
    # selection.correction=bonferroni: 8 steps, eval_every 2: 4 evaluations after step 0 can replace best/,
    # the first move at 0.05 / 4, which needs 7 wins: more than the 6 dev rows selected on, so the
    # run falls back to the plain best score (issue #26) and says so in its summary
    best = json.loads((run / "best" / "best.json").read_text())
    assert summary["selection"]["first_move_level"] == significance / 4
    assert summary["selection"]["rule"] == "best_score" and summary["selection"]["examples"] == 6
    assert best["significance_per_eval"] == summary["best"]["significance_per_eval"] == 0


def test_default_snapshot_goes_through_the_adapter_files(tmp_path):
    """Backends that keep their tensors elsewhere (vLLM, SGLang) get snapshot/restore
    from save_adapter/load_adapter alone: a round trip gives the tensors back exactly."""
    from safetensors.torch import save_file
    from mezo_core.interfaces import Backend

    class FileBackend(Backend):
        name = "files"

        def __init__(self):
            gen = torch.Generator().manual_seed(SEED)
            self.state = {"a.lora_A.weight": torch.randn(3, 4, generator=gen), "b.lora_B.weight": torch.zeros(4, 3)}

        def trainable_names(self):
            return sorted(self.state)

        def perturb(self, terms, decay=1.0):
            for name in self.state:
                self.state[name] = self.state[name] * decay + sum(c for _, c in terms)

        def losses(self, batch):
            raise NotImplementedError

        def save_adapter(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_config.json").write_text("{}")
            save_file(self.state, str(Path(path) / "adapter_model.safetensors"))

        def load_adapter(self, path):
            self.state = {k: v.clone() for k, v in load_file(str(Path(path) / "adapter_model.safetensors")).items()}

    print("seed", SEED)
    b = FileBackend()
    snap = snapshot(b)
    want = {k: v.clone() for k, v in b.state.items()}
    b.perturb([(1, 0.25)], decay=0.5)
    assert not b.state["a.lora_A.weight"].equal(want["a.lora_A.weight"])
    restore(b, snap)
    assert b.state.keys() == want.keys() and all(b.state[k].equal(want[k]) for k in want)
