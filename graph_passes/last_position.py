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

from graph_passes.graph_utils import GraphIndex, find_lm_head
from graph_passes.rewrite import add_constant, copy_model

SUFFIX = "/last_position"


def last_position(model: onnx.ModelProto, logits: str = "logits") -> onnx.ModelProto | None:
    """A copy of ``model`` computing ``logits`` [batch, 1, vocab] for the last position only; None when the graph
    does not qualify (no weight matmul reached from the logits through per-token ops, or logits not declared
    [batch, seq, vocab]): the caller then runs the graph as it is."""
    output = next((value for value in model.graph.output if value.name == logits), None)
    dims = output.type.tensor_type.shape.dim if output is not None and output.type.tensor_type.HasField("shape") else None
    if dims is None or len(dims) != 3:
        return None
    index = GraphIndex(model.graph)
    head, data = find_lm_head(index, logits)
    if head is None:
        return None
    sliced = copy_model(model)
    graph = sliced.graph
    name = data + SUFFIX
    constants = [add_constant(graph, f"{name}/{what}", np.array([value], np.int64))
                 for what, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
    node = graph.node[head]
    node.input[0] = name
    graph.node.insert(head, helper.make_node("Slice", [data, *constants], [name], name=name))
    # Shapes recorded for the tensors after the slice still say every position: drop them, and say 1.
    after = {out for i in _downstream(index, head) for out in index.nodes[i].output}
    kept = [value for value in graph.value_info if value.name not in after]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    seq = next(value for value in graph.output if value.name == logits).type.tensor_type.shape.dim[1]
    seq.Clear()
    seq.dim_value = 1
    return sliced


def _downstream(index: GraphIndex, head: int) -> set[int]:
    """The lm_head and the per-token nodes between it and the logits."""
    found, todo = {head}, list(index.nodes[head].output)
    while todo:
        for j in index.consumers.get(todo.pop(), ()):
            if j not in found:
                found.add(j)
                todo.extend(index.nodes[j].output)
    return found
