"""Frozen-trunk cache: the hidden states entering the first adapted layer k0.

Layers below k0 carry no adapter, so they see the same input in the +eps and
-eps passes and in every step: their output is a pure function of the token
sequence. We keep it per token in a radix tree over token prefixes (as
RadixAttention does for KV), so sequences sharing a prefix share its entries
and any prefix of a cached sequence is a hit too (causal attention).

Never stale: entries are valid only for one fingerprint of the trunk (the
storage and in-place version counter of every weight below k0, and the model's
dtype); any change to those weights empties the cache.
"""
from __future__ import annotations

import itertools

import torch


class _Node:
    __slots__ = ("key", "tokens", "hidden", "children", "parent")

    def __init__(self, key, tokens, hidden, parent):
        self.key, self.tokens, self.hidden, self.parent = key, tokens, hidden, parent
        self.children: dict[int, _Node] = {}


class RadixCache:
    """Per-token tensors in a radix tree keyed by token ids, under a byte budget."""

    def __init__(self, budget_bytes: int, policy, device=None):
        self.budget, self.policy, self.device = int(budget_bytes), policy, device
        self._ids = itertools.count(1)
        self.clear()
        self.stats = dict(lookups=0, hits=0, tokens_looked_up=0, tokens_reused=0, evictions=0, invalidations=0)

    def clear(self):
        """Drop every entry; ``generation`` counts clears, so a caller holding
        states it looked up knows to look them up again."""
        self.generation = getattr(self, "generation", -1) + 1
        self.root = _Node(0, (), None, None)
        self.nodes: dict[int, _Node] = {}
        self.bytes = 0
        policy_cls = type(self.policy)
        self.policy = policy_cls()

    def lookup(self, tokens) -> torch.Tensor | None:
        """The stacked per-token values of ``tokens`` if every token is cached."""
        self.stats["lookups"] += 1
        self.stats["tokens_looked_up"] += len(tokens)
        node, i, parts, path = self.root, 0, [], []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return None
            m = _common(child.tokens, tokens, i)
            if m == 0:
                return None
            if m < len(child.tokens) and i + m < len(tokens):
                return None  # diverges inside the edge
            parts.append(child.hidden[:m])
            path.append(child)
            node, i = child, i + m
        for n in path:
            self.policy.touch(n.key)
        self.stats["hits"] += 1
        self.stats["tokens_reused"] += len(tokens)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def count_reuse(self, rows) -> None:
        """Count hits for rows whose looked-up states a caller reuses (one step's
        second pass over the same batch): their trunk work is skipped again."""
        tokens = sum(map(len, rows))
        self.stats["lookups"] += len(rows)
        self.stats["hits"] += len(rows)
        self.stats["tokens_looked_up"] += tokens
        self.stats["tokens_reused"] += tokens

    def insert(self, tokens, hidden: torch.Tensor) -> None:
        node, i = self.root, 0
        if self.device is not None and hidden.device != torch.device(self.device):
            hidden = hidden.to(self.device)  # spill: e.g. GPU states kept in pinned CPU memory
            if hidden.device.type == "cpu" and torch.cuda.is_available():
                hidden = hidden.pin_memory()
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                self._add(node, tuple(tokens[i:]), hidden[i:].clone())
                break
            m = _common(child.tokens, tokens, i)
            if m < len(child.tokens):
                child = self._split(child, m)
            node, i = child, i + m
        self._evict()

    def _add(self, parent, tokens, hidden):
        node = _Node(next(self._ids), tokens, hidden, parent)
        parent.children[tokens[0]] = node
        self.nodes[node.key] = node
        nbytes = hidden.numel() * hidden.element_size()
        self.bytes += nbytes
        self.policy.insert(node.key, nbytes)
        return node

    def _split(self, child, m):
        """child covers tokens[:m] afterwards; a new grandchild keeps the rest."""
        rest = _Node(next(self._ids), child.tokens[m:], child.hidden[m:], child)
        rest.children, child.children = child.children, {rest.tokens[0]: rest}
        for grandchild in rest.children.values():
            grandchild.parent = rest
        child.tokens, child.hidden = child.tokens[:m], child.hidden[:m]
        self.nodes[rest.key] = rest
        self.policy.insert(rest.key, rest.hidden.numel() * rest.hidden.element_size())
        return child

    def _evict(self):
        while self.bytes > self.budget and self.nodes:
            self._remove(self.nodes[self.policy.victim()])
            self.stats["evictions"] += 1

    def _remove(self, node):
        """Drop a node and everything below it (an extension needs its prefix)."""
        for child in list(node.children.values()):
            self._remove(child)
        del node.parent.children[node.tokens[0]]
        del self.nodes[node.key]
        self.policy.remove(node.key)
        self.bytes -= node.hidden.numel() * node.hidden.element_size()

    def invalidate(self):
        self.clear()
        self.stats["invalidations"] += 1


def _common(edge, tokens, start) -> int:
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tuple(tokens[start:start + n]):  # the usual case, compared in C
        return n
    for j in range(n):
        if edge[j] != tokens[start + j]:
            return j
    return n


def decoder_layers(model):
    """(parent module, attribute name, ModuleList) of the decoder's layer stack."""
    n = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError("cannot find the decoder layer list")


class _Captured(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


class FrozenTrunk:
    """Runs a causal LM with layers below k0 replaced by cached hidden states."""

    def __init__(self, model, cache: RadixCache, trainable):
        """``trainable``: the tensors MeZO moves. k0 is the first layer holding one;
        k0 = 0 (nothing to cache) when one lives outside the decoder layers."""
        self.model, self.cache = model, cache
        self.parent, self.attr, self.layers = decoder_layers(model)
        trainable_ids = {id(t) for t in trainable}
        adapted = [i for i, layer in enumerate(self.layers)
                   if any(id(p) in trainable_ids for p in layer.parameters())]
        self.k0 = min(adapted) if adapted else len(self.layers)
        top_ids = {id(p) for layer in list(self.layers)[self.k0:] for p in layer.parameters()}
        if trainable_ids - top_ids:  # e.g. embeddings: no layer's input is frozen
            self.k0, top_ids = 0, {id(p) for p in model.parameters()}
        self.trunk_params = [p for p in model.parameters() if id(p) not in top_ids]
        self.top = torch.nn.ModuleList(list(self.layers)[self.k0:])
        self.fingerprint = self._fingerprint()

    def _fingerprint(self):
        # every weight outside layers k0.. (embeddings, trunk layers): storage + in-place version
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self.trunk_params)

    def check_fresh(self):
        fp = self._fingerprint()
        if fp != self.fingerprint:
            self.cache.invalidate()
            self.fingerprint = fp

    def capture(self, **inputs) -> torch.Tensor:
        """Hidden states entering layer k0 (the rest of the forward is skipped)."""
        def hook(module, args, kwargs):
            raise _Captured(args[0] if args else kwargs["hidden_states"])
        handle = self.layers[self.k0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs)
        except _Captured as captured:
            return captured.hidden
        finally:
            handle.remove()
        raise RuntimeError("layer k0 was never reached")

    def forward_from_cache(self, hidden: torch.Tensor, **inputs):
        """The model's forward with layers below k0 skipped and ``hidden`` fed to layer k0.
        ``past_key_values`` may come from an earlier call with ``use_cache=True``."""
        if inputs.get("past_key_values") is not None:
            self._stand_in_below_k0(inputs["past_key_values"])
        ids = inputs.pop("input_ids")  # no embedding lookup: a stand-in of the right shape, no memory
        inputs["inputs_embeds"] = hidden.new_zeros(()).expand(*ids.shape, hidden.shape[-1])

        def hook(module, args, kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        handle = self.layers[self.k0].register_forward_pre_hook(hook, with_kwargs=True)
        setattr(self.parent, self.attr, self.top)
        try:
            return self.model(**inputs)
        finally:
            setattr(self.parent, self.attr, self.layers)
            handle.remove()

    def _stand_in_below_k0(self, past):
        """A KV cache filled by forward_from_cache holds nothing for the skipped
        layers, yet transformers sizes the attention mask by the cache length of
        layer 0 (``create_causal_mask`` -> ``get_mask_sizes(q, 0)``) and would
        drop the cached prefix from it. Those layers never run, so each gets a
        zero stand-in of the right batch and length (one head of width one:
        batch x length values), added through the layer's own ``update`` so
        that every layer type keeps its length bookkeeping."""
        length = past.get_seq_length(self.k0)
        if length == 0:
            return
        keys = past.layers[self.k0].keys
        stand_in = keys.new_zeros(()).expand(keys.shape[0], 1, length, 1)
        for layer in past.layers[:self.k0]:
            if layer.get_seq_length() == 0:
                layer.update(stand_in, stand_in)
