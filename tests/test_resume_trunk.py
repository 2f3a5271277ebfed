"""--resume is bit for bit with the frozen-trunk cache on (#26): a resumed process
starts with a cold cache, so the rows it meets get their trunk states computed in
other batches than in the uninterrupted run; a state must be a function of its
row alone. The oracle is an uninterrupted run of the same config (tiny Llama, LoRA
on its top two layers, so the two below are cached), compared bit for bit: every
step's losses, the evaluations and the adapter tensors."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mezo_builtin.eviction import FIFO
from test_faults import train
from tiny import write_run_config

STEPS = 12
TRAJECTORY = ("step", "loss", "loss_plus", "loss_minus", "grads", "seeds", "eps", "lr")
ADAPTER = "adapter_model.safetensors"
WORDS = "the movie was great fun film boring and dull a lovely story very not bad good plot".split()


def seed_of(default):
    """MEZO_TEST_SEED or ``default``, printed (pytest shows it with a failure)."""
    seed = int(os.environ.get("MEZO_TEST_SEED", default))
    print(f"seed {seed} (replay: MEZO_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Rows of 2 to 30 words (1 to 3 canonical widths of the trunk), two labels."""
    rng = random.Random(seed_of(26))
    folder = tmp_path_factory.mktemp("trunk-task")
    for name, n in (("train", 40), ("dev", 10)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
                f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return folder


def config(folder, model, task, steps=STEPS):
    """Batches of 4 from 16 training rows (a new order each epoch), 6 validation
    rows, an evaluation every 4 steps, a checkpoint every 2; the trunk cache is the default."""
    return write_run_config(folder, model, {
        "mezo.steps": steps, "mezo.batch_size": 4, "checkpoint_every": 2, "eval_every": 4,
        "task.train": str(task / "train.jsonl"), "task.dev": str(task / "dev.jsonl"),
        "task.k_per_class": 8, "task.n_val": 6, "lora.layers": [2, 3], "eval_batch_size": 4})


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evals(run):
    return [{k: v for k, v in r.items() if k in ("step", "label", "split", "accuracy", "loss", "examples")}
            for r in map(json.loads, (run / "evals.jsonl").read_text().splitlines())]


def assert_bitwise(run, reference):
    """Same trajectory (losses as the float64 JSON numbers), same evaluations, same adapter tensors."""
    got, want = rows(run), rows(reference)
    assert [{k: r[k] for k in TRAJECTORY} for r in got] == [{k: r[k] for k in TRAJECTORY} for r in want]
    dev = [k for k in want[0] if k.startswith(("dev_", "val_"))]
    assert [{k: r.get(k) for k in dev} for r in got] == [{k: r.get(k) for k in dev} for r in want]
    # every evaluation of the reference after zero-shot, by (step, split); an extended run
    # also holds its shorter run's final one
    figures = {}
    for e in evals(run):
        figures.setdefault((e["step"], e["split"]), set()).add((e["accuracy"], e["loss"], e["examples"]))
    for e in evals(reference):
        if e["label"] != "zero-shot":
            assert figures.get((e["step"], e["split"])) == {(e["accuracy"], e["loss"], e["examples"])}, e
    a, b = load_file(str(reference / "adapter" / ADAPTER)), load_file(str(run / "adapter" / ADAPTER))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, task):
    tmp = tmp_path_factory.mktemp("reference")
    assert train(config(tmp, tiny_llama, task)) == 0
    run = tmp / "run"
    assert max(r["hits"] for r in rows(run)) > 0          # the trunk cache served the steps
    return run


# SIGKILL between the +eps and -eps passes of step 7 (the fused schedule moves the
# weights 3 times in a step after a checkpoint-free step, twice in the others: the
# 16th move is step 7's -2 eps z)
KILL = ("import os, signal\nfrom mezo_core.interfaces import LocalTensorsBackend\n"
        "real = LocalTensorsBackend.perturb\nmoves = []\n"
        "def perturb(self, terms, decay=1.0, direction=None):\n"
        "    real(self, terms, decay, direction)\n    moves.append(terms)\n"
        "    if len(moves) == 16:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "LocalTensorsBackend.perturb = perturb")


def test_kill_9_mid_run_then_resume_is_bitwise_with_the_trunk_cache(reference, tiny_llama, task, tmp_path, capsys):
    cfg = config(tmp_path, tiny_llama, task)
    argv = ["train", "-c", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MEZO_FAULT", None)
    code = f"{KILL}\nimport sys\nfrom mezo_core.cli import main\nsys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    done = [r["step"] for r in rows(run)]
    assert 4 <= len(done) < STEPS and done == list(range(1, len(done) + 1)), done   # died mid-run
    assert train(cfg, "--resume") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_bitwise(run, reference)


def test_extending_steps_by_resume_is_bitwise_with_the_trunk_cache(reference, tiny_llama, task, tmp_path, capsys):
    """A finished 6-step run, resumed with mezo.steps=12, ends where the 12-step run ends."""
    cfg = config(tmp_path, tiny_llama, task, steps=6)
    assert train(cfg) == 0
    assert train(cfg, "--resume", f"mezo.steps={STEPS}") == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert [r["step"] for r in rows(run)] == list(range(1, STEPS + 1))
    assert_bitwise(run, reference)


# -- the trunk's states of a row: a function of the row ---------------------------------
def random_model(device, dtype, seed):
    """A Llama of SmolLM2-135M's widths (576 hidden, 9 heads, 3 KV heads), 4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(device, dtype)


def trunk_of(model, layout):
    """A FrozenTrunk below the top layer (k0 = 3). ``layout``: None (the device's
    own), "slots" (fixed shape and hashed slot, CUDA's), "free" (the CPU's) or "alone"."""
    from mezo_backend_hf.trunk import FrozenTrunk, RadixCache
    trunk = FrozenTrunk(model, RadixCache(1 << 40, FIFO), list(model.model.layers[3].parameters()))  # FIFO: never evicts under this budget
    if layout is not None:
        trunk.layout = layout
    assert trunk.k0 == 3
    return trunk


def trunk_states_are_functions_of_the_row(device, dtype, layout, seed):
    from mezo_backend_hf.trunk import canonical_width
    model = random_model(device, dtype, seed)
    rng = random.Random(seed)
    rows = [tuple(rng.randrange(1000) for _ in range(rng.randint(1, 70))) for _ in range(24)]
    rows += [rows[0] + tuple(rng.randrange(1000) for _ in range(k)) for k in (1, 5, 40)]  # its extensions
    assert len({canonical_width(len(r)) for r in rows}) >= 4
    with torch.inference_mode():
        alone = [trunk_of(model, layout).states([r])[0].clone() for r in rows]
        # all in one call: rows of different lengths share passes
        batch = trunk_of(model, layout).states(rows)
        # prefix sharing: longer rows first, then their prefixes are looked up (and the other way round)
        trunk = trunk_of(model, layout)
        longer = [r + tuple(rng.randrange(1000) for _ in range(rng.randint(1, 12))) for r in rows]
        trunk.states(longer)
        prefixes = trunk.states(rows)
        extended = trunk_of(model, layout)
        extended.states(rows[:8])
        after = extended.states(longer)
        alone_longer = [trunk_of(model, layout).states([r])[0] for r in longer]
        # shuffled, in small groups
        order = list(range(len(rows)))
        rng.shuffle(order)
        trunk = trunk_of(model, layout)
        shuffled = {}
        for k in range(0, len(order), 5):
            for i, s in zip(order[k:k + 5], trunk.states([rows[i] for i in order[k:k + 5]])):
                shuffled[i] = s
    for i in range(len(rows)):
        assert alone[i].shape == (len(rows[i]), 576)
        assert torch.equal(alone[i], batch[i]), i
        assert torch.equal(alone[i], prefixes[i]), i
        assert torch.equal(alone[i], shuffled[i]), i
        assert torch.equal(alone_longer[i], after[i]), i
    return trunk


@pytest.fixture
def small_slots(monkeypatch):
    """CUDA's layout on the CPU, with passes of at most 256 tokens (fewer wasted rows)."""
    from mezo_backend_hf import trunk
    monkeypatch.setattr(trunk, "SLOT_TOKENS", 256)
    monkeypatch.setattr(trunk, "MAX_SLOTS", 8)


@pytest.mark.parametrize("layout", ["free", "alone", "slots"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trunk_states_are_a_function_of_the_row(layout, dtype, small_slots):
    trunk_states_are_functions_of_the_row(torch.device("cpu"), dtype, layout, seed_of(2600))


def test_the_cpu_layout_is_checked_once_on_synthetic_rows(monkeypatch):
    """Rows share CPU passes only where the check finds a row's bits alike alone and
    in a pass of several (here: MKL); where they differ, one row a pass."""
    model = random_model(torch.device("cpu"), torch.float32, seed_of(2603))
    trunk = trunk_of(model, None)
    assert trunk.layout == "free"            # this machine's kernels (measured: MKL, AVX-512)
    unlike = trunk_of(model, None)
    real = unlike.capture
    monkeypatch.setattr(unlike, "capture", lambda **inputs: real(**inputs) + inputs["input_ids"].shape[0])
    assert unlike.layout == "alone" and unlike.slots(16) == 1


def test_the_slots_layout_runs_passes_of_one_shape(small_slots):
    """Off the CPU every pass of a width has the same shape, each row in its own slot."""
    from mezo_backend_hf.trunk import MAX_SLOTS, SLOT_TOKENS
    model = random_model(torch.device("cpu"), torch.float32, seed_of(2601))
    trunk = trunk_of(model, "slots")
    shapes = []
    trunk.capture = (lambda real: lambda **inputs: shapes.append(tuple(inputs["input_ids"].shape)) or real(**inputs))(
        trunk.capture)
    rng = random.Random(2601)
    rows = [tuple(rng.randrange(1000) for _ in range(rng.randint(1, 300))) for _ in range(20)]
    with torch.inference_mode():
        trunk.states(rows)
    assert shapes and all(n == max(1, min(MAX_SLOTS, SLOT_TOKENS // w)) for n, w in shapes)
    assert trunk.cache.stats["hits"] == 0 and len(trunk.cache.roots) >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trunk_states_are_a_function_of_the_row_on_cuda(dtype):
    trunk = trunk_states_are_functions_of_the_row(torch.device("cuda"), dtype, None, seed_of(2602))
    assert trunk.layout == "slots"
