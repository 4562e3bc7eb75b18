"""Where each model family's Optimum export puts its layers, as data: node-name patterns, one entry per family.

Optimum keeps PyTorch module scopes in node names (``/model/layers.3/self_attn/Softmax``). A layer's
tensors are the first outputs of nodes named ``{layer scope}{pattern}``; the embedding and final norm
are nodes named ``{root}/{pattern}`` (first one present wins). Wrapper prefixes (``/model/model/``,
``/model/language_model/``) are absorbed by the scope regex. Entries are tried in order, so a family
whose export is a superset of another's (qwen2's q_proj bias, phi3's fused qkv) comes first, with a
``marker`` node that only it has. Mistral's export is node-for-node llama's: auto-detection calls it
llama, and ``discover(model, family="mistral")`` names it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """How one family's node names locate its layer tensors."""

    name: str
    scope: str  # layer scope as shown to people, N standing for the layer index
    scope_regex: str  # matches a node name; groups: root (model prefix), index
    resid_mid: str | None  # node in the layer scope that adds the attention output to the residual
    resid_out: str  # node whose output leaves the layer
    head_ctx: str  # attention probabilities @ values, [batch, heads, seq, head_dim]
    pattern: str  # the attention Softmax
    embed: tuple[str, ...]  # nodes under root whose output enters layer 0
    final_norm: tuple[str, ...] = ()  # nodes under root whose output is the final norm (none in post-LN BERT)
    marker: str | None = None  # node in layer 0's scope that tells this family from look-alikes
    auto: bool = True  # tried by auto-detection (False: only when asked for by name)
    compiled: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.scope_regex))


# Llama-style decoders: /model/layers.N/{Add = attention residual, Add_1 = layer output}.
_LLAMA_SCOPE = r"^(?P<root>(?:/[^/]+)*?/(?:model|language_model))/layers\.(?P<index>\d+)/"
_LLAMA_LIKE = dict(
    scope="/model/layers.N/",
    scope_regex=_LLAMA_SCOPE,
    resid_mid="Add",
    resid_out="Add_1",
    head_ctx="self_attn/MatMul_1",
    pattern="self_attn/Softmax",
    embed=("embed_tokens/Mul", "embed_tokens/Gather"),  # Gemma scales the embedding by sqrt(hidden)
    final_norm=("norm/Mul_1",),
)

FAMILIES: tuple[Family, ...] = (
    Family("phi3", marker="self_attn/qkv_proj/MatMul", **_LLAMA_LIKE),
    Family("gemma3", marker="pre_feedforward_layernorm/", **_LLAMA_LIKE),
    Family("qwen2", marker="self_attn/q_proj/Add", **_LLAMA_LIKE),
    Family("llama", **_LLAMA_LIKE),
    Family("mistral", auto=False, **_LLAMA_LIKE),
    Family(
        "gpt2",
        scope="/transformer/h.N/",
        scope_regex=r"^(?P<root>(?:/[^/]+)*?/transformer)/h\.(?P<index>\d+)/",
        resid_mid="Add",
        resid_out="Add_1",
        head_ctx="attn/MatMul_1",
        pattern="attn/Softmax",
        embed=("Add",),  # token + position embeddings
        final_norm=("ln_f/LayerNormalization",),
    ),
    Family(
        "gpt_neox",
        scope="/gpt_neox/layers.N/",
        scope_regex=r"^(?P<root>(?:/[^/]+)*?/gpt_neox)/layers\.(?P<index>\d+)/",
        # With use_parallel_residual (the default) this Add sums attention and MLP outputs, not the
        # residual: discovery checks that it reads the layer input and drops it otherwise.
        resid_mid="Add",
        resid_out="Add_1",
        head_ctx="attention/MatMul_1",
        pattern="attention/Softmax",
        embed=("embed_in/Gather",),
        final_norm=("final_layer_norm/LayerNormalization",),
    ),
    Family(
        "bert",
        scope="/encoder/layer.N/",
        scope_regex=r"^(?P<root>(?:/[^/]+)*?)/encoder/layer\.(?P<index>\d+)/",
        # Post-LN: the residual stream is what the LayerNorms output.
        resid_mid="attention/output/LayerNorm/LayerNormalization",
        resid_out="output/LayerNorm/LayerNormalization",
        head_ctx="attention/self/MatMul_1",
        pattern="attention/self/Softmax",
        embed=("embeddings/LayerNorm/LayerNormalization",),
    ),
)

BY_NAME = {family.name: family for family in FAMILIES}


def scopes_looked_for() -> str:
    """The layer scopes the table knows, for error messages."""
    return ", ".join(dict.fromkeys(family.scope for family in FAMILIES))
