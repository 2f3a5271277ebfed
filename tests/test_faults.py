"""The fault suite (#14): real ``mezo-run train`` processes killed with SIGKILL at
chosen points, then resumed; every checkpoint file damaged in turn; the lock;
data fingerprints; what a --resume may change. The oracle throughout is an
uninterrupted run of the same config: a resumed run must end with the very same
adapter (bit for bit, CPU) and the same per-step trajectory, and no file the
runs leave holds a NaN/inf tensor or a half-written leftover.

Kill points are reached through the test hook ``MEZO_FAULT=<point>[@n]`` of
mezo_core/checkpoints.py (the process SIGKILLs itself the n-th time it gets
there); the mid-step kill wraps the backend's perturbation in the child process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mezo_core.cli import main
from mezo_core.registry import get_registry
from tiny import InterruptAt, error_text, metric_rows, write_run_config

STEPS = 6
TRAJECTORY = ("step", "loss", "loss_plus", "loss_minus", "grads", "seeds", "eps", "lr")
ADAPTER = "adapter_model.safetensors"


def config(folder, model, **overrides):
    """steps 6, a checkpoint every 2 steps (0 after zero-shot, 2, 4, 6, 6 with the final eval)."""
    return write_run_config(folder, model, {"mezo.steps": STEPS, "checkpoint_every": 2,
                                            "keep_checkpoints": 2, **overrides})


def train(cfg, *args):
    get_registry.cache_clear()
    try:
        return main(["train", "-c", str(cfg), *args])
    finally:
        get_registry.cache_clear()


def start_child(cfg, fault=None, code=None, sig="SIGKILL"):
    """``mezo-run train`` in a child process that stops itself at ``fault`` (the
    MEZO_FAULT hook, with signal ``sig``) or, with ``code``, runs that Python first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MEZO_FAULT_SIGNAL": sig}
    env.pop("MEZO_FAULT", None)
    if fault:
        env["MEZO_FAULT"] = fault
    argv = ["train", "-c", str(cfg)]
    cmd = ([sys.executable, "-c", f"{code}\nimport sys\nfrom mezo_core.cli import main\nsys.exit(main({argv!r}))"]
           if code else [sys.executable, "-m", "mezo_core.cli", *argv])
    return subprocess.Popen(cmd, env=env, cwd=Path(cfg).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def trajectory(run):
    return [{k: r[k] for k in TRAJECTORY} for r in metric_rows(run)]


def assert_same_run(run, reference, same_eval=True):
    """The oracle: the uninterrupted run's adapter bit for bit, its trajectory, its
    evaluations (``same_eval``: bit for bit); and a clean folder."""
    a, b = load_file(str(reference / "adapter" / ADAPTER)), load_file(str(run / "adapter" / ADAPTER))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), name
    assert trajectory(run) == trajectory(reference)
    summary, want = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    if same_eval:
        assert summary == want
    else:   # another eval_batch_size pads the dev batches differently
        assert summary["final"]["dev_accuracy"] == want["final"]["dev_accuracy"]
        assert summary["final"]["dev_loss"] == pytest.approx(want["final"]["dev_loss"], rel=1e-5)
    assert_clean(run)


def assert_clean(run):
    """No temp or swapped-out leftovers, no lock, no non-finite tensor anywhere."""
    left = [p.name for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")
            or p.name == "run.lock"]
    assert not left, left
    assert_finite(run)


def assert_finite(run):
    for f in run.rglob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            assert torch.isfinite(t).all(), (f, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("reference")
    assert train(config(tmp, tiny_llama)) == 0
    assert_clean(tmp / "run")
    return tmp / "run"


# -- kill -9 at chosen points, then resume ------------------------------------------
# point -> what the killed run must have left in checkpoints/
KILLS = {
    "ckpt-tmp@1": [".step-0000000.tmp"],                       # inside the very first checkpoint write
    "ckpt-files@3": [".step-0000004.tmp", "latest", "step-0000000", "step-0000002"],  # tensors written, no state
    "ckpt-renamed@2": ["latest", "step-0000000", "step-0000002"],   # renamed; latest still names step 0
    "ckpt-latest@3": ["latest", "step-0000000", "step-0000002", "step-0000004"],   # latest moved, not rotated
    "adapter-written@1": ["latest", "step-0000004", "step-0000006"],   # final adapter beside, not renamed
}
# SIGKILL between the +eps and -eps passes of step 4: the 9th weight move of the fused
# schedule (steps 1 and 3 move 3 times: +eps, -2eps, update with the next +eps; steps 2
# and 4, after a carried +eps and before a pause, twice)
MID_STEP = ("import os, signal\nfrom mezo_core.interfaces import LocalTensorsBackend\n"
            "real = LocalTensorsBackend.perturb\nmoves = []\n"
            "def perturb(self, terms, decay=1.0, direction=None):\n"
            "    real(self, terms, decay, direction)\n    moves.append(terms)\n"
            "    if len(moves) == 9:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "LocalTensorsBackend.perturb = perturb")


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_llama):
    """Every kill point's run, in child processes (one per CPU at a time): point -> config."""
    points, running, done = [*KILLS, "mid-step"], {}, {}
    while points or running:
        while points and len(running) < (os.cpu_count() or 2):
            point = points.pop(0)
            cfg = config(tmp_path_factory.mktemp(point.replace("@", "-")), tiny_llama)
            running[point] = cfg, start_child(cfg, **({"code": MID_STEP} if point == "mid-step" else
                                                       {"fault": point}))
        point = next(iter(running))
        cfg, proc = running.pop(point)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, err[-2000:])
        done[point] = cfg
    return done


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_at_a_checkpoint_point_then_resume_is_bitwise(point, killed, reference, capsys):
    cfg = killed[point]
    run = cfg.parent / "run"
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == KILLS[point]
    if point == "ckpt-renamed@2":
        assert (ckpts / "latest").read_text() == "step-0000000"
    if point == "adapter-written@1":
        # the first adapter written is last/ (the trained weights), then adapter/
        assert [p.name for p in run.glob("last.tmp*")] and not (run / "last").exists()
        assert not (run / "adapter").exists()
    assert (run / "run.lock").exists()                           # left by the killed run
    if point == "ckpt-tmp@1":
        # nothing completed: a fresh start must not be blocked (in a copy), nor a --resume
        copy = cfg.parent / "copy"
        shutil.copytree(run, copy)
        assert train(cfg, f"out_dir={copy}") == 0
        assert_same_run(copy, reference)
    assert train(cfg, "--resume") == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err and "Traceback" not in err
    if point == "ckpt-renamed@2":
        assert "step-0000002 was completed after checkpoints/latest" in err
    assert_same_run(run, reference)


def test_kill_mid_step_then_resume_is_bitwise(killed, reference, capsys):
    cfg = killed["mid-step"]
    run = cfg.parent / "run"
    done = [r["step"] for r in metric_rows(run)]
    assert done == [1, 2, 3]                           # died in step 4, after step 2's checkpoint
    assert train(cfg, "--resume") == 0
    assert_same_run(run, reference)


def lock_holder(cfg, run):
    """A child run stopped (SIGSTOP) once it holds ``run``'s lock."""
    holder = start_child(cfg, "lock", sig="SIGSTOP")
    deadline = time.monotonic() + 120
    while not (run / "run.lock").exists() or f"pid {holder.pid} " not in (run / "run.lock").read_text():
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    return holder


def test_second_run_is_refused_and_a_killed_holder_lock_is_taken_over(reference, tmp_path, tiny_llama, capsys):
    cfg = config(tmp_path, tiny_llama)
    run = tmp_path / "run"
    holder = lock_holder(cfg, run)
    try:
        for args in ([], ["--resume"]):
            assert train(cfg, *args) == 2
            err = error_text(capsys.readouterr().err)
            assert "in use by another run" in err and f"pid {holder.pid} " in err, err
            assert len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]   # the refused runs wrote nothing
    finally:
        holder.kill()                                   # SIGKILL: the holder dies, its lock is stale
        holder.communicate()
    assert train(cfg) == 0
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid} " \
        in capsys.readouterr().err
    assert_same_run(run, reference)


# -- damaged checkpoints: fall back to the newest intact one -----------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_llama):
    """A run stopped (Ctrl-C) after step 5: checkpoints step-2 and step-4, latest = step-4."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = config(tmp, tiny_llama)
    get_registry.cache_clear()
    stopper = InterruptAt(5)
    get_registry().pm.register(stopper)
    try:
        assert main(["train", "-c", str(cfg)], get_registry()) == 130
    finally:
        get_registry.cache_clear()
    ckpts = tmp / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    return cfg, tmp / "run"


@pytest.fixture
def stopped_copy(stopped_run, tmp_path):
    """(config, folder): a copy of the stopped run in another place (out_dir names it), for a
    test to damage or resume."""
    cfg, stopped = stopped_run
    run = tmp_path / "moved"
    shutil.copytree(stopped, run)
    return cfg, run


def _nan_adapter(folder):
    """A NaN in the adapter, the manifest made to match: only the finite check can tell."""
    f = folder / ADAPTER
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(f))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][ADAPTER] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(f):
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01                                     # inside the tensor data, same size
    f.write_bytes(bytes(data))


STEP4 = "checkpoints/step-0000004"
DAMAGE = {   # what is done to the stopped run -> the warning must name it
    "state.json truncated": (lambda r: _truncate(r / STEP4 / "state.json"), "state.json"),
    "state.json garbage": (lambda r: (r / STEP4 / "state.json").write_bytes(b"\x00{garbage"), "state.json"),
    "state.json missing": (lambda r: (r / STEP4 / "state.json").unlink(), "state.json is missing"),
    "adapter truncated": (lambda r: _truncate(r / STEP4 / ADAPTER), ADAPTER),
    "adapter missing": (lambda r: (r / STEP4 / ADAPTER).unlink(), f"{ADAPTER} is missing"),
    "adapter bit flip": (lambda r: _flip_byte(r / STEP4 / ADAPTER), f"{ADAPTER} does not match"),
    "adapter NaN": (lambda r: _nan_adapter(r / STEP4), "non-finite"),
    "adapter_config.json garbage": (lambda r: (r / STEP4 / "adapter_config.json").write_text("{"),
                                    "adapter_config.json"),
    "manifest.json truncated": (lambda r: _truncate(r / STEP4 / "manifest.json"), "manifest.json"),
    "manifest.json missing": (lambda r: (r / STEP4 / "manifest.json").unlink(), "no manifest.json"),
    "latest names a missing folder": (lambda r: (r / "checkpoints/latest").write_text("step-0000009"),
                                      "names step-0000009, which is missing"),
    "latest is a path": (lambda r: (r / "checkpoints/latest").write_text("../../../etc"),
                         "not a checkpoint name"),
}


def _truncate(f):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_newest_intact(damage, stopped_copy, reference, capsys):
    cfg, run = stopped_copy                              # a moved run folder resumes too (out_dir is neutral)
    spoil, needle = DAMAGE[damage]
    spoil(run)
    assert train(cfg, "--resume", f"out_dir={run}") == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("mezo-run: warning: checkpoint damage")]
    assert len(warning) == 1 and needle in warning[0], err
    resumed_from = "step-0000002" if damage.split()[0] != "latest" else "step-0000004"
    assert warning[0].endswith(f"resuming from the newest intact checkpoint, {resumed_from}")
    assert "Traceback" not in err
    assert_same_run(run, reference)


def test_no_intact_checkpoint_is_one_clear_error(stopped_copy, capsys):
    cfg, run = stopped_copy
    _truncate(run / "checkpoints/step-0000002" / ADAPTER)
    (run / STEP4 / "state.json").write_text("[]")
    assert train(cfg, "--resume", f"out_dir={run}") == 2
    err = error_text(capsys.readouterr().err)
    assert "no intact checkpoint" in err and "step-0000002" in err and "step-0000004" in err
    assert len(err.strip().splitlines()) == 1
    assert train(cfg, f"out_dir={run}") == 2             # nor a fresh start over it
    assert "already holds a run" in capsys.readouterr().err


def test_kill_inside_a_folder_swap_keeps_the_checkpoint(stopped_copy, reference, capsys):
    """A kill between the two renames of rewriting a checkpoint (adapter.replace_dir):
    ``step-N.old`` holds it, ``step-N`` is gone; the start puts it back."""
    cfg, run = stopped_copy
    (run / STEP4).rename(run / (STEP4 + ".old"))
    shutil.copytree(run / (STEP4 + ".old"), run / "checkpoints/.step-0000004.tmp")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 0.6')                # a row cut short by the kill
    assert train(cfg, "--resume", f"out_dir={run}", "keep_checkpoints=1") == 0
    assert "damage" not in capsys.readouterr().err       # step-4 came back whole
    assert_same_run(run, reference)


# -- what a --resume checks, and what it lets change ------------------------------------
def test_changed_data_is_refused_on_resume(stopped_run, stopped_copy, tmp_path, capsys):
    _, stopped = stopped_run
    cfg, run = stopped_copy
    data = Path(cfg).parent / "data"
    for name, key in (("train.jsonl", "task.train"), ("dev.jsonl", "task.dev")):
        f = data / name
        original = f.read_text()
        flipped = [dict(r, label=1 - r["label"]) for r in map(json.loads, original.splitlines())]
        f.write_text("".join(json.dumps(r) + "\n" for r in flipped))   # same size, other labels
        try:
            assert train(cfg, "--resume", f"out_dir={run}") == 2
        finally:
            f.write_text(original)
        err = error_text(capsys.readouterr().err)
        assert f"{key} {f} is not the file this run started with (same size, other sha256" in err, err
        assert len(err.strip().splitlines()) == 1
    model = tmp_path / "model"                           # the model: a copy with one byte changed
    shutil.copytree(json.loads((stopped / STEP4 / "state.json").read_text())["fingerprints"]["model.path"]["path"],
                    model)
    _flip_byte(model / "model.safetensors")
    assert train(cfg, "--resume", f"out_dir={run}", f"model.path={model}") == 2
    err = error_text(capsys.readouterr().err)
    assert f"model.path {model} is not the file this run started with (same size, other sha256" in err, err
    before = (run / "metrics.jsonl").read_text()
    assert before == (stopped / "metrics.jsonl").read_text()   # the refusals changed nothing


def test_model_fingerprint_is_recorded(stopped_run):
    _, stopped = stopped_run
    state = json.loads((stopped / STEP4 / "state.json").read_text())
    prints = state["fingerprints"]
    assert set(prints) == {"task.train", "task.dev", "model.path"}
    data = Path(prints["task.train"]["path"])
    assert prints["task.train"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert prints["task.train"]["size"] == data.stat().st_size
    model = Path(prints["model.path"]["path"])
    assert prints["model.path"]["size"] == sum(f.stat().st_size for f in model.rglob("*") if f.is_file())


def test_trajectory_neutral_changes_resume_bitwise(stopped_copy, reference, capsys, monkeypatch):
    """Another out_dir (the folder moved), progress/plot/eval_batch_size/keep_checkpoints
    changed, and the training file named by a relative path: accepted."""
    cfg, run = stopped_copy
    data = Path(cfg).parent
    monkeypatch.chdir(data)
    assert train(cfg, "--resume", f"out_dir={run}", "progress=true", "plot=true", "eval_batch_size=3",
                 "keep_checkpoints=4", "task.train=data/train.jsonl") == 0
    capsys.readouterr()
    assert (run / "training.png").exists()
    assert_same_run(run, reference, same_eval=False)


def test_a_change_of_trajectory_is_refused_with_the_field(stopped_copy, capsys):
    cfg, run = stopped_copy
    for override, field in (("seed=1", "seed"), ("checkpoint_every=3", "checkpoint_every"),
                            ("mezo.steps=3", "mezo.steps=3 is below the 4 steps")):
        assert train(cfg, "--resume", f"out_dir={run}", override) == 2
        err = error_text(capsys.readouterr().err)
        assert field in err and len(err.strip().splitlines()) == 1, err


def test_extending_steps_of_a_constant_schedule(reference, tiny_llama, tmp_path, capsys):
    """A finished 6-step run extended to 8 steps ends where an 8-step run ends."""
    longer = tmp_path / "longer"
    assert train(config(longer, tiny_llama, **{"mezo.steps": 8})) == 0
    cfg = config(tmp_path, tiny_llama)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert train(cfg, "--resume", f"out_dir={run}", "mezo.steps=8") == 0
    capsys.readouterr()
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))
    assert json.loads((run / "summary.json").read_text())["step"] == 8
    assert_same_run(run, longer / "run")


def test_extending_steps_of_a_schedule_that_depends_on_them_is_refused(tiny_llama, tmp_path, capsys):
    cfg = config(tmp_path, tiny_llama, **{"mezo.steps": 2, "zero_shot": False,
                                          "mezo.lr_schedule": "cosine", "mezo.lr_end": 1e-3})
    assert train(cfg) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert train(cfg, "--resume", "mezo.steps=4") == 2
    err = error_text(capsys.readouterr().err)
    assert "mezo.steps 2 -> 4 changes mezo.lr_schedule at a step already taken (step 2:" in err, err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


# -- non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["mezo.lr=inf", "mezo.lr=nan", "mezo.eps=inf", "mezo.eps=nan",
                                      "mezo.eps=-inf"])
def test_non_finite_lr_or_eps_is_refused(override, tiny_llama, tmp_path, capsys):
    cfg = config(tmp_path, tiny_llama)
    assert train(cfg, override) == 2
    err = error_text(capsys.readouterr().err)
    assert f"config field '{override.split('=')[0]}'" in err and ("finite" in err or "a number in" in err)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_never_writes_a_non_finite_tensor(tiny_llama, tmp_path, capsys):
    """lr=1e38 overflows the adapter to inf after the first step: whatever the loop does
    about it, no checkpoint or adapter on disk holds a non-finite value."""
    cfg = config(tmp_path, tiny_llama, **{"mezo.lr": 1e38})
    rc = train(cfg)
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, err
    if rc == 2:
        assert "non-finite" in err and "not written" in err, err
    assert_finite(tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp*"))


def test_eval_refuses_a_non_finite_adapter(reference, tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad-adapter"
    shutil.copytree(reference / "adapter", bad)
    tensors = load_file(str(bad / ADAPTER))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[1] = float("inf")
    save_file(tensors, str(bad / ADAPTER))
    cfg = config(tmp_path, tiny_llama)
    get_registry.cache_clear()
    assert main(["eval", "-c", str(cfg), "--adapter", str(bad)]) == 2
    err = error_text(capsys.readouterr().err)
    assert f"{bad / ADAPTER} (refused): tensor {name!r} holds 1 non-finite value(s)" in err, err
    assert len(err.strip().splitlines()) == 1


# -- the checkpoint writer on its own: extra tensors, rotation, refusal -------------------
class FolderBackend:
    """Just enough of a backend for RunFolder: its adapter is a dict of tensors."""

    def __init__(self, tensors):
        self.tensors = tensors

    def save_adapter(self, path):
        from mezo_core.adapter import write_tensors
        write_tensors(self.tensors, path, ADAPTER)


def test_extra_tensors_rotation_and_a_non_finite_refusal(tmp_path, capsys):
    from types import SimpleNamespace

    from mezo_core.checkpoints import RunFolder
    from mezo_core.errors import MezoError
    from mezo_core.runstate import RunState
    seed = 1234
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    adapter = {"a": torch.randn(3, 4, generator=gen)}
    anchor = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(2, generator=gen)}
    folder = RunFolder(tmp_path / "run")
    folder.lock()
    try:
        for step in (1, 2, 3):
            folder.write_checkpoint(FolderBackend(adapter), {"step": step, "guard": {"bad": step}}, keep=2,
                                    extra={"anchor": anchor})
        names = sorted(p.name for p in folder.ckpts.iterdir())
        assert names == ["latest", "step-0000002", "step-0000003"]            # keep=2
        path, state = folder.find(repair=True)
        assert path.name == "step-0000003" and state == {"step": 3, "guard": {"bad": 3}}
        manifest = json.loads((path / "manifest.json").read_text())["files"]
        assert set(manifest) == {ADAPTER, "anchor.safetensors", "state.json"}
        got = RunState.load_extra(SimpleNamespace(resumed_from=path), "anchor")
        assert got.keys() == anchor.keys() and all(got[k].equal(anchor[k]) for k in anchor)
        assert RunState.load_extra(SimpleNamespace(resumed_from=path), "other") is None
        # a NaN anywhere (here in the extra tensors) is refused, and nothing changes on disk
        spoiled = {**anchor, "b": torch.tensor([1.0, float("nan")])}
        with pytest.raises(MezoError, match=r"checkpoint step-0000004, anchor.safetensors: tensor 'b' holds 1 "
                                            r"non-finite value\(s\).*not written"):
            folder.write_checkpoint(FolderBackend(adapter), {"step": 4}, keep=1, extra={"anchor": spoiled})
        assert sorted(p.name for p in folder.ckpts.iterdir()) == names
        assert (folder.ckpts / "latest").read_text() == "step-0000003"
        # the newest checkpoint damaged: rotation after the next write keeps the intact one it wrote
        _truncate(folder.ckpts / "step-0000003" / "anchor.safetensors")
        path, state = folder.find(repair=True)
        assert path.name == "step-0000002" and "anchor.safetensors" in capsys.readouterr().err
        folder.write_checkpoint(FolderBackend(adapter), {"step": 3}, keep=1)   # replaces the damaged one
        assert sorted(p.name for p in folder.ckpts.iterdir()) == ["latest", "step-0000003"]
        assert folder.find(repair=True)[1] == {"step": 3}
    finally:
        folder.release()
    assert not (tmp_path / "run" / "run.lock").exists()
