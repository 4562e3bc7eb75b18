"""Residual-stream activations of an exported model, batch by batch, under their canonical names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

import graph_passes
from cp_onnx.models.model import ModelFolder
from cp_onnx.models.runner import Runner, open_graph
from graph_passes.layer_map import LayerMap, block_name


@dataclass
class Batch:
    """One padded batch: what entered and left every layer, attention patterns if the graph has them."""

    resid_in: list[np.ndarray]  # per layer, [batch, seq, hidden]
    resid_out: list[np.ndarray]
    patterns: list[np.ndarray] | None  # per layer, [batch, heads, seq, seq]
    attention_mask: np.ndarray  # [batch, seq]
    logits: np.ndarray | None = None


class ActivationReader:
    """Exposes the residual stream (and attention patterns) of a model once, then runs batches."""

    def __init__(self, model: ModelFolder, *, threads: int | None = None, patterns: bool = True, logits: bool = False):
        # Discovery and expose work on the graph alone (a few MB); the weights stay mapped, shared with other sessions.
        proto, weights = open_graph(model.onnx_path)
        self.layer_map: LayerMap = graph_passes.discover(proto)
        n = self.layer_map.num_layers
        self.with_patterns = patterns and self.layer_map.available("attn.pattern")
        # resid_in of layer l is resid_out of layer l-1, so only embed + resid_out are exposed.
        names = ["embed"] + [block_name(l, "resid_out") for l in range(n)]
        if self.with_patterns:
            names += [block_name(l, "attn.pattern") for l in range(n)]
        self.outputs = names + (["logits"] if logits else [])
        self.runner = Runner(graph_passes.expose(proto, self.layer_map, self.outputs, only=True), threads=threads, weights=weights)
        self.layer_tokens = 0  # tokens (padding included) times layers run so far: the work, for benchmarks

    @property
    def num_layers(self) -> int:
        return self.layer_map.num_layers

    def batches(self, token_lists: Sequence[Sequence[int]], *, batch_size: int = 8, side: str = "right", progress: Callable[[int, int], None] | None = None) -> Iterator[Batch]:
        """Run the texts in order and yield one Batch per ``batch_size`` texts (padded on ``side``)."""
        n = self.num_layers
        done = 0
        for out, mask in self.runner.run_texts(token_lists, batch_size=batch_size, outputs=self.outputs, side=side):
            resid = [out["embed"]] + [out[block_name(l, "resid_out")] for l in range(n)]
            patterns = [out[block_name(l, "attn.pattern")] for l in range(n)] if self.with_patterns else None
            done += len(mask)
            self.layer_tokens += mask.size * n
            if progress:
                progress(done, len(token_lists))
            yield Batch(resid[:-1], resid[1:], patterns, mask, out.get("logits"))
