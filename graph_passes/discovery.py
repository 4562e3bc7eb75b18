"""Discovery: find a transformer's layers, residual stream and attention tensors in an ONNX graph."""
from __future__ import annotations

import onnx

from graph_passes import deployed, metadata, structural
from graph_passes.errors import GraphPassError
from graph_passes.families import BY_NAME, FAMILIES, Family, scopes_looked_for
from graph_passes.fused_ops import FUSED_ATTENTION
from graph_passes.graph_utils import GraphIndex, concrete_input_dims, infer_types, name_nodes, projection_width, static_dims
from graph_passes.layer_map import Layer, LayerMap
from graph_passes.located import LayerTensors, Located, adds_to


def discover(model: onnx.ModelProto, family: str | None = None) -> LayerMap:
    """Find where the layers are: by the family tables, else by topology (``family="structural"`` forces it).

    Changes the graph in place first, keeping what it computes: names unnamed nodes (deterministically,
    see ``graph_utils.name_nodes``), since ``Layer.nodes`` refers to nodes by name; splits the fused skip
    norms of deployed graphs so that the residual stream exists as a tensor between layers and pins their
    KV-cache dims (``deployed.prepare``).
    """
    if family is not None and family != structural.FAMILY and family not in BY_NAME:
        raise GraphPassError(f"unknown model family {family!r}; expected one of {', '.join([*BY_NAME, structural.FAMILY])}")
    if not model.graph.output:
        raise GraphPassError("the graph has no outputs; give a complete exported model")
    if family is None and metadata.read(model, metadata.PATH_KEY) is not None:
        family = structural.FAMILY  # a routed graph repeats layer scopes in node names: only topology tells the layers apart
    name_nodes(model)
    deployed.prepare(model)
    index = GraphIndex(model.graph)
    types = infer_types(model, concrete_input_dims(model.graph))
    if family == structural.FAMILY:
        located = structural.locate(index, types)
    elif family is not None:
        located = match_family(index, BY_NAME[family], by_name=True)
        if located is None:
            raise GraphPassError(f"the graph does not look like a {family} export (no layer nodes under {BY_NAME[family].scope}); leave the family out to detect it")
    else:
        located = next((found for f in FAMILIES if f.auto and (found := match_family(index, f)) is not None), None)
        located = located or structural.locate(index, types)
    if located is None:
        raise GraphPassError(
            f"no transformer layers found: looked for node scopes {scopes_looked_for()} and for a residual "
            "chain of Add nodes; is this a transformer exported with Optimum?"
        )
    return _complete(model.graph, index, types, located)


def match_family(index: GraphIndex, family: Family, *, by_name: bool = False) -> Located | None:
    """The family's layer tensors if the graph has its node scopes and residual adds, else None."""
    scopes: dict[int, str] = {}
    roots = set()
    for node in index.nodes:
        found = family.compiled.match(node.name)
        if found:
            scopes.setdefault(int(found["index"]), found.group(0))
            roots.add(found["root"])
    if not scopes or sorted(scopes) != list(range(len(scopes))) or len(roots) != 1:
        return None
    by_node = {node.name: node for node in index.nodes}
    if family.marker and not by_name and not any(name.startswith(scopes[0] + family.marker) for name in by_node):
        return None

    def output(name: str) -> str | None:
        node = by_node.get(name)
        return node.output[0] if node is not None else None

    root = roots.pop()
    embed = next((t for t in map(output, (f"{root}/{p}" for p in family.embed)) if t), None)
    if embed is None:
        return None
    layers, resid_in = [], embed
    for i in range(len(scopes)):
        scope = scopes[i]
        resid_out = output(scope + family.resid_out)
        mid = output(scope + family.resid_mid) if family.resid_mid else None
        mid = mid if mid and adds_to(index, mid, {resid_in}) else None  # GPT-NeoX parallel residual: no mid
        if resid_out is None or not adds_to(index, resid_out, {resid_in, mid} - {None}):
            return None
        layers.append(LayerTensors(resid_out, mid, output(scope + family.head_ctx), output(scope + family.pattern)))
        resid_in = resid_out
    final_norm = next((t for t in map(output, (f"{root}/{p}" for p in family.final_norm)) if t), None)
    return Located(family.name, tuple(layers), embed, final_norm)


def _complete(graph: onnx.GraphProto, index: GraphIndex, types: dict, located: Located) -> LayerMap:
    """Add node lists, shared inputs and sizes to the located tensors."""
    layers, member_sets, resid_in = [], [], located.embed
    for i, tensors in enumerate(located.layers):
        members = layer_nodes(index, resid_in, tensors.resid_out)
        roles = [t for t in (tensors.resid_mid, tensors.head_ctx, tensors.pattern, tensors.resid_out) if t]
        if any(index.producer.get(t) not in members for t in roles):
            raise GraphPassError(f"layer {i}'s tensors are also computed for other layers, so its nodes cannot be delimited; re-export the model without graph optimisation")
        member_sets.append(members)
        nodes = tuple(index.nodes[j].name for j in sorted(members))
        layers.append(Layer(i, resid_in, tensors.resid_out, tensors.resid_mid, tensors.head_ctx, tensors.pattern, nodes))
        resid_in = tensors.resid_out
    fused = next((index.nodes[j] for j in sorted(member_sets[0]) if index.nodes[j].op_type in FUSED_ATTENTION), None)
    hidden, heads, head_dim = _sizes(index, types, layers[0])
    if fused is not None and layers[0].head_ctx is None:
        heads, _, head_dim = deployed.attention_sizes(index, fused, types)
    return LayerMap(
        family=located.family,
        layers=tuple(layers),
        embed=located.embed,
        logits=graph.output[0].name,
        final_norm=located.final_norm,
        num_heads=heads,
        head_dim=head_dim,
        hidden_size=hidden,
        shared_inputs=_shared_inputs(index, layers, member_sets),
        attention_op=fused.op_type if fused is not None else None,
    )


def layer_nodes(index: GraphIndex, resid_in: str, resid_out: str) -> set[int]:
    """Positions of the nodes that compute one layer: what a pass may clone or remove.

    A node belongs to the layer if it depends on ``resid_in``, feeds ``resid_out`` and nothing outside
    the layer reads it (so a mask built from the embedding's shape stays shared), or if it only
    feeds the layer (its Constants, per-layer weight Identities). Rotary tables built under layer
    0's scope but read by every layer are not layer 0's.
    """
    end = index.producer[resid_out]
    upstream = index.ancestors(resid_out, stop=frozenset({resid_in}))
    members = index.descendants_within(resid_in, upstream)

    def read_outside(i: int) -> bool:
        return any(j not in members and not index.is_dead_end(j) for out in index.nodes[i].output for j in index.consumers.get(out, ()))

    todo = sorted(members)
    while todo:
        i = todo.pop()
        if i in members and i != end and read_outside(i):
            members.discard(i)
            todo.extend(index.producer[n] for n in index.nodes[i].input if index.producer.get(n) in members)
    entry = index.producer.get(resid_in)
    todo = [index.producer[n] for i in members for n in index.nodes[i].input if n in index.producer]
    while todo:
        i = todo.pop()
        if i in members or i == entry or read_outside(i):
            continue
        members.add(i)
        todo.extend(index.producer[n] for n in index.nodes[i].input if n in index.producer)
    return members


def _shared_inputs(index: GraphIndex, layers: list[Layer], member_sets: list[set[int]]) -> tuple[str, ...]:
    """Tensors made outside the layers that layers read (rotary tables, masks, graph inputs), graph order."""
    shared: set[str] = set()
    for layer, members in zip(layers, member_sets):
        made = {out for i in members for out in index.nodes[i].output}
        for i in members:
            shared.update(n for n in index.nodes[i].input if n and n not in made and n != layer.resid_in and n not in index.initializers)
    return tuple(sorted(shared, key=lambda n: (index.position(n), n)))


def _sizes(index: GraphIndex, types: dict, layer: Layer) -> tuple[int | None, int | None, int | None]:
    """hidden_size, num_heads, head_dim from inferred shapes and the output projection's weight."""
    # The first resid_in is the embedding, whose shape is known where fused ops leave later shapes unknown.
    resid = static_dims(types.get(layer.resid_out)) or static_dims(types.get(layer.resid_in)) or [None]
    ctx = static_dims(types.get(layer.head_ctx)) if layer.head_ctx else None
    heads, head_dim = (ctx[1], ctx[3]) if ctx and len(ctx) == 4 else (None, None)
    width = projection_width(index, layer.head_ctx, types) if layer.head_ctx else None
    if width and heads is None and head_dim is None:
        heads = _value_heads(index, types, layer.head_ctx)
    if width and heads and head_dim is None and width % heads == 0:
        head_dim = width // heads
    if width and head_dim and heads is None and width % head_dim == 0:
        heads = width // head_dim
    return resid[-1], heads, head_dim


def _value_heads(index: GraphIndex, types: dict, head_ctx: str) -> int | None:
    """Head count read from the values' [batch, heads, seq, dim] shape, when the context's is unknown."""
    inputs = index.nodes[index.producer[head_ctx]].input
    if len(inputs) < 2:
        return None
    tensor = inputs[1]
    for _ in range(8):
        dims = static_dims(types.get(tensor))
        if dims and len(dims) == 4 and dims[1]:
            return dims[1]
        i = index.producer.get(tensor)
        if i is None or not index.nodes[i].input:
            return None
        tensor = index.nodes[i].input[0]
    return None
