"""Prefix sharing (``hf.prefix_sharing``): rows of one adapter that share a
prefix of at least ``prefix_min_tokens`` run it once; its KV is repeated for
each row, which then runs only its suffix (``passes.ModelPasses.group_logits``).
Exact: within one pass the adapter does not change. With the trunk cache,
prefix and suffixes start at layer k0 from slices of the rows' states."""
from __future__ import annotations

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


def shared_prefixes(rows, adapters, min_tokens, keep):
    """(singles, groups): the indices of the rows that share no prefix (one
    padded pass runs them) and the [(prefix, member indices)] of those that do."""
    groups = prefix_groups(rows, adapters, min_tokens, keep)
    return [m[0] for _, m in groups if len(m) == 1], [(p, m) for p, m in groups if len(m) > 1]
