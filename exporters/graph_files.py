"""Placing Optimum's ONNX files in a model folder, with external data (models over 2 GB) in one ``.data`` file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import ExportError

DATA_SUFFIX = ".data"  # the external data of graph X lives in X + ".data"


def move_graph(produced: Path, folder: Path, rel: str) -> tuple[str, str | None]:
    """Move an exported graph to ``folder/rel`` and its external data (if any) to ``folder/rel.data``.

    Returns the graph and data paths relative to ``folder``.
    """
    import onnx

    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(produced), load_external_data=False)
    tensors = list(external_tensors(model.graph))
    if not tensors:
        os.replace(produced, target)
        return rel, None
    locations = {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}
    if len(locations) != 1:
        raise ExportError(f"Optimum wrote external data to {len(locations)} files, expected one; report this model")
    data_name = target.name + DATA_SUFFIX
    os.replace(produced.parent / locations.pop(), target.parent / data_name)
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save(model, str(target))  # the tensors stay external: only the small graph is rewritten
    return rel, rel + DATA_SUFFIX


def external_tensors(graph) -> Iterator:
    """Every TensorProto of ``graph`` stored externally: initializers, node attributes, subgraphs."""
    from onnx import TensorProto

    tensors = list(graph.initializer)
    subgraphs = []
    for node in graph.node:
        for attribute in node.attribute:
            tensors += [attribute.t] if attribute.HasField("t") else list(attribute.tensors)
            subgraphs += [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
    yield from (tensor for tensor in tensors if tensor.data_location == TensorProto.EXTERNAL)
    for subgraph in subgraphs:
        yield from external_tensors(subgraph)
