"""Token rows as model inputs: left padding (every row ends at the last
position, so the last K positions hold every row's targets), trunk states
padded the same way, transformers' 4-D mask for a CUDA graph, and the last
batch's inputs kept for the next pass over the same rows."""
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


class LastInputs:
    """The forward inputs of the last batch, for the next call with the same key:
    the -eps pass of a step asks for the same rows, and then skips the trunk
    lookups, the padding and (with CUDA graphs) the copies into the graph. The
    key holds everything the inputs depend on; None never matches."""

    def __init__(self):
        self.key, self.value = None, None

    def clear(self):
        self.key = self.value = None

    def fetch(self, key, build):
        """(inputs, reused): the kept inputs if ``key`` matches, else ``build()``'s."""
        if key is not None and key == self.key:
            return self.value, True
        self.clear()  # freed before the new inputs exist: no two batches held
        self.value, self.key = build(), key
        return self.value, False
