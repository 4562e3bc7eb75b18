"""Topology fallback: find the layers of a graph whose node names say nothing (optimised or renamed).

The residual stream is a chain of Add nodes. Each residual Add has a skip input that is an ancestor
of its other input through a branch holding a weight MatMul (a sublayer); an attention sublayer's
branch also holds a Softmax or a fused attention op (no per-head tensors then), and a layer starts at
each attention Add. Consecutive residual Adds are
linked when the skip input of one is computed from the other's output without a MatMul: directly
(pre-LN, through a Cast at most) or through a LayerNorm (post-LN, where that norm's output is the
stream). GPT-NeoX's parallel residual has one Add per layer, holding both branches: no resid_mid.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from graph_passes.fused_ops import FUSED_ATTENTION
from graph_passes.graph_utils import MATMUL_OPS, PASS_THROUGH, GraphIndex, static_dims
from graph_passes.located import LayerTensors, Located

FAMILY = "structural"
# Ops that mark a branch as attention: the Softmax of an unfused export, or a fused attention op.
ATTENTION_OPS = frozenset({"Softmax", *FUSED_ATTENTION})
# Ops between the final norm and the output projection that do not change values.
_RESHAPES = PASS_THROUGH | {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# How many earlier residual Adds to try as a link's predecessor (false candidates may sit between).
_LINK_LOOKBACK = 4


@dataclass(frozen=True)
class _Residual:
    add: int  # position of the Add node
    skip: str  # the input carried over unchanged from the stream
    branch: frozenset[int]  # nodes between the skip input and the other input
    attention: bool


def locate(index: GraphIndex, types: dict[str, onnx.TypeProto]) -> Located | None:
    """Layer tensors found from topology alone, or None if there is no residual chain with attention."""
    chain = _longest_chain(index, _residual_adds(index, types))
    while chain and not chain[0].attention:  # a layer starts at its attention
        chain = chain[1:]
    if not chain:
        return None
    stream = [index.source(chain[0].skip)] + [index.source(r.skip) for r in chain[1:]] + [_last_stream(index, chain)]
    layers: list[LayerTensors] = []
    for k, residual in enumerate(chain):
        after = stream[k + 1]
        if residual.attention:
            pattern, head_ctx = _attention(index, residual)
            layers.append(LayerTensors(after, None, head_ctx, pattern))
        else:  # a later sublayer (MLP): the layer's output moves on, the previous one becomes mid
            last = layers[-1]
            mid = last.resid_mid or last.resid_out
            layers[-1] = LayerTensors(after, mid, last.head_ctx, last.pattern)
    return Located(FAMILY, tuple(layers), stream[0], _final_norm(index, stream[-1]))


def _residual_adds(index: GraphIndex, types: dict[str, onnx.TypeProto]) -> list[_Residual]:
    """Add nodes where one input is carried over and the other is computed from it by a weight MatMul."""
    found = []
    for i, node in enumerate(index.nodes):
        if node.op_type != "Add" or len(node.input) != 2 or any(n in index.constants for n in node.input):
            continue
        ranks = {len(dims) for dims in map(static_dims, (types.get(n) for n in (*node.input, node.output[0]))) if dims is not None}
        if ranks - {3}:  # the stream is [batch, seq, hidden]; skips attention scores and rotary sums
            continue
        for skip, other in (node.input, reversed(node.input)):
            path = index.between(skip, other)
            ops = index.ops(path) if path else set()
            if ops & MATMUL_OPS:
                found.append(_Residual(i, skip, frozenset(path), bool(ops & ATTENTION_OPS)))
                break
    return found


def _longest_chain(index: GraphIndex, residuals: list[_Residual]) -> list[_Residual]:
    """The longest run of residual Adds each computed from the previous one's output."""
    previous: dict[int, int] = {}
    for k, residual in enumerate(residuals):
        for j in range(k - 1, max(k - 1 - _LINK_LOOKBACK, -1), -1):
            if _links(index, index.nodes[residuals[j].add].output[0], residual.skip):
                previous[k] = j
                break
    length: dict[int, int] = {}
    for k in range(len(residuals)):
        length[k] = length[previous[k]] + 1 if k in previous else 1
    if not length:
        return []
    k = max(length, key=lambda key: (length[key], -key))
    chain = [k]
    while chain[-1] in previous:
        chain.append(previous[chain[-1]])
    return [residuals[j] for j in reversed(chain)]


def _links(index: GraphIndex, out: str, skip: str) -> bool:
    """Whether ``skip`` is ``out`` carried along the stream (cast, or normalised in a post-LN model)."""
    if index.source(skip) == out:
        return True
    path = index.between(out, skip)
    return path is not None and not index.ops(path) & (MATMUL_OPS | ATTENTION_OPS)


def _last_stream(index: GraphIndex, chain: list[_Residual]) -> str:
    """The stream after the last residual Add: its output, or (post-LN) the same norm applied to it."""
    out = index.nodes[chain[-1].add].output[0]
    if len(chain) < 2:
        return out
    before = index.nodes[chain[-2].add].output[0]
    stream = index.source(chain[-1].skip)
    if stream == before:
        return out
    norm_ops = sorted(index.nodes[i].op_type for i in index.between(before, stream))
    window = set(range(index.position(out) + 1, index.position(out) + 4 * len(norm_ops) + 16))
    for j in sorted(index.descendants_within(out, window)):
        candidate = index.nodes[j].output[0]
        path = index.between(out, candidate)
        if path is not None and sorted(index.nodes[i].op_type for i in path) == norm_ops:
            return candidate
    return out


def _attention(index: GraphIndex, residual: _Residual) -> tuple[str | None, str | None]:
    """(pattern, head_ctx): the Softmax output, and the first MatMul it feeds (probabilities @ values); (None, None)
    inside a fused attention op."""
    softmax = min((i for i in residual.branch if index.nodes[i].op_type == "Softmax"), default=None)
    if softmax is None:
        return None, None
    pattern = index.nodes[softmax].output[0]
    after = index.descendants_within(pattern, set(residual.branch))
    matmul = min((i for i in after if index.nodes[i].op_type == "MatMul"), default=None)
    return pattern, index.nodes[matmul].output[0] if matmul is not None else None


def _final_norm(index: GraphIndex, last: str) -> str | None:
    """The tensor the output projection reads after the last layer, if it is not the stream itself."""
    downstream = index.descendants_within(last, set(range(index.position(last) + 1, len(index.nodes))))
    head = min((i for i in downstream if index.nodes[i].op_type in MATMUL_OPS and any(n in index.constants for n in index.nodes[i].input[1:])), default=None)
    if head is None:
        return None
    tensor = index.data_inputs(head)[0]
    while tensor in index.producer and index.nodes[index.producer[tensor]].op_type in _RESHAPES:
        tensor = index.nodes[index.producer[tensor]].input[0]
    return tensor if tensor != last else None
