"""Where a transformer's layers, residual stream and heads live in an ONNX graph.

Every activation has one canonical name, used by every pass and every statistic
(in the spirit of TransformerLens' ``blocks.3.attn.hook_pattern``):

    embed                   residual stream entering layer 0 (token + position embeddings)
    blocks.{i}.resid_in     residual stream entering layer i          [batch, seq, hidden]
    blocks.{i}.resid_mid    after the attention residual add          [batch, seq, hidden]
    blocks.{i}.resid_out    residual stream leaving layer i           [batch, seq, hidden]
    blocks.{i}.attn.head_ctx per-head attention context before o_proj [batch, heads, seq, head_dim]
    blocks.{i}.attn.pattern attention probabilities                   [batch, heads, seq, seq]
    final_norm              final norm output                         [batch, seq, hidden]
    logits                  model output logits                       [batch, seq, vocab]

``blocks.{i}.resid_in`` is the same tensor as ``embed`` for i = 0 and as
``blocks.{i-1}.resid_out`` otherwise; it gets its own name because statistics are
stated per layer in terms of what enters and what leaves it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Roles, in the order a layer computes them.
LAYER_ROLES = ("resid_in", "resid_mid", "resid_out", "attn.head_ctx", "attn.pattern")
GLOBAL_ROLES = ("embed", "final_norm", "logits")

_CANONICAL = re.compile(r"^(?:blocks\.(\d+)\.(resid_in|resid_mid|resid_out|attn\.head_ctx|attn\.pattern)|embed|final_norm|logits)$")


def block_name(layer: int, role: str) -> str:
    """Canonical name of a per-layer activation, e.g. ``block_name(3, "resid_out")``."""
    if role not in LAYER_ROLES:
        raise ValueError(f"unknown layer role {role!r}; expected one of {', '.join(LAYER_ROLES)}")
    return f"blocks.{layer}.{role}"


def parse_name(name: str) -> tuple[int | None, str]:
    """Split a canonical name into (layer or None, role)."""
    m = _CANONICAL.match(name)
    if not m:
        raise ValueError(
            f"{name!r} is not a canonical activation name; expected e.g. 'blocks.3.resid_out', "
            f"'blocks.3.attn.head_ctx', 'embed', 'final_norm' or 'logits'"
        )
    if m.group(1) is None:
        return None, name
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class Layer:
    """Graph tensor names for one transformer layer (None where the graph has no such tensor)."""

    index: int
    resid_in: str
    resid_out: str
    resid_mid: str | None = None
    head_ctx: str | None = None
    pattern: str | None = None
    # Names of the graph nodes that compute this layer, in graph order: what `route` clones.
    nodes: tuple[str, ...] = ()

    def tensor(self, role: str) -> str | None:
        return {
            "resid_in": self.resid_in,
            "resid_mid": self.resid_mid,
            "resid_out": self.resid_out,
            "attn.head_ctx": self.head_ctx,
            "attn.pattern": self.pattern,
        }[role]


@dataclass(frozen=True)
class LayerMap:
    """The result of discovery: one entry per layer plus the model-wide tensors."""

    family: str  # family table that matched, or "structural" for the topology fallback
    layers: tuple[Layer, ...]
    embed: str
    logits: str
    final_norm: str | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    # Tensors every layer reads that are produced outside the layers (rotary tables, masks).
    shared_inputs: tuple[str, ...] = field(default=())
    # The fused attention op (GroupQueryAttention, ...) of a deployed graph, whose per-head tensors do not exist.
    attention_op: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tensor(self, name: str) -> str:
        """Graph tensor name behind a canonical activation name."""
        layer, role = parse_name(name)
        if layer is None:
            value = {"embed": self.embed, "final_norm": self.final_norm, "logits": self.logits}[role]
        else:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"{name!r}: layer {layer} is out of range, the model has {self.num_layers} layers (0..{self.num_layers - 1})")
            value = self.layers[layer].tensor(role)
        if value is None:
            raise ValueError(f"{name!r} is not available in this {self.family} graph")
        return value

    def available(self, role: str) -> bool:
        """Whether every layer has a tensor for this role."""
        return all(layer.tensor(role) is not None for layer in self.layers)

    def names(self, roles: tuple[str, ...] = ("resid_in", "resid_out")) -> list[str]:
        """Canonical names of the given roles for every layer, layer-major."""
        return [block_name(layer.index, role) for layer in self.layers for role in roles if layer.tensor(role) is not None]
