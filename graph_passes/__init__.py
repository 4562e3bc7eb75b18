"""ONNX graph passes for transformer LMs: discovery (where the layers are) and rewrites (expose, route,
perturb, ablate, prune_heads, last_position), each a ``passes.GraphPass`` with a function form; segment cuts a
model into per-layer models. An ``edit.Edit`` names a change (a block duplicated or removed, a layer path,
heads removed) in text and JSON.

Depends on onnx and numpy only; knows nothing of onnxruntime or of the analysis.
"""
from graph_passes import graph_io, graph_utils, limits, mapped
from graph_passes.discovery import discover
from graph_passes.edit import Edit
from graph_passes.errors import GraphPassError
from graph_passes.expose import Expose, expose
from graph_passes.layer_map import Layer, LayerMap, block_name, parse_name
from graph_passes.ablate import Ablate, ablate
from graph_passes.passes import GraphPass, run_passes
from graph_passes.perturb import Perturb, perturb
from graph_passes.route import Route, route
from graph_passes.segment import segment

__all__ = ["Ablate", "Edit", "Expose", "GraphPass", "GraphPassError", "Layer", "LayerMap", "Perturb", "Route", "ablate", "block_name", "discover",
           "expose", "graph_io", "graph_utils", "limits", "mapped", "parse_name", "perturb", "route", "run_passes", "segment"]
