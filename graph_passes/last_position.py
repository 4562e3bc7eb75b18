"""The last-position pass: a graph whose logits are computed for the last position of each row only.

Generation reads one position's logits per call, yet an exported graph projects every position onto the
vocabulary: for a 256-token prompt, SmolLM2's 49k-token head is a fifth of the prefill's work and Gemma 3's
262k-token head most of it. The pass slices the lm_head's input to its last position (``[batch, 1,
hidden]``), so the logits output becomes ``[batch, 1, vocab]`` and everything before the head is untouched
(the KV cache's ``present`` outputs still cover every position). Rows must be right-aligned (left padding
or none), as a generation batch is.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import GraphIndex, find_lm_head
from graph_passes.layer_map import LayerMap
from graph_passes.passes import GraphPass
from graph_passes.rewrite import add_constant

SUFFIX = "/last_position"


class LastPosition(GraphPass):
    """Compute ``logits`` [batch, 1, vocab] for the last position only. The logits must be declared [batch, seq,
    vocab] and made by a weight matmul through per-token ops (``apply`` finds it or refuses)."""

    needs_layer_map = False

    def __init__(self, logits: str = "logits"):
        self.logits = logits

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap | None) -> None:
        output = next((value for value in model.graph.output if value.name == self.logits), None)
        if output is None or not output.type.tensor_type.HasField("shape") or len(output.type.tensor_type.shape.dim) != 3:
            raise GraphPassError(f"the graph has no output {self.logits!r} declared [batch, seq, vocab]; run it as it is")

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap | None) -> None:
        graph = model.graph
        index = GraphIndex(graph)
        head, data = find_lm_head(index, self.logits)
        if head is None:
            raise GraphPassError(f"no weight matmul makes {self.logits!r} through per-token ops; run the graph as it is")
        name = data + SUFFIX
        constants = [add_constant(graph, f"{name}/{what}", np.array([value], np.int64))
                     for what, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
        node = graph.node[head]
        node.input[0] = name
        graph.node.insert(head, helper.make_node("Slice", [data, *constants], [name], name=name))
        # Shapes recorded for the tensors after the slice (the lm_head's and the per-token ops' up to the logits)
        # still say every position: drop them, and say 1.
        everything = set(range(len(index.nodes)))
        downstream = {head}.union(*(index.descendants_within(out, everything) for out in index.nodes[head].output))
        after = {out for i in downstream for out in index.nodes[i].output}
        kept = [value for value in graph.value_info if value.name not in after]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        seq = next(value for value in graph.output if value.name == self.logits).type.tensor_type.shape.dim[1]
        seq.Clear()
        seq.dim_value = 1

    def layer_map_after(self, layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap:
        return layer_map  # the slice goes after the last layer


def last_position(model: onnx.ModelProto, logits: str = "logits") -> onnx.ModelProto | None:
    """A copy of ``model`` computing ``logits`` for the last position only (see ``LastPosition``); None when the graph
    does not qualify: the caller then runs the graph as it is."""
    try:
        return LastPosition(logits)(model)
    except GraphPassError:
        return None
