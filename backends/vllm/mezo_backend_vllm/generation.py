"""Text generation on the vLLM engine for reward tasks and exact match."""
from __future__ import annotations

from mezo_core import MezoError
from mezo_core.forwards import nothing_to_generate


def generate(backend, prompts, max_new_tokens, adapters=None, temperature=0.0, seeds=None):
    """Continuations of ``prompts`` (``Backend.generate``): at most ``max_new_tokens``
    new token ids each, cut before the first ``tokenizer.eos_token_id`` (not
    returned); greedy at temperature 0, else sampled at ``temperature`` with row
    i's request seeded by ``seeds[i]`` (vLLM's per-request generator: a row's
    sample does not depend on the other rows of the call; vLLM raises a temperature
    below 1e-2 to 1e-2). ``adapters``: a slot per row (``_slots``), so both signs
    of a direction generate in one engine call.

    The hf backend's stopping rule exactly: ``ignore_eos`` with the tokenizer's
    EOS as the only stop token, so that vLLM neither adds the generation config's
    other EOS ids nor stops anywhere else. Rows that are the same request (slot,
    prompt and, when sampling, seed) are issued once. Each request reads the
    prefix cache under its adapter's salt (``_request``); ``stats()`` counts the
    requests, their cached prompt tokens and the tokens computed (prompt tokens
    not served from the cache, and every generated token but the last)."""
    from vllm import SamplingParams
    done = nothing_to_generate(prompts, max_new_tokens, temperature, seeds)
    if done is not None:
        return done
    sampling = temperature > 0
    slots = backend._slots(adapters, len(prompts))
    # vLLM would cut a completion short at max_model_len without a word: refuse instead
    limit, longest = int(backend.llm.llm_engine.model_config.max_model_len), max(map(len, prompts))
    if longest + max_new_tokens > limit:
        raise MezoError(f"vllm: a prompt of {longest} tokens plus {max_new_tokens} new tokens is longer than "
                        f"the engine's max_model_len {limit} (set vllm.engine.max_model_len)")
    rows = [(slot, tuple(int(t) for t in p), int(seed) & 0x7FFF_FFFF_FFFF_FFFF if sampling else None)
            for slot, p, seed in zip(slots, prompts, seeds if sampling else [None] * len(prompts))]
    uniq = list(dict.fromkeys(rows))
    eos = backend.tokenizer.eos_token_id
    stop = {} if eos is None else {"stop_token_ids": [int(eos)]}
    params = [SamplingParams(max_tokens=int(max_new_tokens), temperature=float(temperature) if sampling else 0.0,
                             seed=seed, ignore_eos=True, detokenize=False, **stop)
              for _, _, seed in uniq]
    done = {}
    for row, out in zip(uniq, backend._generate([(slot, ids) for slot, ids, _ in uniq], params)):
        ids = list(out.outputs[0].token_ids)
        done[row] = tuple(ids[:ids.index(eos)] if eos is not None and eos in ids else ids)
    return [done[row] for row in rows]
