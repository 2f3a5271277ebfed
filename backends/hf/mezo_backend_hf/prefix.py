"""Prefix sharing (``hf.prefix_sharing``): rows of one adapter that share a
prefix of at least ``prefix_min_tokens`` run it once; its KV is repeated for
each row, which then runs only its suffix. Exact: within one pass the adapter
does not change. With the trunk cache, prefix and suffixes start at layer k0
from slices of the rows' states."""
from __future__ import annotations

import torch

from .trunk import common_prefix


def prefix_groups(rows, adapters, min_tokens, keep):
    """[(prefix, member indices)]: rows of one adapter sorted so that shared
    prefixes are adjacent, grouped greedily while their common prefix stays >=
    ``min_tokens`` and leaves every member at least ``keep`` tokens of suffix."""
    order = sorted(range(len(rows)), key=lambda i: (str(adapters[i]), rows[i]))
    groups = []
    for i in order:
        if groups:
            prefix, members = groups[-1]
            common = common_prefix(prefix, rows[i])
            limit = min(len(rows[m]) for m in members + [i]) - keep
            if adapters[members[0]] == adapters[i] and min(common, limit) >= min_tokens:
                groups[-1] = (tuple(prefix[:min(common, limit)]), members + [i])
                continue
        groups.append((tuple(rows[i]), [i]))
    return groups


def shared_prefix_logits(fwd, rows, keep, adapters, min_tokens):
    """``Forwards.last_logits`` with shared prefixes computed once per group."""
    names = adapters or [None] * len(rows)
    groups = prefix_groups(rows, names, min_tokens, keep)
    states = None
    if fwd.trunk is not None:
        fwd.fresh_generation()
        states = fwd.trunk.states(rows)  # one capture per width for all misses

    def pick(members):
        return None if states is None else [states[i] for i in members]

    logits = [None] * len(rows)
    singles = [g[1][0] for g in groups if len(g[1]) == 1]
    if singles:
        out, _ = fwd.plain_last_logits([rows[i] for i in singles], keep,
                                       None if adapters is None else [names[i] for i in singles], pick(singles))
        for j, i in enumerate(singles):
            logits[i] = out[j]
    for prefix, members in groups:
        if len(members) == 1:
            continue
        logits_g = group_logits(fwd, prefix, [rows[i][len(prefix):] for i in members], keep,
                                names[members[0]], pick(members))
        for j, i in enumerate(members):
            logits[i] = logits_g[j]
    ids, _, _ = fwd.tensors(rows)
    return torch.stack(logits), ids


def group_logits(fwd, prefix, suffixes, keep, adapter, states=None):
    """The prefix once, then the suffixes on its repeated KV. ``states``: the
    members' trunk states over prefix + suffix."""
    n, p = len(suffixes), len(prefix)
    extra = {} if adapter is None else {"adapter_names": [adapter]}
    ids_p = torch.tensor([prefix], device=fwd.device)
    past = fwd.forward(None if states is None else fwd.padded([states[0][:p]]), input_ids=ids_p,
                       position_ids=torch.arange(p, device=fwd.device)[None],
                       use_cache=True, logits_to_keep=1, **extra).past_key_values
    past.batch_repeat_interleave(n)
    ids, mask, positions = fwd.tensors(suffixes)
    fwd.forward_tokens += p + sum(map(len, suffixes))
    fwd.prefix_tokens_saved += (n - 1) * p
    full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=mask.device), mask], dim=1)
    if adapter is not None:
        extra = {"adapter_names": [adapter] * n}
    out = fwd.forward(None if states is None else fwd.padded([s[p:] for s in states]),
                      input_ids=ids, attention_mask=full_mask, position_ids=positions + p,
                      past_key_values=past, use_cache=True, logits_to_keep=keep, **extra)
    return out.logits.float()
