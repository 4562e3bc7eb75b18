"""ONNX graph passes for transformer LMs: discovery (where the layers are) and rewrites (expose, route,
perturb, ablate, segment).

Depends on onnx and numpy only; knows nothing of onnxruntime or of the analysis.
"""
from graph_passes import graph_io, graph_utils, limits, mapped
from graph_passes.discovery import discover
from graph_passes.errors import GraphPassError
from graph_passes.expose import expose
from graph_passes.layer_map import Layer, LayerMap, block_name, parse_name
from graph_passes.ablate import ablate
from graph_passes.perturb import perturb
from graph_passes.route import route
from graph_passes.segment import segment

__all__ = ["GraphPassError", "Layer", "LayerMap", "ablate", "block_name", "discover", "expose", "graph_io", "graph_utils", "limits", "mapped", "parse_name",
           "perturb", "route", "segment"]
