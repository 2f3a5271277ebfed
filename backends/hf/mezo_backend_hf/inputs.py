"""Token rows as model inputs: left padding (every row ends at the last
position, so the last K positions hold every row's targets), trunk states
padded the same way, transformers' 4-D mask for a CUDA graph, and the inputs
of rows sharing a prefix (the prefix alone, then the suffixes after it)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: a CUDA graph's widths are padded to a multiple of this many tokens, so that few shapes occur
GRAPH_WIDTH = 16


def batch_tensors(rows: Sequence[Sequence[int]], pad_id: int, device, multiple: int = 1):
    """Left-padded ids, mask and position ids (positions count real tokens only),
    ``multiple`` dividing the width; built on the host in one array, moved in one copy."""
    lengths = [len(r) for r in rows]
    width = -(-max(lengths) // multiple) * multiple
    host = np.full((3, len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        host[0, i, width - len(r):] = r
    host = torch.from_numpy(host)
    start = width - torch.tensor(lengths)[:, None]
    column = torch.arange(width)
    host[1] = column >= start
    host[2] = (column - start).clamp(min=0)
    if device.type == "cuda":
        host = host.pin_memory()
    ids, mask, positions = host.to(device, non_blocking=True)
    return ids, mask, positions


def left_padded(states, device, width=None):
    """States of rows of different lengths as one batch, left-padded like the ids."""
    if len(states) == 1 and (width is None or width == len(states[0])):
        return states[0].to(device, non_blocking=True)[None]
    width = width or max(len(s) for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]), device=device)
    for i, s in enumerate(states):
        out[i, width - len(s):] = s
    return out


def causal_mask(model, mask, positions):
    """transformers' own 4-D mask for these left-padded rows, as its attention
    implementation wants it (a CUDA graph cannot build it: that reads values on the host)."""
    from transformers.masking_utils import create_causal_mask
    dtype = model.get_input_embeddings().weight.dtype
    shape_only = torch.empty((*mask.shape, 0), dtype=dtype, device=mask.device)  # shape, dtype, device are read
    return create_causal_mask(config=model.config, inputs_embeds=shape_only, attention_mask=mask,
                              past_key_values=None, position_ids=positions, allow_is_causal_skip=False)


def pass_inputs(rows, states, pad_id, device, graph_model=None):
    """The tensors of one padded pass over ``rows``: ids, mask, positions and,
    with the trunk cache, ``hidden``: the ``states`` entering layer k0. With
    ``graph_model`` (a CUDA graph's pass) the width is a multiple of
    ``GRAPH_WIDTH`` and the mask is that model's 4-D one."""
    ids, mask, positions = batch_tensors(rows, pad_id, device, GRAPH_WIDTH if graph_model is not None else 1)
    if graph_model is not None:
        mask = causal_mask(graph_model, mask, positions)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    if states is not None:
        inputs["hidden"] = left_padded(states, device, ids.shape[1])
    return inputs


def group_inputs(prefix, suffixes, states, pad_id, device):
    """(prefix, suffixes): the inputs of rows that share ``prefix`` -- the prefix
    as one row from position 0, the suffixes left-padded after it, their mask
    covering the prefix. ``states``: the rows' trunk states over prefix + suffix
    (None: no trunk cache)."""
    n, p = len(suffixes), len(prefix)
    head = dict(input_ids=torch.tensor([prefix], device=device), position_ids=torch.arange(p, device=device)[None],
                hidden=None if states is None else left_padded([states[0][:p]], device))
    ids, mask, positions = batch_tensors(suffixes, pad_id, device)
    full_mask = torch.cat([torch.ones((n, p), dtype=mask.dtype, device=mask.device), mask], dim=1)
    tail = dict(input_ids=ids, attention_mask=full_mask, position_ids=positions + p,
                hidden=None if states is None else left_padded([s[p:] for s in states], device))
    return head, tail
