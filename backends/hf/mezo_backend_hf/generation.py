"""Generation on the backend's own (peft) model: greedy continuations for the exact
match of completion tasks, and the completions of reward tasks (greedy, or sampled
with a seeded generator per row).

The adapter that the forwards read -- moved in place by every MeZO step -- is the
one that generates; with ``adapters`` each row generates under its own peft adapter
(peft's mixed-adapter batch: ``hf.pm_batch``'s side adapters, every perturbed state
of a step in one batch). One loop, batched: rows are left-padded (positions from
the attention mask, as in the backend's forwards), the prompt runs once into a KV
cache, then one token per row per forward; a row stops at EOS, the loop when every
row has or after ``max_new_tokens``.

Greedy decoding takes the argmax of the fp32 logits, as transformers' ``generate``
does (``tests/test_reward_generation.py`` checks the two agree token for token).
Sampling at temperature T draws from softmax(logits / T) by the Gumbel-max rule
with noise from a generator of the row's own seed, so a row's sample does not
depend on the other rows of its batch, nor on how the batch is ordered or split.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mezo_core.forwards import nothing_to_generate


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
             eos_id: int | None, device, adapters: Sequence[str] | None = None, temperature: float = 0.0,
             seeds: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The continuation of each prompt: at most ``max_new_tokens`` new token ids, cut
    before the first ``eos_id`` (which is not returned). ``adapters``: a peft adapter
    name per row (None: the model's active adapter). ``temperature`` 0: greedy; above
    0: sampled, row i with a generator seeded by ``seeds[i]``."""
    done = nothing_to_generate(prompts, max_new_tokens, temperature, seeds)
    if done is not None:
        return done
    sampling = temperature > 0
    from transformers import DynamicCache
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {} if adapters is None else {"adapter_names": list(adapters)}
    generators = None
    if sampling:
        generators = [torch.Generator(device=device).manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=1, **extra)
    tokens = []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].to(torch.float32)
        if sampling:
            noise = torch.stack([torch.rand(logits.shape[-1], generator=g, device=device) for g in generators])
            logits = logits / temperature - torch.log(-torch.log(noise))
        chosen = logits.argmax(-1)
        if eos_id is not None:
            chosen = chosen.masked_fill(done, eos_id)   # a finished row stays finished
            done = done | (chosen == eos_id)
        tokens.append(chosen)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, **extra)
    result = []
    for row in torch.stack(tokens, 1).tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        result.append(tuple(row))
    return result


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                    eos_id: int | None, device) -> list[tuple[int, ...]]:
    """The greedy continuation of each prompt under the model's active adapter."""
    return generate(model, prompts, max_new_tokens, pad_id=pad_id, eos_id=eos_id, device=device)
