"""The forward passes over token rows: logits of the last ``keep`` positions
under the adapter in the model, or under one adapter per row (peft's
mixed-adapter batch). Every pass is a function of its arguments; what is kept
between calls are caches keyed by them (the trunk's states, the last batch's inputs).

Rows are left-padded so that every target ends at the last position: the model
is then asked for logits of the last K+1 positions only (``logits_to_keep``),
which skips the vocabulary projection for prompt tokens -- on a small model with
a large tied head that is a fifth of the work per token.
"""
from __future__ import annotations

import torch

from mezo_core import MezoError

from .inputs import GRAPH_WIDTH, LastInputs, batch_tensors, causal_mask, left_padded
from .prefix import shared_prefix_logits
from .trunk import LayerStack, NoKeysAndValues


class Forwards:
    """``model``'s passes with the options that change how (not what) they compute:
    ``trunk`` (a FrozenTrunk or None), ``trim_last_layer``, ``prefix_min_tokens``
    (None: no prefix sharing) and ``graphs`` (a GraphedForward over
    ``graph_forward``, set by the backend, or None)."""

    def __init__(self, model, device, pad_id, trunk=None, trim_last_layer=True, prefix_min_tokens=None):
        self.model, self.device, self.pad_id, self.trunk = model, device, pad_id, trunk
        self.trim_last_layer, self.prefix_min_tokens = trim_last_layer, prefix_min_tokens
        self.stack = LayerStack(model) if trim_last_layer and trunk is None else trunk
        self.graphs = None
        self.last_inputs = LastInputs()
        self.forward_tokens = self.prefix_tokens_saved = 0

    def tensors(self, rows, multiple=1):
        return batch_tensors(rows, self.pad_id, self.device, multiple)

    def padded(self, states, width=None):
        return left_padded(states, self.device, width)

    def last_logits(self, rows, keep: int, adapters=None):
        """(fp32 logits of the last ``keep`` positions, padded ids); ``adapters``:
        one peft adapter name per row (None: the model's active adapter)."""
        if self.prefix_min_tokens is not None and len(rows) > 1:
            return shared_prefix_logits(self, rows, keep, adapters, self.prefix_min_tokens)
        return self.plain_last_logits(rows, keep, adapters)

    def plain_last_logits(self, rows, keep, adapters=None, states=None):
        """``last_logits`` in one padded batch. ``states``: the rows' trunk states
        when the caller has them already. A batch under the active adapter keeps
        its inputs for the next call (the key holds the rows, the graph layout
        and the trunk cache's generation, which a change of a trunk weight bumps)."""
        graphed = self.graphs is not None and adapters is None
        self.forward_tokens += sum(map(len, rows))
        generation = self.fresh_generation() if states is None else None  # before any lookup
        key = (tuple(rows), keep, graphed, generation) if adapters is None and states is None else None
        inputs, reused = self.last_inputs.fetch(key, lambda: self.forward_inputs(rows, graphed, states))
        if reused and self.trunk is not None:
            self.trunk.cache.count_reuse(rows)
        if graphed:  # a reused batch is still in the graph's input buffers
            logits = self.graphs.replay_last() if reused else self.graphs(static=keep, **inputs)
            self.last_inputs.value = {"input_ids": inputs["input_ids"]}  # the graph keeps its own copy of the rest
            return logits.to(torch.float32, copy=True), inputs["input_ids"]
        extra = {} if adapters is None else {"adapter_names": adapters}
        plain = {k: v for k, v in inputs.items() if k != "hidden"}
        out = self.forward(inputs.get("hidden"), **plain, **extra, use_cache=False, logits_to_keep=keep)
        return out.logits.float(), inputs["input_ids"]

    def forward_inputs(self, rows, graphed, states=None):
        """The tensors a forward over ``rows`` takes: ids, mask (4-D for a graph),
        positions and, with the trunk cache, the states entering layer k0."""
        ids, mask, positions = self.tensors(rows, GRAPH_WIDTH if graphed else 1)
        if self.trunk is not None and states is None:
            states = self.trunk.states(rows)
        inputs = dict(input_ids=ids, attention_mask=causal_mask(self.model, mask, positions) if graphed else mask,
                      position_ids=positions)
        if states is not None:
            inputs["hidden"] = self.padded(states, ids.shape[1])
        return inputs

    def fresh_generation(self):
        """Checks the trunk's weights (a change empties its cache) and returns the
        cache's generation, which changes whenever it was emptied (None: no trunk)."""
        if self.trunk is None:
            return None
        self.trunk.check_fresh()
        return self.trunk.cache.generation

    def forward(self, hidden, **inputs):
        """The model's forward, from the trunk states (a padded batch) when there
        are any; with ``trim_last_layer`` the last layer runs in full only for
        the positions whose logits are kept. Not when the caller wants the KV
        cache, nor for rows with per-row adapters: peft removes its per-row hooks
        only when a forward returns, and trimming stops one early."""
        keep = inputs.get("logits_to_keep")
        if (self.trim_last_layer and inputs.get("use_cache") is False and "adapter_names" not in inputs
                and isinstance(keep, int) and 0 < keep < inputs["input_ids"].shape[1]
                and (hidden is not None or len(self.stack.layers) > 1)):  # a 1-layer model: nothing below
            try:
                return self.stack.last_positions(hidden, 0 if hidden is None else self.trunk.k0, **inputs)
            except NoKeysAndValues as exc:
                raise MezoError(f"hf.trim_last_layer: {exc}; set hf.trim_last_layer=false") from None
        if hidden is None:
            return self.model(**inputs)
        return self.trunk.forward_from_cache(hidden, **inputs)

    def graph_forward(self, keep, input_ids, attention_mask, position_ids, hidden=None):
        """The forward that ``hf.cuda_graphs`` captures: every input a tensor of
        fixed shape, the mask already 4-D."""
        out = self.forward(hidden, input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False, logits_to_keep=keep)
        return out.logits


def target_losses(logits, ids, batch):
    """Per example, the mean cross-entropy of its targets (float64) from the
    logits of the last K+1 positions of left-padded rows (position t predicts t+1)."""
    k = max(len(e.target_ids) for e in batch)
    logits, labels = logits[:, -(k + 1):-1], ids[:, -k:]
    target_len = torch.tensor([len(e.target_ids) for e in batch], device=ids.device)
    is_target = torch.arange(k, device=ids.device)[None, :] >= (k - target_len)[:, None]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return ((nll * is_target).sum(1) / target_len).double()
