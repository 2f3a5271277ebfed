"""model.quantization (issue #27): the frozen base weights in 8 bits through torchao,
the adapter and MeZO unchanged.

Oracles: a plain transformers model holding the weights the quantized backend
stores (each checked to lie within half an int8 step, absmax / 254 per output row,
of the original), and the unquantized model's losses."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchao")

from mezo_core import MezoError  # noqa: E402
from mezo_core.cli import main  # noqa: E402
from mezo_core.config import load_config  # noqa: E402
from mezo_backend_hf.backend import HFBackend  # noqa: E402
from test_hf_backend import load_base, nudge, random_examples, reference_losses  # noqa: E402

SEED = 2701
#: per-example loss tolerance against the full-precision model: int8 per-row absmax rounding
#: moves each weight by at most half a step (absmax / 254: 0.4 % of the row's largest weight,
#: about 0.1 % rms); through 4 layers this moves a loss of ~5.7 by ~1e-3 (measured 4e-4 at
#: init); 0.02 leaves room for the adapter's nudge and is still 15x below the spread of the
#: per-example losses, so a wrong (e.g. transposed or unscaled) weight cannot pass
TOL_VS_FULL = 0.02


def backend(model_dir, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", "lora.r=4", "lora.alpha=8", *overrides])
    return HFBackend(cfg)


def dequantized_copy(model_dir, quantized):
    """The oracle model: a plain transformers model whose decoder linears hold the weights the
    quantized backend stores (torchao's int8 values times their scales), after checking
    each against the original: per output row, at most half a step of absmax / 127 away."""
    base = load_base(model_dir)
    stored = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
              for n, m in quantized.model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lora_" not in n and type(m.weight).__name__ == "Int8Tensor"}
    with torch.no_grad():
        for name, module in base.named_modules():
            if name in stored:
                w, deq = module.weight, stored[name].dequantize().float().cpu()
                half_step = w.abs().amax(dim=1, keepdim=True) / 127 / 2
                assert ((deq - w).abs() <= half_step * 1.001 + 1e-8).all(), name
                w.copy_(deq)
    assert len(stored) == sum(1 for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    return base


def test_int8_losses_match_hand_rounded_weights_and_stay_close_to_full(tiny_llama):
    print("seed", SEED)
    batch = random_examples(300, n=8, seed=SEED)
    q = backend(tiny_llama, "model.quantization=int8")
    linears = [m for n, m in q.model.named_modules() if n.endswith("base_layer")]
    assert linears and all(type(m.weight).__name__.startswith("Int8") for m in linears)
    assert all(t.dtype == torch.float32 for t in q.trainable_tensors())   # the adapter is untouched
    got = q.losses(batch).double()
    oracle = reference_losses(dequantized_copy(tiny_llama, q), batch)
    full = reference_losses(load_base(tiny_llama), batch)
    assert torch.allclose(got, oracle, atol=2e-4), (got - oracle).abs().max()
    assert (got - full).abs().max() < TOL_VS_FULL
    assert full.std() > 15 * TOL_VS_FULL or (got - full).abs().max() < 1e-2
    # under a nudged adapter too: LoRA adds to the quantized base exactly as to the full one
    nudge(q)
    f = backend(tiny_llama)
    nudge(f)
    assert (q.losses(batch).double() - f.losses(batch).double()).abs().max() < TOL_VS_FULL


def test_a_quantized_run_trains_saves_a_plain_adapter_and_resumes_bitwise(tmp_path, tiny_llama, capsys):
    from safetensors.torch import load_file
    from tiny import InterruptAt, write_run_config
    from mezo_core.registry import get_registry
    runs = {}
    for name, quant in (("full", "null"), ("int8", "int8"), ("int8-resumed", "int8")):
        get_registry.cache_clear()
        cfg = write_run_config(tmp_path / name, tiny_llama, {"mezo.steps": 6, "checkpoint_every": 2,
                                                             "seed": SEED, "model.quantization": None})
        args = ["train", "-c", str(cfg), f"model.quantization={quant}", "mezo.lr=0.5"]
        if name == "int8-resumed":
            reg = get_registry()
            reg.pm.register(InterruptAt(3))
            assert main(args, reg) == 130
            get_registry.cache_clear()
            args.append("--resume")
        assert main(args) == 0
        runs[name] = tmp_path / name / "run"
    capsys.readouterr()
    a = {k: load_file(str(runs[k] / "adapter" / "adapter_model.safetensors")) for k in runs}
    assert a["full"].keys() == a["int8"].keys()
    assert all(a["int8"][k].dtype == torch.float32 and a["int8"][k].shape == a["full"][k].shape for k in a["full"])
    assert any(float(t.abs().sum()) > 0 for k, t in a["int8"].items() if ".lora_B." in k)        # it trained
    assert all(a["int8"][k].equal(a["int8-resumed"][k]) for k in a["int8"])                        # bitwise
    conf = json.loads((runs["int8"] / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and "quantization" not in json.dumps(conf)   # a plain adapter


def test_fp8_arithmetic_without_a_capable_gpu_is_one_line(tiny_llama, capsys):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU runs fp8")
    with pytest.raises(MezoError, match="compute capability >= 8.9"):
        backend(tiny_llama, "model.quantization=fp8")
    assert main(["config", "model.quantization=int4"]) == 2
    assert "model.quantization" in capsys.readouterr().err
