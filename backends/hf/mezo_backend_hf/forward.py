"""A batch of token rows through the model: logits of the last ``keep``
positions under the adapter in the model, or under one adapter per row (peft's
mixed-adapter batch). Every pass is a function of its arguments; what is kept
between calls are caches keyed by them (the trunk's states, the last batch's inputs).

Rows are left-padded so that every target ends at the last position: the model
is then asked for logits of the last K+1 positions only (``logits_to_keep``),
which skips the vocabulary projection for prompt tokens -- on a small model with
a large tied head that is a fifth of the work per token.

A batch goes one way through the package, each stage handing its result on: the
rows that share a prefix (``prefix``), their trunk states (``trunk``), their
tensors (``inputs``), the model's passes (``passes``).
"""
from __future__ import annotations

import torch

from .inputs import batch_tensors, group_inputs, pass_inputs
from .passes import ModelPasses
from .prefix import shared_prefixes


class LastInputs:
    """The forward inputs of the last batch, for the next call with the same key:
    the -eps pass of a step asks for the same rows, and then skips the trunk
    lookups, the padding and (with CUDA graphs) the copies into the graph. The
    key holds everything the inputs depend on; None never matches."""

    def __init__(self):
        self.key, self.value = None, None

    def clear(self):
        self.key = self.value = None


class Forwards:
    """``model``'s passes over token rows, with the options that change how (not
    what) they compute: ``trunk`` (a FrozenTrunk or None), ``trim_last_layer``,
    ``prefix_min_tokens`` (None: no prefix sharing) and ``passes.graphs`` (a
    GraphedForward over ``passes.graph_forward``, set by the backend, or None).
    Counts the tokens its passes run and those a shared prefix saved."""

    def __init__(self, model, device, pad_id, trunk=None, trim_last_layer=True, prefix_min_tokens=None):
        self.model, self.device, self.pad_id, self.trunk = model, device, pad_id, trunk
        self.prefix_min_tokens = prefix_min_tokens
        self.passes = ModelPasses(model, trunk, trim_last_layer)
        self.last_inputs = LastInputs()
        self.forward_tokens = self.prefix_tokens_saved = 0

    def last_logits(self, rows, keep: int, adapters=None):
        """(fp32 logits of the last ``keep`` positions, padded ids); ``adapters``:
        one peft adapter name per row (None: the model's active adapter). Rows
        that share no prefix run in one padded pass; without prefix sharing, a
        batch under the active adapter keeps its inputs for the next call (the key
        holds the rows, the graph layout and the trunk cache's generation, which a
        change of a trunk weight bumps)."""
        names = adapters or [None] * len(rows)
        shared = self.prefix_min_tokens is not None and len(rows) > 1
        graphed = self.passes.graphs is not None and adapters is None
        generation = self.fresh_generation()  # before any lookup
        key = None if shared or adapters is not None else (tuple(rows), keep, graphed, generation)
        reused = key is not None and key == self.last_inputs.key
        if not reused:
            self.last_inputs.clear()  # freed before the new inputs exist: no two batches held
        # which rows share a prefix
        singles, groups = range(len(rows)), []
        if shared:
            singles, groups = shared_prefixes(rows, names, self.prefix_min_tokens, keep)
        # their trunk states
        states = None
        if self.trunk is not None and reused:
            self.trunk.cache.count_reuse(rows)  # the kept inputs hold their states
        elif self.trunk is not None:
            states = self.trunk.states(rows)
        # their tensors
        inputs = self.last_inputs.value if reused else None
        if singles and not reused:
            inputs = pass_inputs([rows[i] for i in singles], None if states is None else [states[i] for i in singles],
                                 self.pad_id, self.device, self.model if graphed else None)
        grouped = [group_inputs(prefix, [rows[i][len(prefix):] for i in members],
                                None if states is None else [states[i] for i in members], self.pad_id, self.device)
                   for prefix, members in groups]
        ids = batch_tensors(rows, self.pad_id, self.device)[0] if shared else inputs["input_ids"]
        # the passes
        logits = [None] * len(rows)
        if singles:
            out = self.passes.logits(inputs, keep, None if adapters is None else [names[i] for i in singles],
                                     graphed, reused)
            self.forward_tokens += sum(len(rows[i]) for i in singles)
            if key is not None:  # kept for the next call; a graph keeps its own copy of all but the ids
                self.last_inputs.key, self.last_inputs.value = key, {"input_ids": ids} if graphed else inputs
            if not shared:
                return out, ids
            for j, i in enumerate(singles):
                logits[i] = out[j]
        for (prefix, members), (head, tail) in zip(groups, grouped):
            out = self.passes.group_logits(head, tail, keep, names[members[0]])
            self.forward_tokens += len(prefix) + sum(len(rows[i]) - len(prefix) for i in members)
            self.prefix_tokens_saved += (len(members) - 1) * len(prefix)
            for j, i in enumerate(members):
                logits[i] = out[j]
        return torch.stack(logits), ids

    def fresh_generation(self):
        """Checks the trunk's weights (a change empties its cache) and returns the
        cache's generation, which changes whenever it was emptied (None: no trunk)."""
        if self.trunk is None:
            return None
        self.trunk.check_fresh()
        return self.trunk.cache.generation
