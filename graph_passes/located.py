"""What a locator (family table or topology fallback) finds before discovery completes it into a LayerMap."""
from __future__ import annotations

from dataclasses import dataclass

from graph_passes.graph_utils import GraphIndex

# Ops a residual tensor may pass through between the residual Add and where it is read:
# value-preserving casts, and the LayerNorm a post-LN model (BERT) applies to the stream itself.
STREAM_OPS = frozenset({"Cast", "Identity", "LayerNormalization"})


@dataclass(frozen=True)
class LayerTensors:
    """Graph tensors of one layer's roles (resid_in is implied: embed or the previous resid_out)."""

    resid_out: str
    resid_mid: str | None = None
    head_ctx: str | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class Located:
    """Layer tensors found in a graph, by the family table named ``family`` or by topology."""

    family: str
    layers: tuple[LayerTensors, ...]
    embed: str
    final_norm: str | None


def residual_add(index: GraphIndex, tensor: str) -> int | None:
    """The Add behind ``tensor`` once casts and stream LayerNorms are walked back, or None."""
    i = index.producer.get(tensor)
    while i is not None and index.nodes[i].op_type in STREAM_OPS:
        i = index.producer.get(index.nodes[i].input[0])
    return i if i is not None and index.nodes[i].op_type == "Add" else None


def adds_to(index: GraphIndex, tensor: str, stream: set[str]) -> bool:
    """Whether ``tensor`` is a residual Add whose skip input is one of the ``stream`` tensors."""
    i = residual_add(index, tensor)
    return i is not None and any(index.source(name) in stream for name in index.nodes[i].input)
