"""Text generation on the SGLang engine for reward tasks and exact match."""
from __future__ import annotations

import warnings

from mezo_core.forwards import nothing_to_generate


def generate(backend, prompts, max_new_tokens, adapters=None, temperature=0.0, seeds=None):
    """Continuations of ``prompts`` (``Backend.generate``): at most ``max_new_tokens``
    new token ids each, cut before the first ``tokenizer.eos_token_id`` (not
    returned); greedy at temperature 0, else sampled at ``temperature`` with row i's
    request carrying ``sampling_seed=seeds[i]``. ``adapters``: a slot per row
    (``_names_of``), so both signs of a direction generate in one engine call.

    The hf backend's stopping rule exactly: the tokenizer's EOS is the request's stop
    token. SGLang also stops at the model's other EOS ids; a row that stopped on one
    of those is generated again with ``ignore_eos`` and cut at the tokenizer's EOS.
    Rows that are the same request (adapter, prompt and, when sampling, seed) are
    issued once. When several samples share a prompt, the distinct prompts are
    prefilled first (one token each): SGLang prefills the requests of one call
    together, so without that the samples would share no prompt KV; with it every
    sample reads its prompt from the radix cache (``stats().token_reuse``).

    SGLang seeds a request's sampling only with the engine option
    ``enable_deterministic_inference`` (``sglang.engine``); without it sampled
    completions are not reproducible, and a warning says so."""
    done = nothing_to_generate(prompts, max_new_tokens, temperature, seeds)
    if done is not None:
        return done
    sampling = temperature > 0
    if sampling and not backend.engine_kwargs.get("enable_deterministic_inference"):
        warnings.warn("sglang: sampled completions are not reproducible unless the engine runs with "
                      "sglang.engine.enable_deterministic_inference=true (SGLang ignores a request's "
                      "sampling_seed otherwise)", stacklevel=3)
    names = backend._names_of(adapters, len(prompts))
    rows = [(name, tuple(int(t) for t in p), int(seed) & 0x7FFF_FFFF_FFFF_FFFF if sampling else None)
            for name, p, seed in zip(names, prompts, seeds if sampling else [None] * len(prompts))]
    uniq = list(dict.fromkeys(rows))
    eos = backend.tokenizer.eos_token_id
    prompt_rows = list(dict.fromkeys((name, ids) for name, ids, _ in uniq))
    if len(prompt_rows) < len(uniq):   # several samples of a prompt: its KV first
        backend._engine_call([list(ids) for _, ids in prompt_rows], [name for name, _ in prompt_rows],
                             sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        backend._stats["primed_batches"] += 1

    def params(seed, ignore_eos=False):
        out = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature) if sampling else 0.0,
               "ignore_eos": ignore_eos, "skip_special_tokens": False}
        if eos is not None:
            out["stop_token_ids"] = [int(eos)]
        if seed is not None:
            out["sampling_seed"] = seed
        return out

    def call(requests, ignore_eos=False):
        return backend._engine_call([list(ids) for _, ids, _ in requests], [name for name, _, _ in requests],
                                    sampling_params=[params(seed, ignore_eos) for _, _, seed in requests])

    def stopped_elsewhere(out):
        """Finished on a stop token that is not the tokenizer's EOS (SGLang's finish_reason)."""
        ids, reason = out["output_ids"], out["meta_info"].get("finish_reason") or {}
        if isinstance(reason, dict) and reason.get("type") == "stop" and "matched" in reason:
            return reason["matched"] != eos
        return len(ids) < max_new_tokens and (eos is None or eos not in ids)

    outs = dict(zip(uniq, call(uniq)))
    again = [row for row, out in outs.items() if stopped_elsewhere(out)]
    if again:  # the hf backend would have gone on: generate those rows past every stop token
        outs.update(zip(again, call(again, ignore_eos=True)))
    done = {row: list(out["output_ids"]) for row, out in outs.items()}
    for row, ids in done.items():
        ids = ids[:max_new_tokens]
        done[row] = tuple(ids[:ids.index(eos)] if eos is not None and eos in ids else ids)
    return [done[row] for row in rows]
