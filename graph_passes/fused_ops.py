"""What the fused operators of deployed graphs hold, as data: onnxruntime-genai builder graphs and graphs fused by
onnxruntime's transformer optimizer use onnxruntime contrib ops where an Optimum export has plain ONNX ops.

- A skip norm fuses the residual add with the next norm: output 0 is norm(input + skip [+ bias]) and
  output 3 (optional, often not declared) the sum itself, i.e. the residual stream.
- A fused attention op has no per-head context or probabilities to read; its head counts are attributes
  and it may read a KV cache.
- A packed quantized matmul keeps its weight as blocks of bits: the matrix shape is in attributes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkipNorm:
    """A fused residual add + norm, and the plain norm that computes its output 0 from the sum."""

    plain: str  # op type of the plain norm (same epsilon)
    domain: str  # the plain op's domain ("": onnxruntime registers SimplifiedLayerNormalization there too)
    norm_inputs: tuple[int, ...]  # fused input positions the plain norm reads after the sum: gamma (, beta)
    bias: int  # fused input position of the optional bias added into the sum
    attributes: tuple[str, ...] = ("epsilon",)  # attributes the plain op takes over
    sum_output: int = 3  # fused output position of input + skip (+ bias)


SKIP_NORMS: dict[str, SkipNorm] = {
    "SkipSimplifiedLayerNormalization": SkipNorm("SimplifiedLayerNormalization", "", (2,), bias=3),
    "SkipLayerNormalization": SkipNorm("LayerNormalization", "", (2, 3), bias=4),
}


@dataclass(frozen=True)
class FusedAttention:
    """A fused attention op: where its head counts and KV-cache inputs are."""

    heads: str  # attribute: query heads
    kv_heads: str | None  # attribute: key/value heads (None: as many as query heads)
    past: tuple[int, ...]  # input positions of the past key and value
    present: tuple[int, ...]  # output positions of the present key and value


FUSED_ATTENTION: dict[str, FusedAttention] = {
    "GroupQueryAttention": FusedAttention("num_heads", "kv_num_heads", past=(3, 4), present=(1, 2)),
    "MultiHeadAttention": FusedAttention("num_heads", None, past=(6, 7), present=(1, 2)),
}

# Quantized matmuls whose weight initializer is packed: attribute names of the matrix's (input width, output width).
PACKED_MATMULS: dict[str, tuple[str, str]] = {"MatMulNBits": ("K", "N")}
