"""Issue #31, the parts after the run folder and the config ranges: hostile data
files, adapters and models from outside, a full disk, what the guard names, multiple
choice with task.template, and two hypothesis fuzzes (the config loader and the data
readers). Every case asserts the exit code and the one line (``mezo-run: error: ...``
naming the file and line, or the field), never only "no crash"."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mezo_core import MezoError
from mezo_core.cli import main
from mezo_core.config import MAX_LORA_R, load_config
from mezo_core.data import MAX_LABEL_CHARS, MAX_LINE_CHARS, Task, read_records
from mezo_core.registry import Registry, get_registry, make_plugin_manager
from test_bad_input import FUZZ, GOOD, _jsonl, one_error_line, refused, run_cfg  # noqa: F401
from tiny import write_run_config

ROOT = Path(__file__).resolve().parents[1]


# -- 1. the data readers' limits -------------------------------------------------------
DIGITS = sys.get_int_max_str_digits() or 4300
DATA_LIMITS = {   # name: (file name, text, needles after the file name)
    "JSON label of thousands of digits": (
        "d.jsonl", _jsonl(GOOD) + '{"text": "ok", "label": ' + "9" * (DIGITS + 700) + "}\n",
        ["line 3", f"a number of more than {DIGITS} digits"]),
    "JSON label of 2000 digits": ("d.jsonl", _jsonl(GOOD) + '{"text": "ok", "label": ' + "9" * 2000 + "}\n",
                                  ["line 3", "is an integer of 6644 bits: not a label"]),
    "label text of 5000 digits": ("d.jsonl", _jsonl(GOOD + [{"text": "ok", "label": "9" * 5000}]),
                                  ["line 3", "is 5000 characters: not a label", f"at most {MAX_LABEL_CHARS}"]),
    "TSV label of 5000 digits": ("d.tsv", "sentence\tlabel\nfine\t1\nok\t" + "1" * 5000 + "\n",
                                 ["line 3", "is 5000 characters: not a label"]),
    "lone surrogate in a text": ("d.jsonl", _jsonl(GOOD) + '{"text": "caf\\ud800e", "label": 0}\n',
                                 ["line 3", "field 'text' holds a lone surrogate '\\ud800' at character 3"]),
    "lone low surrogate": ("d.jsonl", '{"text": "\\udfff", "label": 0}\n' + _jsonl(GOOD),
                           ["line 1", "lone surrogate '\\udfff'"]),
    "a 1 MB JSONL line": ("d.jsonl", _jsonl(GOOD + [{"text": "a" * 1_000_000, "label": 0}]),
                          ["line 3", "1000024 characters, more than the 131072 a line may hold"]),
    "a 1 MB TSV line": ("d.tsv", "sentence\tlabel\nfine\t1\n" + "a " * 500_000 + "\t0\n",
                        ["line 3", "1000002 characters, more than the 131072"]),
}


@pytest.mark.parametrize("case", list(DATA_LIMITS))
def test_data_limits_are_one_line_naming_file_and_line(case, run_cfg, tmp_path, capsys):
    """Before: a traceback (ValueError of the int digits limit), or loaded and then a
    traceback in the tokenizer (the surrogate) or an allocation of 1 TB (the 1 MB line)."""
    name, text, needles = DATA_LIMITS[case]
    bad = tmp_path / name
    bad.write_text(text, encoding="utf-8")
    line = refused(capsys, ["train", "-c", str(run_cfg), f"task.train={bad}"], *needles, run=tmp_path / "run")
    assert line.startswith(f"mezo-run: error: {bad}, line ") and len(line) < 400, line


def test_a_line_at_the_limit_loads(tmp_path):
    f = tmp_path / "long.jsonl"
    text = "word " * ((MAX_LINE_CHARS - 40) // 5)
    f.write_text(_jsonl([{"text": text, "label": 1}]))
    assert len(f.read_text().splitlines()[0]) <= MAX_LINE_CHARS
    assert read_records(f, "classification")[0].text == text


@pytest.mark.parametrize("kind, row, needle", [
    ("completion", '{"prompt": "p", "completion": "x\\ud83d"}', "field 'completion' holds a lone surrogate"),
    ("completion", '{"prompt": "\\udc00", "completion": "x"}', "field 'prompt' holds a lone surrogate"),
    ("multiple_choice", '{"text": "t", "choices": [" a", " \\ud800"], "label": 0}', "field 'choices[1]' holds a lone"),
])
def test_lone_surrogates_in_every_text_field(kind, row, needle, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(row + "\n")
    with pytest.raises(MezoError) as exc:
        read_records(f, kind)
    assert str(exc.value).startswith(f"{f}, line 1: {needle}"), str(exc.value)


# -- 2. adapters and models from outside --------------------------------------------------
def _adapter(folder, model, conf=None, tensors=None):
    """A PEFT adapter (r=2 on q,v of every layer) for the tiny model; ``conf`` updates its
    adapter_config.json, ``tensors(state)`` changes its tensors."""
    from mezo_core.adapter import adapter_shapes, initial_adapter, write_peft_adapter
    lora = SimpleNamespace(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"], layers=None)
    path = write_peft_adapter(initial_adapter(adapter_shapes(model, lora), seed=5), lora, str(model), folder)
    if conf:
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, **conf}))
    if tensors:
        state = load_file(str(path / "adapter_model.safetensors"))
        tensors(state)
        save_file(state, str(path / "adapter_model.safetensors"))
    return path


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"   # [2, 64] on the tiny model


def _set(name, value):
    return lambda state: state.__setitem__(name, value(state[name]) if callable(value) else value)


ADAPTER_CASES = {   # name: (adapter_config.json changes, tensor change, needles)
    "r = 2**70": ({"r": 2 ** 70}, None, ["adapter_config.json", "field 'r'", f"[1, {MAX_LORA_R}]"]),
    "r = 1e8": ({"r": 1e8}, None, ["adapter_config.json", "field 'r': 100000000.0 is not an integer"]),
    "lora_alpha nan": ({"lora_alpha": float("nan")}, None, ["adapter_config.json", "field 'lora_alpha': nan"]),
    "lora_alpha 1e308": ({"lora_alpha": 1e308}, None, ["field 'lora_alpha'", "(0, 1e6]"]),
    "peft_type PROMPT_TUNING": ({"peft_type": "PROMPT_TUNING"}, None,
                                ["adapter_config.json", "peft_type 'PROMPT_TUNING' is not supported"]),
    "DoRA": ({"use_dora": True}, None, ["field 'use_dora'", "is not supported"]),
    "layers -1": ({"layers_to_transform": [-1]}, None, ["field 'layers_to_transform'"]),
    "a tensor of the wrong shape": (None, _set(Q_A, torch.zeros(3, 7)),
                                    ["adapter_model.safetensors", Q_A, "shape [3, 7]", "needs [2, 64]"]),
    "a [1, n] tensor that would broadcast": (None, _set(Q_A, lambda t: t[:1].clone()),
                                            ["adapter_model.safetensors", "shape [1, 64]", "needs [2, 64]"]),
    "an int64 tensor": (None, _set(Q_A, lambda t: (t * 100).to(torch.int64)),
                        ["adapter_model.safetensors", Q_A, "is int64, not a floating-point type"]),
    "a tensor the model's adapter lacks": (None, _set("base_model.model.lm_head.lora_A.weight", torch.zeros(2, 64)),
                                           ["lm_head.lora_A.weight' is not part of this model's adapter"]),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_eval_checks_an_adapter_before_use(case, run_cfg, tmp_path, tiny_llama, capsys):
    """Before: r=2**70 named only 'lora.r', r=1e8 an OmegaConf message, PROMPT_TUNING and
    DoRA evaluated as plain LoRA, a wrong shape a traceback, a [1, 64] tensor broadcast into
    [2, 64] and an int64 tensor cast, both without a word."""
    conf, tensors, needles = ADAPTER_CASES[case]
    adapter = _adapter(tmp_path / "adapter", tiny_llama, conf, tensors)
    refused(capsys, ["eval", "-c", str(run_cfg), "--adapter", str(adapter)], adapter, *needles)


@pytest.mark.parametrize("case", ["peft_type PROMPT_TUNING", "a [1, n] tensor that would broadcast",
                                  "an int64 tensor", "DoRA", "r = 2**70"])
def test_export_checks_an_adapter_before_use(case, run_cfg, tmp_path, tiny_llama, capsys):
    """Before: PROMPT_TUNING a TypeError traceback, DoRA and int64 merged (rc 0)."""
    conf, tensors, needles = ADAPTER_CASES[case]
    adapter = _adapter(tmp_path / "adapter", tiny_llama, conf, tensors)
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(out), "-c", str(run_cfg), "--adapter", str(adapter)]) == 2
    line = one_error_line(capsys)
    assert str(adapter) in line and all(n in line for n in needles), line
    assert not out.exists() and not list(tmp_path.glob("merged.tmp*"))


def test_a_good_adapter_still_evaluates_and_exports(run_cfg, tmp_path, tiny_llama, capsys):
    adapter = _adapter(tmp_path / "adapter", tiny_llama)
    assert main(["eval", "-c", str(run_cfg), "--adapter", str(adapter)]) == 0
    get_registry.cache_clear()
    assert main(["export", "--merge", str(tmp_path / "merged"), "-c", str(run_cfg), "--adapter", str(adapter)]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


class Planted:
    """A pickle that would leave a marker file behind if it were ever unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_copy(tiny_llama, folder):
    shutil.copytree(tiny_llama, folder)
    return folder


@pytest.mark.parametrize("case", ["pickle weights", "a planted pickle", "remote code", "unknown model_type"])
@pytest.mark.parametrize("command", ["eval", "train", "export"])
def test_model_folder_from_outside_is_checked_before_use(case, command, run_cfg, tmp_path, tiny_llama, capsys):
    """Before: tracebacks (a pickle that torch's weights_only loader refuses; a model
    whose code auto_map names: transformers asks for trust_remote_code). Nothing in the
    folder ever runs: the markers the pickle and the code would write stay absent."""
    model = _model_copy(tiny_llama, tmp_path / "model")
    marker = tmp_path / "executed"
    if case in ("pickle weights", "a planted pickle"):
        state = load_file(str(model / "model.safetensors"))
        (model / "model.safetensors").unlink()
        torch.save(state if case == "pickle weights" else {"x": Planted(marker)}, model / "pytorch_model.bin")
        needles = [model / "pytorch_model.bin", "pickle weights", "never unpickles"]
    else:
        conf = json.loads((model / "config.json").read_text())
        conf["model_type"] = "planted"
        if case == "remote code":
            conf["auto_map"] = {"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"}
            (model / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        (model / "config.json").write_text(json.dumps(conf))
        needles = [model / "config.json", "model_type 'planted'",
                   "needs code of its own (auto_map: planted.Config, planted.Model), which mezo-run never runs"
                   if case == "remote code" else "is no architecture transformers ships"]
    argv = {"eval": ["eval", "-c", str(run_cfg)], "train": ["train", "-c", str(run_cfg)],
            "export": ["export", "--merge", str(tmp_path / "merged"), "-c", str(run_cfg), "--adapter",
                       str(_adapter(tmp_path / "adapter", tiny_llama))]}[command]
    refused(capsys, [*argv, f"model.path={model}"], "model.path", *needles, run=tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_auto_map_beside_a_known_architecture_loads_without_running_it(run_cfg, tmp_path, tiny_llama, capsys):
    """transformers' own Llama class is used; the folder's code is never imported."""
    model = _model_copy(tiny_llama, tmp_path / "model")
    marker = tmp_path / "executed"
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "auto_map": {"AutoModelForCausalLM": "planted.Model"}}))
    (model / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert main(["eval", "-c", str(run_cfg), f"model.path={model}"]) == 0
    assert "dev_accuracy" in json.loads(capsys.readouterr().out) and not marker.exists()


# -- 3. a full disk ------------------------------------------------------------------------
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


def _leftovers(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".old"))


def _digest(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_disk_full_at_a_safetensors_write_is_one_line(tmp_path, tiny_llama, capsys, monkeypatch, fresh_registry):
    """Before: a SafetensorError traceback. Now one line naming the checkpoint's file, no
    lock and no temp folder left; with the space back, --resume ends on the adapter of an
    uninterrupted run."""
    from safetensors import SafetensorError
    from safetensors import torch as st_torch
    ref = write_run_config(tmp_path / "ref", tiny_llama, {"mezo.steps": 4, "checkpoint_every": 2})
    assert main(["train", "-c", str(ref)]) == 0
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 4, "checkpoint_every": 2})
    real = st_torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):   # the disk fills at step 2's adapter
        if "step-0000002" in str(filename) and str(filename).endswith("adapter_model.safetensors"):
            raise SafetensorError(ENOSPC_TEXT)
        return real(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(st_torch, "save_file", full_disk)
    get_registry.cache_clear()
    assert main(["train", "-c", str(cfg)]) == 2
    line = one_error_line(capsys)
    run = tmp_path / "run"
    assert line == (f"mezo-run: error: {run}/checkpoints/step-0000002/adapter_model.safetensors: cannot write: "
                    "no space left on device: free some space, then run again (a training run continues from "
                    "its last checkpoint with --resume)"), line
    assert not (run / "run.lock").exists() and _leftovers(run) == []
    monkeypatch.setattr(st_torch, "save_file", real)
    get_registry.cache_clear()
    assert main(["train", "-c", str(cfg), "--resume"]) == 0
    a, b = _digest(run), _digest(tmp_path / "ref" / "run")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_disk_full_at_the_lock_leaves_no_lock(run_cfg, tmp_path, capsys, monkeypatch):
    """Before: a line that named no file, and run.lock left behind (taken over, with a
    warning, by the next run)."""
    import errno
    real = os.pwrite

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", pwrite)
    refused(capsys, ["train", "-c", str(run_cfg)], tmp_path / "run" / "run.lock", "cannot write: no space left")
    assert not (tmp_path / "run" / "run.lock").exists()
    monkeypatch.setattr(os, "pwrite", real)
    get_registry.cache_clear()
    assert main(["train", "-c", str(run_cfg)]) == 0
    assert "taking over the lock" not in capsys.readouterr().err


CHILD = r'''
import contextlib, io, json, os, shutil, sys
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
from mezo_core.cli import main
from mezo_core.registry import Registry, make_plugin_manager
mnt, cfg = sys.argv[1], sys.argv[2]
run, registry = os.path.join(mnt, "run"), Registry(make_plugin_manager())

def clear():
    for p in os.listdir(mnt):
        shutil.rmtree(os.path.join(mnt, p)) if os.path.isdir(os.path.join(mnt, p)) else os.unlink(os.path.join(mnt, p))

def train(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", "-c", cfg, f"out_dir={run}", *args], registry=registry)
    return rc, err.getvalue()

def adapter():
    f = os.path.join(run, "adapter", "adapter_model.safetensors")
    return open(f, "rb").read().hex() if os.path.exists(f) else None

def leftovers():
    return sorted(os.path.relpath(os.path.join(d, n), run) for d, ds, fs in os.walk(run) for n in ds + fs
                  if ".tmp" in n or n.endswith(".old"))

clear()
print(json.dumps({"reference": train()[0], "adapter": adapter()}), flush=True)
k, step, last = 0, 1, None
while k < 400:
    clear()
    st = os.statvfs(mnt)   # free space: k pages
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * max(0, (st.f_bavail - k) * st.f_frsize))
    rc, err = train()
    row = {"k": k, "rc": rc, "err": err, "lock": os.path.exists(os.path.join(run, "run.lock")),
           "leftovers": leftovers() if os.path.isdir(run) else []}
    os.unlink(os.path.join(mnt, "filler"))
    if rc != 0:
        row["resume"], row["resume_err"] = train("--resume")
        row["adapter"] = adapter()
    print(json.dumps(row), flush=True)
    if rc == 0:
        break
    # one more page per run while the failing file changes; faster through a run of one file
    named = err.split(": cannot write")[0]
    step, last = (min(2 * step, 4) if named == last else 1), named
    k += step
'''


def _can_mount_tmpfs(folder):
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {folder}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow   # ~20 s a case: a training run and its --resume per page of free space
@pytest.mark.parametrize("overrides", [
    {"checkpoint_every": 2, "eval_every": 2, "zero_shot": True, "plot": True, "report_to": ["jsonl", "csv"],
     "selection.significance": 0, "task.n_val": 0},
    {"checkpoint_every": 0, "zero_shot": False, "plot": False}], ids=["checkpoints-best-csv-plot", "last-adapter"])
def test_disk_full_at_every_write_point(overrides, tmp_path, tiny_llama):
    """A real full disk: a run on a small tmpfs (a user and mount namespace of its own)
    with k pages left free, k = 0, 1, 2, ... until the run completes: each write point in
    turn meets ENOSPC (the lock, config.yaml, the logs, each checkpoint file, latest,
    best/, last/, adapter/, summary.json, training.png). Every run ends rc 0 or rc 2 with
    one line naming the file and the full disk; no run.lock or temp file stays; with the
    space back, --resume ends on the uninterrupted run's adapter, bit for bit."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs `unshare -rm` and a tmpfs mount (user and mount namespaces)")
    cfg = write_run_config(tmp_path, tiny_llama, {"mezo.steps": 4, **overrides})
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=2m none "{mnt}" && '
                           f'exec "{sys.executable}" "{tmp_path / "child.py"}" "{mnt}" "{cfg}"'],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows and rows[0]["reference"] == 0 and rows[-1]["rc"] == 0, proc.stderr[-3000:]
    reference, named = rows[0]["adapter"], set()
    for row in rows[1:-1]:
        err = row["err"]
        assert row["rc"] == 2 and "Traceback" not in err, (row["k"], err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("mezo-run: error: ") and sum("mezo-run: error" in x for x in lines) == 1, err
        path, _, why = lines[-1].removeprefix("mezo-run: error: ").partition(": cannot write: ")
        assert path.startswith(str(mnt / "run")) and why.startswith("no space left on device: free some space"), err
        named.add(os.path.relpath(path, mnt / "run"))
        assert not row["lock"] and row["leftovers"] == [], row
        assert row["resume"] == 0 and row["adapter"] == reference, (row["k"], row["resume_err"][-2000:])
    want = ({"run.lock", "config.yaml", "metrics.jsonl", "evals.jsonl", "checkpoints/latest",
             "best/adapter_model.safetensors", "checkpoints/step-0000002/adapter_model.safetensors",
             "checkpoints/step-0000002/state.json", "checkpoints/step-0000002/manifest.json", "training.png"}
            if overrides["checkpoint_every"] else
            {"last/adapter_model.safetensors", "adapter/adapter_model.safetensors", "summary.json",
             "checkpoints/step-0000004/adapter_model.safetensors"})
    assert want <= named, sorted(named)


# -- 4. what the guard names -------------------------------------------------------------------
def _nan_model(tiny_llama, folder):
    model = _model_copy(tiny_llama, folder)
    state = load_file(str(model / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_a_non_finite_loss_before_any_update_names_the_model_not_lr(run_cfg, tmp_path, tiny_llama, capsys):
    """Before: 8 roll-backs, then exit 3 with "Lower mezo.lr (or mezo.eps)". Now the first
    step sees the loss is not finite at the starting weights themselves: exit 2, at once."""
    model = _nan_model(tiny_llama, tmp_path / "nan-model")
    refused(capsys, ["train", "-c", str(run_cfg), f"model.path={model}", "mezo.steps=3"],
            "the training loss of step 1's batch is not finite at the starting weights (no update applied yet)",
            "the model (model.dtype=float32), the adapter or the data give NaN/inf, not mezo.lr")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "run.lock").exists()


@pytest.mark.parametrize("at, cause", [
    (1, "the training loss went non-finite at the weights +- mezo.eps z alone (no update since step 0): lower "
        "mezo.eps"),
    (3, "the training loss went non-finite: lower mezo.lr (or mezo.eps)")])
def test_the_divergence_names_eps_or_lr(at, cause, run_cfg, capsys, monkeypatch):
    """A probe whose losses go NaN at step ``at`` (the weights themselves are fine): at the
    first step nothing was updated, so the perturbation alone did it -- mezo.eps; later, the
    updates since the anchor -- mezo.lr."""
    import mezo_builtin.estimators as trainer   # the built-in mezo estimator calls mezo.probe
    real, calls = trainer.probe, itertools.count(1)

    def probe(*args, **kwargs):
        result = real(*args, **kwargs)
        if next(calls) == at:
            result.losses_plus = [float("nan")] * len(result.losses_plus)
        return result
    monkeypatch.setattr(trainer, "probe", probe)
    assert main(["train", "-c", str(run_cfg), "mezo.steps=4", "guard.max_recoveries=0"]) == 3
    line = one_error_line(capsys)
    assert line == (f"mezo-run: error: training diverged: nonfinite at step {at} after 0 roll-backs (step size cut to "
                    f"0.1 x mezo.lr): {cause}, and start again; checkpoints hold only finite weights from before "
                    "the divergence"), line


def test_an_absurd_but_finite_state_is_a_divergence(run_cfg, tmp_path, capsys):
    """mezo.lr=1e30 with clean weights every step: the first update makes |w| ~ 1e28,
    finite. Before: trained on, checkpointed (weights up to 1.5e22 in `latest`). Now: past
    1000 x the starting adapter's largest |w| (1/sqrt(64), LoRA A's init bound) it is a
    divergence; nothing written holds a weight past the bound."""
    from mezo_core.guard import MAX_WEIGHT_RATIO
    assert main(["train", "-c", str(run_cfg), "mezo.lr=1e30", "mezo.fuse_steps=false", "mezo.steps=6",
                 "checkpoint_every=1", "guard.max_recoveries=0"]) == 3
    line = one_error_line(capsys)
    assert "training diverged: weights at step 1 after 0 roll-backs" in line, line
    assert "the weights grew to |w| = " in line and "past 1000 x the starting weights' largest |w| (0.125): " \
        "lower mezo.lr" in line, line
    for f in (tmp_path / "run").rglob("*.safetensors"):
        assert max(float(t.abs().max()) for t in load_file(str(f)).values()) <= MAX_WEIGHT_RATIO / 64 ** 0.5, f


def test_guard_weight_bound_and_its_state():
    from omegaconf import OmegaConf

    from mezo_core.config import GuardConfig
    from mezo_core.guard import Guard
    g = Guard(OmegaConf.structured(GuardConfig()))
    assert g.check_weights(1e30) is None            # no start measured yet: no bound
    g.start_scale = 0.125
    assert g.weight_limit() == 125.0 and g.check_weights(125.0) is None
    assert g.check_weights(125.1)["event"] == "weights"
    assert "non-finite" in g.check_weights(float("inf"))["cause"]
    g.start_scale = 0.0                               # a start of zeros: the bound's floor
    assert g.weight_limit() == 10.0
    again = Guard(OmegaConf.structured(GuardConfig()))
    again.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert again.start_scale == 0.0                   # the bound travels in checkpoints
    off = Guard(OmegaConf.structured(GuardConfig(enabled=False)))
    off.start_scale = 0.125
    assert off.check_weights(1e30) is None


@pytest.mark.parametrize("what, value", [("eps", float("nan")), ("eps", 0.0), ("lr", float("inf")), ("lr", -1.0)])
def test_a_schedule_value_that_is_not_finite_names_the_schedule(what, value):
    from mezo_core.stepper import _check_schedule
    with pytest.raises(MezoError, match=rf"^config field 'mezo\.{what}_schedule': schedule 'cosine' gave "
                                        rf"{what}={value} at step 3 \(mezo\.{what}, mezo\.{what}_end\): not a finite"):
        _check_schedule(f"mezo.{what}_schedule", "cosine", what, value, 2, positive=what == "eps")
    _check_schedule(f"mezo.{what}_schedule", "cosine", what, 1e-3, 2, positive=what == "eps")


# -- 5. multiple choice uses task.template ---------------------------------------------------
class CharTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [10 + ord(c) % 200 for c in text]}

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)


MC_ROWS = [{"text": "The man broke his toe", "choices": [" he dropped a hammer", " he got a hole in his sock"],
            "label": 0},
           {"text": "I poured water on my sleeping bag", "choices": [" it was wet", " it was dry"], "label": 0}]


def _mc_task(tmp_path, *overrides):
    data = tmp_path / "mc.jsonl"
    data.write_text(_jsonl(MC_ROWS))
    cfg = load_config(None, ["task.kind=multiple_choice", f"task.train={data}", f"task.dev={data}",
                             "task.k_per_class=null", *overrides])
    return Task(cfg.task, CharTokenizer())


def test_multiple_choice_prompts_follow_task_template(tmp_path):
    """Before: task.template was ignored for multiple choice (the prompt was the text), while
    the README and the config's own comment said it was used and validate() checked it."""
    tok = CharTokenizer()
    task = _mc_task(tmp_path, "task.template=Premise: {text}. What happened? Because")
    assert [r.text for r in task.train] == [r["text"] for r in MC_ROWS]   # every row, in file order
    for row, ex in zip(MC_ROWS, task.train_examples):
        assert ex.prompt_ids == tuple(tok(f"Premise: {row['text']}. What happened? Because")["input_ids"])
    plain = _mc_task(tmp_path, "task.template={text}")
    assert {e.prompt_ids for e in plain.train_examples} == {tuple(tok(r["text"])["input_ids"]) for r in MC_ROWS}


def test_multiple_choice_max_tokens_cuts_the_text_not_the_template(tmp_path):
    """Before: task.max_tokens with multiple choice was a TypeError (the completion path ran
    on a row without a completion)."""
    tok = CharTokenizer()
    task = _mc_task(tmp_path, "task.template=Q: {text} A:", "task.max_tokens=40")
    longest = max(len(tok(c, add_special_tokens=False)["input_ids"]) for r in MC_ROWS for c in r["choices"])
    for r in task.train:
        prompt = task.prompt(r)
        room = 40 - max(len(c) for c in task.candidates(r))
        assert len(prompt) <= room and tok.decode(prompt).startswith("Q: ") and tok.decode(prompt).endswith(" A:")
    assert longest < 40 and task.truncated == 4   # both rows, in train and in dev


def test_the_readme_says_multiple_choice_uses_the_template():
    readme = (ROOT / "README.md").read_text()
    assert "The prompt is `task.template`" in readme


# -- 6. fuzz: the config loader and the data readers through the command line's contract ------------
REGISTRY = None


def _registry():
    global REGISTRY
    if REGISTRY is None:
        REGISTRY = Registry(make_plugin_manager())
    return REGISTRY


def _fields():
    """Every dotted field of the resolved default config, plugin sections included."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(load_config(None, [], _registry()), resolve=False)
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            out.append(f"{prefix}{k}")
    walk(cfg, "")
    return sorted(out)


FIELDS = _fields()
NUMBERS = st.one_of(st.integers(-2 ** 80, 2 ** 80), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2 ** 63, 1e308, -1e-320, 1e-45, 0.5, 100000]))
YAMLISH = st.sampled_from(["null", "true", "[]", "{}", "[1, 2]", "{a: 1}", "[", "{", "'", "!!binary aGk=",
                           "${oc.env:HOME}", "${nope}", "*x", "&a 1", "{text}", "{text} It was", "nan", ".inf",
                           "-.inf", "1e400", "0x10", "1_000", "[' a', ' a']", "{text} {label}", "cpu", "cuda:9"])
VALUES = st.one_of(NUMBERS.map(str), YAMLISH, st.text(max_size=12),
                   st.lists(st.one_of(NUMBERS, st.text(max_size=4)), max_size=3).map(json.dumps))


def _config_contract(argv, keys):
    err, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv, registry=_registry())
    finally:
        torch.set_num_threads(threads)   # an accepted `threads=N` sets torch's
    err = err.getvalue()
    assert "Traceback" not in err, err
    if rc == 0:
        event("accepted")
        return
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mezo-run: error: "), err
    line = lines[0]
    # the line names the override or a field of it (its top section at least)
    assert any(k.split(".")[0] in line for k in keys), (keys, line)
    event("refused")


@settings(max_examples=150, **FUZZ)
@given(items=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_fuzz_config_fields_through_the_command_line(items):
    """Random values in random fields (every field of the config and of the installed
    plugins' sections): `mezo-run config` exits 0, or 2 with one line naming the field."""
    overrides = [f"{k}={v}" for k, v in items]
    _config_contract(["config", *overrides], [k for k, _ in items])


#: text as it stands between the quotes of a JSON string: random text (escaped), or escapes
#: that decode to lone surrogates, NUL, a non-character, or a long run
JSON_TEXT = st.one_of(st.text(max_size=20).map(lambda t: json.dumps(t)[1:-1]),
                      st.sampled_from(["\\ud800", "a\\udfffb", "\\ud83d\\ude00", "\\u0000", "\\uffff", "x" * 300]))
LABEL = st.one_of(st.integers(-3, 3), st.integers(-2 ** 200, 2 ** 200), st.sampled_from(["0", "1", " 1", "9" * 120]),
                  st.text(max_size=5), st.floats(), st.booleans(), st.none())
RAW_LINES = st.sampled_from(["{", "[]", "null", '{"text": "a"}', '{"text": "a", "label": 1e999}', "9" * 5000,
                             '{"text": "a", "label": ' + "9" * 5000 + "}",
                             '{"text": "' + "b" * (MAX_LINE_CHARS + 1) + '"}',
                             '{"text": "fine", "label": 1}', "", "  ", "sentence\tlabel"])
GOOD_ROW = st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\t\n\r"), min_size=1, max_size=20)
                    .filter(str.strip).map(lambda t: json.dumps(t)[1:-1]), st.sampled_from([0, 1, "1"]))
ROWS = st.lists(st.one_of(GOOD_ROW, GOOD_ROW, st.tuples(JSON_TEXT, LABEL), RAW_LINES), min_size=1, max_size=4)


def _line(row, tsv):
    if isinstance(row, str):
        return row
    text, label = row
    return f"{text}\t{label}" if tsv else f'{{"text": "{text}", "label": {json.dumps(label)}}}'


@settings(max_examples=150, **FUZZ)
@given(rows=ROWS, suffix=st.sampled_from([".jsonl", ".tsv"]))
def test_fuzz_data_lines_load_and_tokenize_or_are_one_line(rows, suffix, tmp_path_factory, tiny_tokenizer):
    """Random JSONL lines (or TSV rows of the same pieces): the file loads and the Task
    tokenizes every prompt, or a MezoError -- exit 2 at the command line -- of one line
    naming the file and line (``<path>, line N: ...``), or the field."""
    f = tmp_path_factory.mktemp("data") / f"d{suffix}"
    tsv = suffix == ".tsv"
    f.write_text(("sentence\tlabel\n" if tsv else "") + "".join(_line(r, tsv) + "\n" for r in rows), encoding="utf-8")
    try:
        cfg = load_config(None, [f"task.train={f}", f"task.dev={f}", "task.k_per_class=null"], _registry())
        task = Task(cfg.task, tiny_tokenizer)
    except MezoError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 600, message
        assert message.startswith((f"{f}, line ", f"task.train: {f}", f"task.dev: {f}")), message
        event("refused")
        return
    event("loaded")
    assert task.train and all(ex.prompt_ids and ex.target_ids for ex in task.train_examples)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_fuzz_data_line_through_the_command_line(run_cfg, tmp_path, capsys):
    """The readers' contract, end to end for a few hostile lines: exit 2, one line."""
    for i, line in enumerate(['{"text": "\\ud800", "label": 0}', '{"text": "a", "label": ' + "7" * 5000 + "}",
                              '{"text": "' + "z" * (MAX_LINE_CHARS + 1) + '", "label": 1}']):
        bad = tmp_path / f"d{i}.jsonl"
        bad.write_text(_jsonl(GOOD) + line + "\n")
        get_registry.cache_clear()
        refused(capsys, ["train", "-c", str(run_cfg), f"task.dev={bad}"], f"{bad}, line 3: ", run=tmp_path / "run")
