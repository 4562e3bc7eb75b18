"""ONNX graph passes for transformer LMs: discovery (where the layers are) and rewrites (expose, ...).

Depends on onnx and numpy only; knows nothing of onnxruntime or of the analysis.
"""
from graph_passes import graph_io, graph_utils
from graph_passes.discovery import discover
from graph_passes.errors import GraphPassError
from graph_passes.expose import expose
from graph_passes.layer_map import Layer, LayerMap, block_name, parse_name
from graph_passes.route import route

__all__ = ["GraphPassError", "Layer", "LayerMap", "block_name", "discover", "expose", "graph_io", "graph_utils", "parse_name", "route"]
