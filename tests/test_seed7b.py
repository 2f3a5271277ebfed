"""benchmarks/seed7b.py (issue 27) on the CPU: the tiny shape end to end (the
reference row, hf default, a row that fails, a row killed by its timeout), the
workload it builds, the reference step's arithmetic and the JSON's bookkeeping.

Tolerance of the loss agreement: 1e-4. On the CPU every row runs in fp32 on the
same weights (the three prepared adapters); the reference scores full logits,
hf the last K+1 positions with its last layer trimmed, so the two differ only in
summation order (observed: 0 to 2e-6); a wrong adapter, a missed perturbation
or a prompt token scored as a target moves a loss by >= 1e-4 here (the +/- eps z
states alone move them by ~3e-4), which the test also checks.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import seed7b  # noqa: E402

TOL = 1e-4
SEQ = 96


# -- bookkeeping, no model ---------------------------------------------------------------------
def test_flops_and_peak_match_the_issue():
    flops = seed7b.step_flops("7b", 4, 512)
    assert 5.4e13 < flops < 5.7e13                      # the issue's 5.5e13 a step
    assert seed7b.linear_params("7b") == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert 6.7e9 < seed7b.total_params("7b") < 6.8e9 and 1.29e10 < seed7b.total_params("13b") < 1.31e10
    assert seed7b.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert seed7b.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert seed7b.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert seed7b.peak_bf16_tflops("cpu") is None
    assert seed7b.device_tag("NVIDIA H100 80GB HBM3") == "h100" and seed7b.device_tag(None) == "cpu"


def _row(row, step_ms, weights="bf16", shape="7b", mem=None, losses=None, **extra):
    return {"row": row, "shape": shape, "batch": 4, "seq": 512, "dtype": "bfloat16", "weights": weights,
            "step_ms": step_ms, "peak_memory_gib": mem, "agreement_losses": losses, **extra}


def test_summary_speedups_memory_and_loss_differences():
    ref_losses = {"theta0": [1.0, 2.0], "plus": [1.1, 2.1], "minus": [0.9, 1.9]}
    shifted = {k: [x + d for x, d in zip(v, (0.01, -0.03))] for k, v in ref_losses.items()}
    rows = [_row("ref", 200.0, mem=14.0, losses=ref_losses),
            _row("hf", 150.0, mem=12.0, losses=ref_losses),
            _row("hf-fast", 100.0, mem=14.0, losses=shifted, mfu=0.5),
            _row("sglang", None, error="RuntimeError: boom"),
            _row("hf-fp8", 80.0, weights="fp8", mem=7.0, losses=shifted),
            _row("hf-int8", 120.0, weights="int8", mem=7.5),
            _row("hf", 300.0, shape="13b", mem=26.0)]
    rec = seed7b.summarize({"rows": rows, "shape": "7b", "device": "NVIDIA H100 80GB HBM3", "batch": 4, "seq": 512})
    assert rec["reference_step_ms"] == 200.0
    assert rec["best_row"] == "hf-fast" and rec["best_speedup_vs_reference"] == pytest.approx(2.0)
    assert rec["best_mfu"] == 0.5
    assert rec["best_row_8bit"] == "hf-fp8" and rec["best_speedup_vs_reference_8bit"] == pytest.approx(2.5)
    assert rec["lowest_memory_row"] == "hf-fp8"
    by = {(r["row"], r["shape"]): r for r in rec["rows"]}
    assert by[("hf", "7b")]["loss_max_abs_diff_vs_reference"] == 0.0
    assert by[("hf-fast", "7b")]["loss_max_abs_diff_vs_reference"] == pytest.approx(0.03)
    assert by[("hf-fp8", "7b")]["loss_max_abs_diff_vs_hf_bf16"] == pytest.approx(0.03)
    assert by[("hf-int8", "7b")]["loss_max_abs_diff_vs_reference"] is None      # no losses recorded
    assert by[("hf", "7b")]["memory_vs_reference"] == pytest.approx(12 / 14)
    assert "speedup_vs_reference" not in by[("sglang", "7b")]
    assert "speedup_vs_reference" not in by[("hf", "13b")]          # no reference at 13b in this record
    assert rec["by_shape"]["13b"]["reference_step_ms"] is None
    table = rec["markdown"]
    assert table.count("\n| 7b |") == 6 and "| 13b | hf |" in table and "RuntimeError: boom" in table
    assert "2.00x" in table and "2.4 s/step" in table


def test_merge_keeps_earlier_rows_and_takes_the_latest_of_a_key():
    old = [_row("ref", 200.0), _row("hf", 150.0)]
    new = [_row("hf", 140.0), _row("hf-fast", 100.0)]
    merged = seed7b.merge_rows(old, new)
    assert [(r["row"], r["step_ms"]) for r in merged] == [("ref", 200.0), ("hf", 140.0), ("hf-fast", 100.0)]
    assert len(seed7b.merge_rows(merged, [_row("hf", 1.0, shape="13b")])) == 4


def test_engine_options_size_the_pool_for_one_call_and_take_overrides():
    info = {"batch": 4, "seq": 512, "dtype": "bfloat16", "linear_params": seed7b.linear_params("7b"),
            **seed7b.SHAPES["7b"]}
    args = seed7b.parse_args(["--device", "cpu", "--sglang-opt", "attention_backend=flashinfer",
                              "--vllm-opt", "enforce_eager=false"])
    gib80 = 80 * 2**30
    sg = seed7b.engine_options(seed7b.ROWS["sglang"], info, args, gib80)
    assert sg["max_total_tokens"] >= 2 * 4 * 513 and sg["max_total_tokens"] <= 1.3 * 2 * 4 * 513
    assert 0.2 < sg["mem_fraction_static"] < 0.35 and sg["attention_backend"] == "flashinfer"
    assert "quantization" not in sg
    fp8 = seed7b.engine_options(seed7b.ROWS["sglang-fp8"], info, args, gib80)
    assert fp8["quantization"] == "fp8" and fp8["mem_fraction_static"] < sg["mem_fraction_static"]
    vl = seed7b.engine_options(seed7b.ROWS["vllm"], info, args, gib80)
    assert vl["enforce_eager"] is False and vl["max_model_len"] >= 513
    assert vl["kv_cache_memory_bytes"] >= 2 * 4 * 513 * 2 * 32 * 4096 * 2
    assert vl["max_num_batched_tokens"] >= 2 * 4 * 513


def test_rows_and_arguments():
    assert seed7b.parse_args(["--device", "cpu", "--rows", "hf,ref"]).row_keys == ["ref", "hf"]  # reference first
    assert seed7b.parse_args(["--device", "cpu", "--shape", "13b"]).row_keys == ["hf", "hf-int8", "hf-fp8"]
    with pytest.raises(SystemExit):
        seed7b.parse_args(["--device", "cpu", "--rows", "nope"])
    assert seed7b.ROWS["hf-int8"].weights("bfloat16") == "int8" and seed7b.ROWS["hf"].weights("float32") == "fp32"
    assert seed7b.ROWS["hf-fast"].options == {"pm_batch": True, "lora_dtype": "model", "cuda_graphs": True,
                                              "compile": True}
    from benchmarks.suites import SUITES
    assert SUITES["seed-7b"].steps[0].out_dir and "benchmarks.seed7b" in SUITES["seed-7b"].steps[0].argv


# -- end to end on the CPU ---------------------------------------------------------------------
def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks.seed7b", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """ref, hf and hf-fast (CUDA graphs: refused on the CPU) on the tiny shape."""
    tmp = tmp_path_factory.mktemp("seed7b")
    common = ["--device", "cpu", "--shape", "tiny", "--seq", str(SEQ), "--model-root", str(tmp / "model")]
    proc = _run([*common, "--rows", "hf,ref,hf-fast", "--steps", "2", "--warmup", "1", "--fresh",
                 "--out", str(tmp / "first.json")])
    assert (tmp / "first.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, common, proc, json.loads((tmp / "first.json").read_text())


@pytest.mark.slow
def test_rows_run_and_agree_with_the_reference(tiny_run):
    tmp, _, proc, rec = tiny_run
    assert proc.returncode == 1, proc.stderr[-3000:]           # one row failed: the run says so
    rows = {r["row"]: r for r in rec["rows"]}
    assert [r["row"] for r in rec["rows"]] == ["ref", "hf", "hf-fast"]
    for key in ("ref", "hf"):
        r = rows[key]
        assert not r.get("error"), r.get("traceback")
        assert r["step_ms"] > 0 and r["steps_timed"] == 2 and len(r["step_times_ms"]) == 2
        assert r["shape"] == "tiny" and r["weights"] == "fp32" and r["backend"] == key
        assert r["token_reuse"] is None and r["mfu"] is None and r["peak_memory_gib"] is None
        assert sorted(r["agreement_losses"]) == ["minus", "plus", "theta0"]
        assert all(len(v) == 4 for v in r["agreement_losses"].values())
    ref = rows["ref"]["agreement_losses"]
    assert rows["ref"]["agreement_state_check"] == 0.0          # the prepared states are the reference's own
    moved = max(abs(a - b) for a, b in zip(ref["plus"], ref["minus"]))
    assert moved > 2 * TOL                                      # +/- eps z moves the losses: the check can fail
    assert rows["hf"]["loss_max_abs_diff_vs_reference"] < TOL
    assert rows["ref"]["loss_max_abs_diff_vs_reference"] == 0.0
    err = rows["hf-fast"]
    assert "CUDA graphs need model.device: cuda" in err["error"] and err.get("step_ms") is None
    assert "Traceback" in err["log_tail"]
    for key in ("reference_step_ms", "best_speedup_vs_reference", "best_speedup_vs_reference_8bit",
                "gpu_peak_bf16_tflops", "device", "versions", "command", "rows", "workloads", "markdown"):
        assert key in rec, key
    assert rec["reference_step_ms"] == rows["ref"]["step_ms"]
    assert rec["best_row"] == "hf"
    assert rec["best_speedup_vs_reference"] == pytest.approx(rows["ref"]["step_ms"] / rows["hf"]["step_ms"])
    assert rec["device"] == "cpu" and "--rows hf,ref,hf-fast" in rec["command"]
    assert "| tiny | hf-fast |" in proc.stdout                   # the table is printed


@pytest.mark.slow
def test_the_workload_is_alpaca_rows_of_exactly_t_tokens(tiny_run):
    from transformers import AutoTokenizer
    tmp, _, _, rec = tiny_run
    info = rec["workloads"]["tiny"]
    wl = json.loads(Path(info["workload"]).read_text())
    tok = AutoTokenizer.from_pretrained(info["model_dir"])
    assert len(tok) <= seed7b.VOCAB_MAX and info["tokenizer_vocab"] == len(tok)
    n = wl["preamble_tokens"]
    rows = [r for b in wl["batches"] for r in b]
    assert len(wl["batches"]) == 4 and all(len(b) == 4 for b in wl["batches"])
    assert all(len(r["prompt"]) + len(r["target"]) == SEQ for r in rows)
    assert len({tuple(r["prompt"][:n]) for r in rows}) == 1     # the preamble: identical ids in every row
    text = tok.decode(rows[0]["prompt"])
    assert text.startswith("<s>" + seed7b.PREAMBLE) and text.endswith("### Response:\n")
    assert all(len(r["target"]) >= 1 for r in rows) and len({tuple(r["target"]) for r in rows}) == len(rows)
    assert max(t for r in rows for t in r["prompt"] + r["target"]) < seed7b.SHAPES["tiny"]["vocab_size"]
    assert info["preamble_share"] == pytest.approx(n / SEQ)


@pytest.mark.slow
def test_a_row_past_its_timeout_is_killed_and_earlier_rows_are_kept(tiny_run):
    tmp, common, _, first = tiny_run
    proc = _run([*common, "--rows", "hf", "--row-timeout", "1", "--merge-from", str(tmp / "first.json"),
                 "--out", str(tmp / "second.json")])
    assert proc.returncode == 1
    rec = json.loads((tmp / "second.json").read_text())
    rows = {r["row"]: r for r in rec["rows"]}
    assert rows["hf"]["error"].startswith("timeout after 1 s")
    assert rows["ref"]["step_ms"] == {r["row"]: r for r in first["rows"]}["ref"]["step_ms"]   # merged, unchanged
    assert rec["reference_step_ms"] == rows["ref"]["step_ms"] and rec["best_row"] is None


@pytest.mark.slow
def test_the_reference_step_is_mezos(tiny_run):
    """+eps z, -2 eps z, +eps z, then -lr g z with z drawn again from the reset
    generator: the adapter moves by exactly -lr g z; with lr = 0 it comes back."""
    tmp, _, _, rec = tiny_run
    info = rec["workloads"]["tiny"]
    wl = json.loads(Path(info["workload"]).read_text())
    ref = seed7b.Reference(info["model_dir"], "cpu", "float32", lr=1e-2)
    ref.load(Path(info["agreement_dir"]) / "theta0")
    before = [p.detach().clone() for p in ref.params]
    inputs = ref.inputs(seed7b.examples(wl, 0))
    loss1, loss2, grad = ref.step(inputs, 7)
    assert loss1 != loss2 and grad == pytest.approx((loss1 - loss2) / (2 * seed7b.EPS), rel=1e-3)
    torch.manual_seed(7)
    for p, b in zip(ref.params, before):
        z = torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype)
        torch.testing.assert_close(p.detach(), b - 1e-2 * grad * z, rtol=0, atol=1e-6)
    ref.lr = 0.0
    again = [p.detach().clone() for p in ref.params]
    ref.step(inputs, 8)
    for p, b in zip(ref.params, again):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
    # the loss of the reference's own forward is the token mean over the response
    per_example = ref.losses(seed7b.examples(wl, 0))
    targets = torch.tensor([len(r["target"]) for r in wl["batches"][0]], dtype=torch.float64)
    ref.lr = 0.0
    with torch.inference_mode():
        loss = float(ref.forward(inputs))
    assert loss == pytest.approx(float((per_example * targets).sum() / targets.sum()), abs=1e-5)


def test_each_engine_row_sees_only_its_own_bundle(tmp_path, monkeypatch):
    """The two bundles pin different transformers, flashinfer, ...: an engine row gets
    its own site first, an hf row neither, an 8-bit hf row a folder with torchao alone."""
    base, sg, vl, ao = (tmp_path / n for n in ("site", "site-sglang", "site-vllm", "ao"))
    for d in (base / "mezo_core", sg / "sglang", sg / "torchao", vl / "vllm", ao / "torchao"):
        d.mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", ":".join(map(str, (base, sg, vl))))
    args = seed7b.parse_args(["--device", "cpu", "--torchao-site", str(ao)])
    sites = seed7b.site_dirs(args, need_torchao=True)
    assert sites["base"] == [str(base)] and sites["sglang"] == str(sg) and sites["vllm"] == str(vl)
    path = {k: seed7b.row_env(seed7b.ROWS[k], sites)["PYTHONPATH"].split(":") for k in ("hf", "hf-int8", "sglang",
                                                                                          "vllm")}
    assert path["hf"] == [str(base)] and path["hf-int8"] == [str(base), str(ao)]
    assert path["sglang"] == [str(sg), str(base)] and path["vllm"] == [str(vl), str(base)]
