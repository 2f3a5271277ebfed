"""Adapters that travel (#15 item 4): the saved adapter names the model the user
gave, plain peft loads it, and ``mezo-run export --merge`` writes a model folder
that plain transformers loads. The oracle is a forward of those plain models,
one unpadded prompt at a time, scored by hand -- never the backend's own code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mezo_core.cli import main
from mezo_core.config import load_config
from mezo_core.data import Task
from mezo_core.registry import get_registry
from tiny import write_run_config

SEED = 7  # the adapter's nudge direction


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A run config on the tiny Llama and a saved, clearly non-zero adapter."""
    from mezo_backend_hf.backend import HFBackend
    tmp = tmp_path_factory.mktemp("export")
    cfg_file = write_run_config(tmp, tiny_llama)
    cfg = load_config(cfg_file, [])
    backend = HFBackend(cfg)
    print(f"adapter nudged along z(seed={SEED})")
    backend.perturb([(SEED, 0.5)])   # LoRA B = 0 at init: move it so that the adapter matters
    backend.save_adapter(tmp / "adapter")
    expected = choice_scores(backend, cfg)
    backend.close()
    return tmp, cfg_file, cfg, tmp / "adapter", expected


def choice_scores(backend, cfg):
    """mezo-run eval's path: the backend's choice losses on the dev prompts."""
    task = Task(cfg.task, backend.tokenizer)
    with torch.no_grad():
        return backend.choice_losses([task.prompt(r) for r in task.dev], task.choices)


def plain_scores(model, tokenizer, cfg):
    """Mean NLL of each choice's tokens after each prompt: one forward per
    (prompt, choice), no padding, straight from the model's logits."""
    task = Task(cfg.task, tokenizer)
    out = torch.zeros(len(task.dev), len(task.choices), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i, record in enumerate(task.dev):
            prompt = list(task.prompt(record))
            for j, choice in enumerate(task.choices):
                ids = torch.tensor([prompt + list(choice)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                nll = [-logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(choice)]
                out[i, j] = sum(nll) / len(nll)
    return out


def test_the_adapter_names_the_model_the_user_gave(trained, tiny_llama):
    _, _, cfg, adapter, _ = trained
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(cfg.model.path) == str(tiny_llama)


def test_plain_peft_scores_like_the_backend(trained, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, _, cfg, adapter, expected = trained
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    without = plain_scores(base, tokenizer, cfg)
    model = PeftModel.from_pretrained(base, str(adapter))
    got = plain_scores(model, tokenizer, cfg)
    assert (got - without).abs().max() > 1e-3           # the adapter changes the scores ...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)   # ... as the backend says


def test_mezo_run_eval_reports_the_plain_peft_scores(trained, tiny_llama, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, cfg_file, cfg, adapter, _ = trained
    assert main(["eval", "-c", str(cfg_file), "--adapter", str(adapter)]) == 0
    result = json.loads(capsys.readouterr().out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    scores = plain_scores(model, AutoTokenizer.from_pretrained(tiny_llama), cfg)
    task = Task(cfg.task, AutoTokenizer.from_pretrained(tiny_llama))
    gold = torch.tensor([r.label for r in task.dev])
    assert result["dev_loss"] == pytest.approx(float(scores[torch.arange(len(gold)), gold].mean()), abs=1e-5)
    assert result["dev_accuracy"] == pytest.approx(float((scores.argmin(1) == gold).double().mean()))


def test_export_merge_writes_a_model_plain_transformers_loads(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, cfg_file, cfg, adapter, expected = trained
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(out), "-c", str(cfg_file), "--adapter", str(adapter)]) == 0
    assert "wrote" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "adapter_config.json" not in names   # standalone: no peft
    assert not any(p.name.endswith((".tmp", ".old")) or ".tmp" in p.name for p in tmp_path.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in model.named_parameters())
    got = plain_scores(model, AutoTokenizer.from_pretrained(out), cfg)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_export_defaults_to_the_runs_adapter(trained, tmp_path, capsys):
    """Without --adapter: out_dir/adapter of the config (where train leaves it)."""
    tmp, cfg_file, cfg, adapter, _ = trained
    out = tmp_path / "merged"
    run_adapter = f"out_dir={tmp_path / 'run'}"
    import shutil
    shutil.copytree(adapter, tmp_path / "run" / "adapter")
    assert main(["export", "--merge", str(out), "-c", str(cfg_file), run_adapter]) == 0
    assert (out / "config.json").exists()


@pytest.mark.parametrize("case", ["not empty", "no adapter", "other model"])
def test_export_refuses_bad_input_in_one_line(case, trained, tmp_path, capsys, tiny_gpt2):
    _, cfg_file, _, adapter, _ = trained
    out, args = tmp_path / "merged", []
    if case == "not empty":
        out.mkdir()
        (out / "x").write_text("keep me")
        needle = "is not an empty folder"
    elif case == "no adapter":
        adapter = tmp_path / "missing"
        adapter.mkdir()
        needle = "not a PEFT adapter folder"
    else:  # a Llama adapter on GPT-2
        args = [f"model.path={tiny_gpt2}"]
        needle = "export: cannot apply"
    get_registry.cache_clear()
    assert main(["export", "--merge", str(out), "-c", str(cfg_file), "--adapter", str(adapter), *args]) == 2
    err = capsys.readouterr().err   # (transformers' loading bar may come first)
    assert "Traceback" not in err and err.count("mezo-run: error: ") == 1, err
    line = err[err.index("mezo-run: error: "):]
    assert needle in line and len(line.strip().splitlines()) == 1, err
    if case == "not empty":
        assert (out / "x").read_text() == "keep me"
    else:
        assert not out.exists()


def test_export_merge_of_full_parameter_weights(tmp_path, tiny_llama, capsys):
    """hf.full_params runs save trained base weights by name: export writes them into the model."""
    from mezo_backend_hf.backend import HFBackend
    from transformers import AutoModelForCausalLM, AutoTokenizer
    overrides = {"hf": {"full_params": [r"model\.layers\.3\.mlp\.down_proj\.weight"]}}
    cfg_file = write_run_config(tmp_path, tiny_llama, overrides)
    cfg = load_config(cfg_file, [])
    backend = HFBackend(cfg)
    backend.perturb([(SEED, 0.5)])
    backend.save_adapter(tmp_path / "weights")
    expected = choice_scores(backend, cfg)
    backend.close()
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(out), "-c", str(cfg_file), "--adapter", str(tmp_path / "weights")]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    got = plain_scores(model, tokenizer, cfg)
    assert (got - plain_scores(base, tokenizer, cfg)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


GGUF = (Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "smollm2-135m-instruct"
        / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.skipif(not GGUF.exists(), reason=f"needs the shared assets ({GGUF})")
def test_an_adapter_of_a_gguf_model_names_the_gguf_not_the_cache(tmp_path):
    from mezo_backend_hf.backend import HFBackend
    from mezo_core.models import cache_root
    cfg = load_config(None, [f"model.path={GGUF}", "lora.r=2", "lora.layers=[29]", "hf.trunk_cache=false"])
    backend = HFBackend(cfg)
    backend.save_adapter(tmp_path / "adapter")
    backend.close()
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(GGUF) and str(cache_root()) not in named
