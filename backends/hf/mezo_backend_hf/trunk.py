"""Frozen-trunk cache: the hidden states entering the first adapted layer k0.

Layers below k0 carry no adapter, so they see the same input in the +eps and
-eps passes and in every step: their output is a pure function of the token
sequence. We keep it per token in a radix tree over token prefixes (as
RadixAttention does for KV), so sequences sharing a prefix share its entries
and any prefix of a cached sequence is a hit too (causal attention).

Never stale: entries are valid only for one fingerprint of the trunk (the
storage and in-place version counter of every weight below k0, and the model's
dtype); any change to those weights empties the cache.

Bit for bit a function of the row: a state's bits must not depend on which batch
computed it, or a run resumed with a cold cache drifts from the uninterrupted one.
Kernels are not batch-invariant: a row left-padded in a batch (its tokens
shifted, an explicit mask) differs in the last bits from the row alone, attention
kernels reduce in an order that depends on the sequence length, and cuBLAS picks
its GEMM kernel by shape. So the trunk runs every row in one canonical layout:
right-padded to its *canonical width* (its length rounded up to ``WIDTH_STEP``
tokens), positions from 0, no mask (causal: no real token sees the padding). On
the CPU rows of one width share a pass freely: MKL gives a row the same bits in
any matrix of >= 4 rows (a canonical width has >= 16), and the attention kernel
treats each row alone (measured, 1 and 2 threads, fp32 and bf16; checked once per
process on synthetic rows, else a CPU pass holds one row). Elsewhere (CUDA)
a pass of width w has a fixed shape, ``slots(w)`` rows, and each row a fixed slot
in it, a hash of its tokens (empty slots hold a copy of a real row): the kernels
and the place of the row in every matrix are then fixed. Entries live in a tree per
(width, slot), so a token's state is a function of the tokens up to it, whichever
rows shared its pass or inserted its prefix first.
"""
from __future__ import annotations

import itertools

import torch

from .passes import LayerStack


class _Node:
    __slots__ = ("key", "tokens", "hidden", "children", "parent")

    def __init__(self, key, tokens, hidden, parent):
        self.key, self.tokens, self.hidden, self.parent = key, tokens, hidden, parent
        self.children: dict[int, _Node] = {}


#: the trunk runs a row right-padded to its length rounded up to a multiple of this
WIDTH_STEP = 16
#: where rows need fixed slots (not the CPU): a pass of width w holds SLOT_TOKENS // w
#: rows, at most MAX_SLOTS, at least one
SLOT_TOKENS, MAX_SLOTS = 2048, 32


def canonical_width(length: int) -> int:
    """The width a row of ``length`` tokens is computed at in the trunk."""
    return -(-length // WIDTH_STEP) * WIDTH_STEP


class RadixCache:
    """Per-token tensors in a radix tree keyed by token ids, under a byte budget.
    ``space``: entries of different spaces (e.g. widths a row was computed at)
    never share a node, each space a tree of its own."""

    def __init__(self, budget_bytes: int, make_policy, device=None):
        """``make_policy()`` builds a fresh eviction policy (each ``clear`` starts one)."""
        self.budget, self.make_policy, self.device = int(budget_bytes), make_policy, device
        self._ids = itertools.count(1)
        self.clear()
        self.stats = dict(lookups=0, hits=0, tokens_looked_up=0, tokens_reused=0, evictions=0, invalidations=0)

    def clear(self):
        """Drop every entry; ``generation`` counts clears, so a caller holding
        states it looked up knows to look them up again."""
        self.generation = getattr(self, "generation", -1) + 1
        self.roots: dict = {}
        self.nodes: dict[int, _Node] = {}
        self.bytes = 0
        self.policy = self.make_policy()

    @property
    def root(self):
        """The tree of the default space (None)."""
        return self._root(None)

    def _root(self, space):
        root = self.roots.get(space)
        if root is None:
            root = self.roots[space] = _Node(0, (), None, None)
        return root

    def lookup(self, tokens, space=None) -> torch.Tensor | None:
        """The stacked per-token values of ``tokens`` if every token is cached (in ``space``)."""
        self.stats["lookups"] += 1
        self.stats["tokens_looked_up"] += len(tokens)
        node, i, parts, path = self.roots.get(space), 0, [], []
        if node is None:
            return None
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return None
            m = common_prefix(child.tokens, tokens, i)
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

    def insert(self, tokens, hidden: torch.Tensor, space=None) -> None:
        node, i = self._root(space), 0
        if self.device is not None and hidden.device != torch.device(self.device):
            hidden = hidden.to(self.device)  # spill: e.g. GPU states kept in pinned CPU memory
            if hidden.device.type == "cpu" and torch.cuda.is_available():
                hidden = hidden.pin_memory()
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                self._add(node, tuple(tokens[i:]), hidden[i:].clone())
                break
            m = common_prefix(child.tokens, tokens, i)
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


def common_prefix(edge, tokens, start=0) -> int:
    """How many leading items of ``edge`` equal ``tokens[start:]``."""
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tuple(tokens[start:start + n]):  # the usual case, compared in C
        return n
    for j in range(n):
        if edge[j] != tokens[start + j]:
            return j
    return n


class FrozenTrunk(LayerStack):
    """The hidden states entering layer k0, per row: cached, or captured in the
    canonical layout. A LayerStack, so the passes run layers k0.. on them."""

    def __init__(self, model, cache: RadixCache, trainable):
        """``trainable``: the tensors MeZO moves. k0 is the first layer holding one;
        k0 = 0 (nothing to cache) when one lives outside the decoder layers."""
        super().__init__(model)
        self.cache = cache
        trainable_ids = {id(t) for t in trainable}
        adapted = [i for i, layer in enumerate(self.layers)
                   if any(id(p) in trainable_ids for p in layer.parameters())]
        self.k0 = min(adapted) if adapted else len(self.layers)
        top_ids = {id(p) for layer in list(self.layers)[self.k0:] for p in layer.parameters()}
        if trainable_ids - top_ids:  # e.g. embeddings: no layer's input is frozen
            self.k0, top_ids = 0, {id(p) for p in model.parameters()}
        self.trunk_params = [p for p in model.parameters() if id(p) not in top_ids]
        self.top = list(self.layers)[self.k0:]
        self.device = next(model.parameters()).device
        self._layout = None  # found on first use (layout)
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
        return self.run(None, 0, self.k0, **inputs)

    def states(self, rows):
        """Per row, the hidden states entering layer k0: cached, or computed once in
        the canonical layout (module docstring). The caller has checked the trunk's
        weights (``check_fresh``)."""
        spaces = [self.space(r) for r in rows]
        states = [self.cache.lookup(r, space=sp) for r, sp in zip(rows, spaces)]
        by_width: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            if s is None:
                by_width.setdefault(spaces[i][0], []).append(i)
        for width, members in sorted(by_width.items()):
            for part in self._passes(width, members, spaces):
                hidden = self.capture(**self.canonical_inputs([rows[i] for i in part], width))
                for j, i in enumerate(part):
                    if spaces[i][1] == (j if self.slots(width) else 0):  # not a copy in an empty slot
                        states[i] = hidden[j, :len(rows[i])]
                        self.cache.insert(rows[i], states[i], space=spaces[i])
        return states

    @property
    def layout(self) -> str:
        """How the passes of one width hold their rows: "free" (any number, any order:
        the CPU, where its GEMMs give a row the same bits in a pass of one row as in
        passes of several -- module docstring -- checked once on fixed synthetic rows,
        a function of the machine, never of the data), "alone" (one row a pass: the
        CPU where that check fails) or "slots" (a fixed shape, each row in its slot:
        any other device)."""
        if self._layout is None:
            if self.device.type != "cpu":
                self._layout = "slots"
            else:
                self._layout = "free" if self._rows_batch_alike() else "alone"
        return self._layout

    @layout.setter
    def layout(self, value: str):
        if value not in ("free", "alone", "slots"):
            raise ValueError(f"trunk layout {value!r}")
        self._layout = value

    def _rows_batch_alike(self) -> bool:
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.get_input_embeddings().num_embeddings
        with torch.inference_mode():
            for width, n in ((WIDTH_STEP, 5),):
                rows = torch.randint(vocab, (n, width), generator=gen).tolist()
                together = self.capture(**self.canonical_inputs(rows, width))
                for j in (0, n - 1):
                    if not torch.equal(self.capture(**self.canonical_inputs([rows[j]], width))[0], together[j]):
                        return False
        return True

    def slots(self, width) -> int:
        """Rows in a pass of ``width`` (0: any number, in any order)."""
        layout = self.layout
        return 0 if layout == "free" else 1 if layout == "alone" else max(1, min(MAX_SLOTS, SLOT_TOKENS // width))

    def space(self, row):
        """(canonical width, slot) of a row: where its states are computed and kept."""
        width = canonical_width(len(row))
        n = self.slots(width)
        return width, (hash(tuple(row)) % n if n > 1 else 0)  # a tuple of ints hashes alike in every process

    def _passes(self, width, members, spaces):
        """The passes (row indices, in order) that compute the missing rows of one width."""
        n = self.slots(width)
        if not n:
            return [members]
        queues = [[] for _ in range(n)]
        for i in members:
            queues[spaces[i][1]].append(i)
        passes = []
        for k in range(max(map(len, queues))):
            part = [q[k] if k < len(q) else None for q in queues]
            filler = next(i for i in part if i is not None)
            passes.append([filler if i is None else i for i in part])
        return passes

    def canonical_inputs(self, rows, width):
        """Rows right-padded to ``width`` (with their own first token: any id does,
        no real token attends to a later one), positions from 0, no mask."""
        host = torch.tensor([list(r) + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        return dict(input_ids=host.to(self.device), position_ids=positions.to(self.device), use_cache=False)
