"""Greedy generation for the exact-match metric of completion tasks.

transformers' ``generate`` on the backend's own (peft) model, so the adapter
that the forwards read -- moved in place by every MeZO step -- is the one that
generates. Rows are left-padded (positions from the attention mask, as in the
backend's forwards) and run as one batch; a row stops at EOS.
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                    eos_id: int | None, device) -> list[tuple[int, ...]]:
    """The greedy continuation of each prompt: at most ``max_new_tokens`` new
    token ids, cut before the first ``eos_id`` (which is not returned)."""
    if not prompts:
        return []
    if max_new_tokens < 1:
        return [() for _ in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None,
                         pad_token_id=pad_id, eos_token_id=eos_id)
    result = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        result.append(tuple(row))
    return result
