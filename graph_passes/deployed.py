"""Deployed graphs (onnxruntime-genai builds, onnxruntime-optimizer fused graphs) made readable and cuttable, in place.

Their residual stream is an optional output of fused skip norms (``fused_ops.SKIP_NORMS``), often not
declared, and one such node computes both the stream leaving a layer and the next layer's normed input:
no cut at a layer boundary separates them. ``prepare`` splits each skip norm into the residual Add (its
sum keeps the name of output 3 where declared) and the plain norm (keeping output 0 and the node name),
so the graph has the residual chain of an unfused export; onnxruntime fuses them again when it loads the
graph. It also writes the KV-cache inputs' head counts and head size into their declared shapes where
they are symbolic (genai declares ``kv_cache_dim``), so a zero-length cache can be fed without a cache.
"""
from __future__ import annotations

import onnx
from onnx import helper

from graph_passes.fused_ops import FUSED_ATTENTION, SKIP_NORMS
from graph_passes.graph_utils import GraphIndex, attribute, projection_width


def prepare(model: onnx.ModelProto) -> int:
    """Split fused skip norms and pin KV-cache dims, in place; returns how many nodes were split."""
    split = unfuse_skip_norms(model.graph)
    pin_cache_dims(model.graph, cache_dims(model))
    return split


def unfuse_skip_norms(graph: onnx.GraphProto) -> int:
    """Replace every skip norm whose mean/variance outputs nobody reads by Add(s) + plain norm; returns the count."""
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    nodes, split = [], 0
    for node in graph.node:
        spec = SKIP_NORMS.get(node.op_type)
        stats_read = spec is not None and any(name in read for k, name in enumerate(node.output) if k not in (0, spec.sum_output) and name)
        if spec is None or stats_read:
            nodes.append(node)
            continue
        inputs = list(node.input)
        declared = node.output[spec.sum_output] if len(node.output) > spec.sum_output else ""
        total = declared or f"{node.name}/input_skip_sum"
        bias = inputs[spec.bias] if len(inputs) > spec.bias and inputs[spec.bias] else None
        partial = f"{total}/without_bias" if bias else total
        nodes.append(helper.make_node("Add", inputs[:2], [partial], name=f"{node.name}/residual_add"))
        if bias:
            nodes.append(helper.make_node("Add", [partial, bias], [total], name=f"{node.name}/residual_add_bias"))
        norm = helper.make_node(spec.plain, [total, *(inputs[k] for k in spec.norm_inputs if k < len(inputs))], [node.output[0]],
                                name=node.name, domain=spec.domain)
        norm.attribute.extend(a for a in node.attribute if a.name in spec.attributes)
        nodes.append(norm)
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(nodes)
    return split


def fused_attention_nodes(index: GraphIndex) -> list[onnx.NodeProto]:
    """The graph's fused attention nodes (``fused_ops.FUSED_ATTENTION``), in graph order."""
    return [node for node in index.nodes if node.op_type in FUSED_ATTENTION]


def attention_sizes(index: GraphIndex, node: onnx.NodeProto, types=None) -> tuple[int | None, int | None, int | None]:
    """(heads, kv_heads, head_dim) of a fused attention node: counts from its attributes, head_dim from o_proj's width."""
    spec = FUSED_ATTENTION[node.op_type]
    heads = attribute(node, spec.heads)
    kv_heads = attribute(node, spec.kv_heads) if spec.kv_heads else heads
    width = projection_width(index, node.output[0], types)
    head_dim = width // heads if width and heads and width % heads == 0 else None
    return heads, kv_heads, head_dim


def cache_dims(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """KV-cache graph input or output name -> (kv_heads, head_dim), for the caches fused attention nodes read and write."""
    index = GraphIndex(model.graph)
    found = {}
    for node in fused_attention_nodes(index):
        spec = FUSED_ATTENTION[node.op_type]
        _, kv_heads, head_dim = attention_sizes(index, node)
        if kv_heads and head_dim:
            names = [node.input[k] for k in spec.past if k < len(node.input)] + [node.output[k] for k in spec.present if k < len(node.output)]
            found.update(dict.fromkeys((name for name in names if name), (kv_heads, head_dim)))
    return found


def pin_cache_dims(graph: onnx.GraphProto, dims: dict[str, tuple[int, int]]) -> None:
    """Set dims 1 and 3 ([batch, kv_heads, seq, head_dim]) of the named graph inputs and outputs where they are symbolic."""
    for value in (*graph.input, *graph.output):
        shape = value.type.tensor_type.shape.dim
        if value.name not in dims or len(shape) != 4:
            continue
        for position, size in zip((1, 3), dims[value.name]):
            if not shape[position].HasField("dim_value"):
                shape[position].Clear()
                shape[position].dim_value = size
