"""The perturb pass: graph inputs that shift a layer's residual input and scale or shift its heads.

For each chosen layer ``l`` a new input ``perturb.blocks.{l}.resid_in`` [batch, seq, hidden] is added
to the residual stream entering the layer (every node of layer ``l`` that reads ``resid_in`` reads
``resid_in + delta``, the skip connection included). For each layer whose heads are chosen, the
head context [batch, heads, seq, head_dim] before the output projection becomes
``head_ctx * head_scale[:, :, None, None] + head_shift`` with inputs
``perturb.blocks.{l}.attn.head_scale`` [batch, heads] and ``perturb.blocks.{l}.attn.head_ctx``
[batch, heads, seq, head_dim]. Zeros and ones leave the model unchanged, so the rows of one batch
can hold the base forward and many perturbed ones of the same text. ``rewrite.include_inserted``
updates a LayerMap so the segment pass can cut a perturbed model layer by layer (a perturbation at
layer ``l`` then runs layers ``l..L-1`` only).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from graph_passes.errors import GraphPassError
from graph_passes.graph_utils import elem_type, infer_types, token_dims
from graph_passes.layer_map import LayerMap, block_name
from graph_passes.passes import GraphPass, checked_layers, require_heads
from graph_passes.rewrite import INSERTED_SCOPE, add_constant, add_input, include_inserted, reroute, sort_nodes


def resid_input(layer: int) -> str:
    """Name of the input added to layer ``layer``'s residual input."""
    return f"perturb.{block_name(layer, 'resid_in')}"


def head_scale_input(layer: int) -> str:
    """Name of the [batch, heads] input multiplying layer ``layer``'s head contexts."""
    return f"perturb.blocks.{layer}.attn.head_scale"


def head_shift_input(layer: int) -> str:
    """Name of the [batch, heads, seq, head_dim] input added to layer ``layer``'s head contexts."""
    return f"perturb.{block_name(layer, 'attn.head_ctx')}"


class Perturb(GraphPass):
    """Graph inputs for residual deltas at ``layers`` and head scales and shifts at the layers in ``heads``.

    ``heads`` names layers: every head of such a layer gets a scale and a shift (a row picks heads
    by its values). The canonical tensors (``resid_in``, ``head_ctx``) keep their unperturbed values.
    """

    def __init__(self, layers: Iterable[int] = (), heads: Iterable[int] = ()):
        self.layers, self.head_layers = list(layers), list(heads)

    def requires(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        layers, head_layers = checked_layers(layer_map, self.layers), checked_layers(layer_map, self.head_layers)
        if head_layers:
            require_heads(layer_map)
        if token_dims(model.graph) is None:
            raise GraphPassError("the graph has no [batch, sequence] token input; give a transformer LM exported with Optimum")
        new_inputs = [resid_input(l) for l in layers] + [name for l in head_layers for name in (head_scale_input(l), head_shift_input(l))]
        taken = {value.name for value in model.graph.input}
        clash = next((name for name in new_inputs if name in taken), None)
        if clash is not None:
            raise GraphPassError(f"the model already has an input {clash!r}; perturb the original model, not a perturbed one")

    def apply(self, model: onnx.ModelProto, layer_map: LayerMap) -> None:
        graph = model.graph
        types = infer_types(model)
        batch, seq = token_dims(graph)
        for l in checked_layers(layer_map, self.layers):
            layer = layer_map.layers[l]
            delta = add_input(graph, resid_input(l), elem_type(types, layer.resid_in), [batch, seq, layer_map.hidden_size])
            reroute(graph, layer, layer.resid_in, [("Add", delta)])
        for l in checked_layers(layer_map, self.head_layers):
            layer = layer_map.layers[l]
            elem = elem_type(types, layer.head_ctx)
            scale = add_input(graph, head_scale_input(l), elem, [batch, layer_map.num_heads])
            shift = add_input(graph, head_shift_input(l), elem, [batch, layer_map.num_heads, seq, layer_map.head_dim])
            axes = add_constant(graph, f"{INSERTED_SCOPE}{l}/head_scale_axes", np.array([2, 3], dtype=np.int64))
            scale4 = f"{INSERTED_SCOPE}{l}/head_scale_4d"
            graph.node.append(helper.make_node("Unsqueeze", [scale, axes], [scale4], name=scale4))
            reroute(graph, layer, layer.head_ctx, [("Mul", scale4), ("Add", shift)])
        sort_nodes(graph)

    def layer_map_after(self, layer_map: LayerMap, model: onnx.ModelProto) -> LayerMap:
        return include_inserted(layer_map, model)


def perturb(model: onnx.ModelProto, layer_map: LayerMap, layers: Iterable[int] = (), heads: Iterable[int] = ()) -> onnx.ModelProto:
    """A copy of ``model`` with residual inputs for ``layers`` and head scale/shift inputs for the layers in ``heads``
    (see ``Perturb``)."""
    return Perturb(layers, heads)(model, layer_map)
