"""CUDA graphs for the forward passes of a MeZO step.

A step's passes differ only in the adapter values, which the perturbation
engine changes in place (same addresses), and in the inputs. Once a forward of
a given input signature is captured, each later pass copies its inputs into
the graph's static buffers and replays it: one launch instead of hundreds,
which is what a step over the top layers of a small model is bound by.
"""
from __future__ import annotations

import gc
from collections import OrderedDict

import torch


class GraphedForward:
    """``fn(**tensors) -> tensor`` replayed as one CUDA graph per signature
    (names, shapes and dtypes of the inputs plus ``static``). At most
    ``max_graphs`` are kept (least recently used dropped); all share one memory
    pool. The returned tensor is the graph's output buffer: it is overwritten by
    the next replay, so consume it first."""

    def __init__(self, fn, max_graphs: int = 32, warmup: int = 2):
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self.graphs: OrderedDict = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()  # one side stream for every warm-up and capture: cuBLAS keeps a
        # workspace per stream it ran on, so a fresh stream per capture would add one each time
        self.captures = self.replays = 0
        self.last = None

    def __call__(self, static=(), **tensors) -> torch.Tensor:
        key = (static,) + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(static, tensors)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        inputs = entry[0]
        for name, value in tensors.items():
            inputs[name].copy_(value, non_blocking=True)
        self.last = entry
        return self.replay_last()

    def replay_last(self) -> torch.Tensor:
        """Replay the graph of the last call on the inputs it was given (its
        buffers still hold them): a second pass over the same batch copies nothing."""
        _, output, graph = self.last
        graph.replay()
        self.replays += 1
        return output

    def _capture(self, static, tensors):
        inputs = {k: v.clone() for k, v in tensors.items()}
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # lazy initialisation (cuBLAS handles, workspaces) outside the graph
            for _ in range(self.warmup):
                self.fn(static, **inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        gc.collect()  # torch.compile's first call leaves reference cycles holding real device tensors
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = self.fn(static, **inputs)
        self.captures += 1
        return inputs, output, graph


def compile_layers(layers):
    """``hf.compile``: torch.compile each decoder layer that a pass runs. Only
    ``forward`` is compiled, so the trunk's hooks stay outside; the layers share
    one compiled graph (same code, same shapes)."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
