"""The model's passes over prepared tensors (``inputs``): the logits of a row's
last positions and the losses of its targets.

``LayerStack`` runs a slice of the decoder layers through the model's own
forward; ``ModelPasses`` chooses how a pass runs -- from the frozen trunk's
states at layer k0, with the last layer trimmed to the kept positions, replayed
as a CUDA graph, or a shared prefix once with its KV repeated for the suffixes
-- none of which changes what it computes.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from mezo_core import MezoError


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


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


class LayerStack:
    """Runs a causal LM over a slice of its decoder layers, through the model's
    own forward (masks, rotary embeddings, norm and head as transformers does
    them): the other layers are swapped out, hidden states are fed to the first
    layer of the slice by a pre-hook, and a forward hook can stop after the last."""

    def __init__(self, model):
        self.model = model
        self.parent, self.attr, self.layers = decoder_layers(model)
        self._slices: dict = {}

    def run(self, hidden, start: int, stop: int | None = None, **inputs):
        """Layers [start, stop) with ``hidden`` entering layer ``start`` (None: the
        embeddings, start 0). ``stop=None`` runs on through the head and returns the
        model's output; otherwise the hidden states leaving layer stop-1. A
        ``past_key_values`` may hold only layers >= start (see _stand_in_below)."""
        stop_ = len(self.layers) if stop is None else stop
        handles = []

        def inject(module, args, kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        def finish(module, args, output):
            raise _Captured(_hidden_of(output))

        if hidden is not None:
            if inputs.get("past_key_values") is not None:
                self._stand_in_below(inputs["past_key_values"], start)
            ids = inputs.pop("input_ids")  # no embedding lookup: a stand-in of the right shape, no memory
            inputs["inputs_embeds"] = hidden.new_zeros(()).expand(*ids.shape, hidden.shape[-1])
            handles.append(self.layers[start].register_forward_pre_hook(inject, with_kwargs=True))
        if stop is not None:
            handles.append(self.layers[stop - 1].register_forward_hook(finish))
        part = self._slices.get((start, stop_))
        if part is None:
            part = self._slices[(start, stop_)] = torch.nn.ModuleList(list(self.layers)[start:stop_])
        setattr(self.parent, self.attr, part)
        try:
            return self.model(**inputs)
        except _Captured as captured:
            return captured.hidden
        finally:
            setattr(self.parent, self.attr, self.layers)
            for handle in handles:
                handle.remove()

    def _stand_in_below(self, past, start):
        """A KV cache filled from layer ``start`` up holds nothing for the layers
        below, yet transformers sizes the attention mask by the cache length of
        layer 0 (``create_causal_mask`` -> ``get_mask_sizes(q, 0)``) and would
        drop the cached prefix from it. Those layers never run, so each gets a
        zero stand-in of the right batch and length (one head of width one:
        batch x length values), added through the layer's own ``update`` so
        that every layer type keeps its length bookkeeping."""
        length = past.get_seq_length(start)
        if length == 0:
            return
        keys = past.layers[start].keys
        stand_in = keys.new_zeros(()).expand(keys.shape[0], 1, length, 1)
        for layer in past.layers[:start]:
            if layer.get_seq_length() == 0:
                layer.update(stand_in, stand_in)

    def last_positions(self, hidden, start: int, **inputs):
        """The model's output for the last ``keep`` positions only, exactly: the
        last layer computes keys and values for every position (later positions
        attend to them) but queries, attention, output projection and MLP only
        for the kept ones -- the other positions' outputs reach no logit.
        ``hidden`` enters layer ``start`` (None: the embeddings, start 0); keep is
        ``logits_to_keep``; ``attention_mask`` is 2-D or transformers' 4-D mask."""
        last, keep = len(self.layers) - 1, inputs["logits_to_keep"]
        if start < last:
            hidden = self.run(hidden, start, last, **inputs)
        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        cut = ids.shape[1] - keep
        rest = {k: v for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")}
        cache = _KeysAndValuesOf(last, config=self.model.config)
        head_mask = mask[:, :cut] if mask.dim() == 2 else mask[:, :, :cut, :cut]
        if self.run(hidden[:, :cut], last, None, input_ids=ids[:, :cut], attention_mask=head_mask,
                    position_ids=positions[:, :cut], past_key_values=cache, use_cache=True, **rest) is not None:
            raise NoKeysAndValues("the last layer did not store its keys and values through the KV cache")
        cache.stop_layer = None
        tail_mask = mask if mask.dim() == 2 else mask[:, :, cut:, :]
        return self.run(hidden[:, cut:], last, None, input_ids=ids[:, cut:], attention_mask=tail_mask,
                        position_ids=positions[:, cut:], past_key_values=cache, use_cache=True,
                        logits_to_keep=keep, **rest)


class NoKeysAndValues(Exception):
    """The model's last layer keeps its keys and values in some other way."""


class _KeysAndValuesOf(DynamicCache):
    """A KV cache that stops the forward once layer ``stop_layer`` has stored its
    keys and values (None: never)."""

    def __init__(self, stop_layer, **kwargs):
        super().__init__(**kwargs)
        self.stop_layer = stop_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.stop_layer:
            raise _Captured(None)
        return out


class ModelPasses:
    """``model``'s forwards over the tensors ``inputs`` builds: ``trunk`` (a
    FrozenTrunk, whose states enter layer k0, or None), ``trim_last_layer``, and
    ``graphs`` (a GraphedForward over ``graph_forward``, set by the backend, or None)."""

    def __init__(self, model, trunk=None, trim_last_layer=True):
        self.model, self.trim_last_layer, self.graphs = model, trim_last_layer, None
        self.stack = LayerStack(model) if trim_last_layer and trunk is None else trunk
        self.k0 = 0 if trunk is None else trunk.k0

    def logits(self, inputs, keep, adapters=None, graphed=False, reused=False):
        """fp32 logits of the last ``keep`` positions of one padded batch;
        ``adapters``: a peft adapter name per row (None: the active one);
        ``graphed``: replay a CUDA graph (``reused``: its input buffers hold these inputs already)."""
        if graphed:
            logits = self.graphs.replay_last() if reused else self.graphs(static=keep, **inputs)
            return logits.to(torch.float32, copy=True)
        extra = {} if adapters is None else {"adapter_names": adapters}
        plain = {k: v for k, v in inputs.items() if k != "hidden"}
        out = self.forward(inputs.get("hidden"), **plain, **extra, use_cache=False, logits_to_keep=keep)
        return out.logits.float()

    def group_logits(self, prefix, suffixes, keep, adapter=None):
        """Logits of rows sharing a prefix (``inputs.group_inputs``): the prefix
        once, its KV repeated for each row, then the suffixes on it. Exact: within
        one pass the adapter does not change."""
        n = suffixes["input_ids"].shape[0]
        extra = {} if adapter is None else {"adapter_names": [adapter]}
        past = self.forward(prefix["hidden"], input_ids=prefix["input_ids"], position_ids=prefix["position_ids"],
                            use_cache=True, logits_to_keep=1, **extra).past_key_values
        past.batch_repeat_interleave(n)
        if adapter is not None:
            extra = {"adapter_names": [adapter] * n}
        out = self.forward(suffixes["hidden"], input_ids=suffixes["input_ids"],
                           attention_mask=suffixes["attention_mask"], position_ids=suffixes["position_ids"],
                           past_key_values=past, use_cache=True, logits_to_keep=keep, **extra)
        return out.logits.float()

    def forward(self, hidden, **inputs):
        """The model's forward, from the trunk states (a padded batch entering layer
        k0) when there are any; with ``trim_last_layer`` the last layer runs in full
        only for the positions whose logits are kept. Not when the caller wants the
        KV cache, nor for rows with per-row adapters: peft removes its per-row hooks
        only when a forward returns, and trimming stops one early."""
        keep = inputs.get("logits_to_keep")
        if (self.trim_last_layer and inputs.get("use_cache") is False and "adapter_names" not in inputs
                and isinstance(keep, int) and 0 < keep < inputs["input_ids"].shape[1]
                and (hidden is not None or len(self.stack.layers) > 1)):  # a 1-layer model: nothing below
            try:
                return self.stack.last_positions(hidden, 0 if hidden is None else self.k0, **inputs)
            except NoKeysAndValues as exc:
                raise MezoError(f"hf.trim_last_layer: {exc}; set hf.trim_last_layer=false") from None
        if hidden is None:
            return self.model(**inputs)
        return self.stack.run(hidden, self.k0, None, **inputs)

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
