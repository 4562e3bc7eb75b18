"""One change to a model's decoder, as a value: which layers run (as exported, a block duplicated, a block removed
or any layer path) and which attention heads are removed; ``Edit.passes`` gives the passes that make it.

Text, as users type it (``Edit.parse`` reads it, ``Edit.format`` writes it back):

    baseline                      the model as it is
    12:15                         block [12, 15) duplicated: layers 0..14, then 12..14 again, then 15..L-1
    skip:12:15                    block [12, 15) removed: layers 0..11, then 15..L-1
    0..14,12..14,15..29           any layer path: layer numbers and inclusive ranges (``layer_path``'s syntax)
    heads:3.0,3.4,5.1             heads removed, as layer.head: heads 0 and 4 of layer 3, head 1 of layer 5
    skip:12:15+heads:3.0,3.4      a layer change and removed heads together (a pruned model)

A block is [i, j) with j exclusive, as in ``cp-onnx apply --duplicate I:J`` and lm-eval's ``duplicate=I:J``;
the ranges of a path are inclusive, as the layer-duplication community writes them. Heads keep the
numbers of the original model whatever the layer change, and only kept layers may lose heads. ``format``
writes one spelling of each edit: a path in its longest runs (``0..14,12..29`` for the path above), heads
in order; spaces around numbers, repeated heads and either order around ``+`` are read too.

JSON (``to_json`` / ``from_json``): a plain dict with at most one of ``duplicate``, ``skip`` and ``path``,
and optionally ``heads`` (layer numbers as strings, since JSON keys are):

    {}                                          baseline
    {"duplicate": [12, 15]}                     {"skip": [12, 15]}
    {"path": [0, 1, 2, 1, 2]}                   {"heads": {"3": [0, 4], "5": [1]}}
    {"skip": [12, 15], "heads": {"3": [0, 4]}}
"""
from __future__ import annotations

import operator
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from graph_passes import layer_path as paths
from graph_passes.errors import GraphPassError
from graph_passes.passes import GraphPass
from graph_passes.prune_heads import PruneHeads
from graph_passes.route import Route

KINDS = ("baseline", "duplicate", "skip", "path")  # what happens to the layers
EXAMPLES = "'12:15', 'skip:12:15', '0..14,12..14,15..29', 'heads:3.0,3.4' or 'skip:12:15+heads:3.0'"
_SKIP = re.compile(r"^skip\s*:(.*)$")
_HEADS = re.compile(r"^heads\s*:(.*)$")
_HEAD = re.compile(r"^(\d+)\.(\d+)$")
_JSON_KEYS = ("duplicate", "skip", "path", "heads")


@dataclass(frozen=True)
class Edit:
    """What to change in a model: ``kind`` of layer change (with its ``block`` or ``layer_path``) and ``removed_heads``.

    Build one with ``Edit()`` (the baseline), ``Edit.duplicate``, ``Edit.skip``, ``Edit.layers``, ``Edit.heads``
    and ``with_heads``, or read one with ``parse`` and ``from_json``; fields are checked and put in one order,
    so equal edits compare (and hash) equal.
    """

    kind: str = "baseline"
    block: tuple[int, int] | None = None  # [i, j) of a duplicate or skip
    layer_path: tuple[int, ...] | None = None  # the layers of a "path" edit, in order
    removed_heads: tuple[tuple[int, tuple[int, ...]], ...] = ()  # ((layer, (head, ...)), ...), ascending, none empty

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GraphPassError(f"unknown edit kind {self.kind!r}; use one of {', '.join(KINDS)}, e.g. Edit.skip(12, 15)")
        if (self.block is None) == (self.kind in ("duplicate", "skip")):
            raise GraphPassError(f"a {self.kind} edit {'needs a block [i, j)' if self.block is None else 'takes no block'}; e.g. Edit.duplicate(12, 15)")
        if (self.layer_path is None) == (self.kind == "path"):
            raise GraphPassError(f"a {self.kind} edit {'needs its layers' if self.layer_path is None else 'takes no layer path'}; e.g. Edit.layers([0, 1, 2, 1, 2])")
        if self.block is not None:
            i, j = (_number(n, "block bound") for n in _pair(self.block, "block"))
            if i >= j:
                raise GraphPassError(f"block {i}:{j} is empty; give I:J with I < J (J exclusive), e.g. '12:15'")
            object.__setattr__(self, "block", (i, j))
        if self.layer_path is not None:
            layers = tuple(_number(n, "layer") for n in self.layer_path)
            if not layers:
                raise GraphPassError("the layer path is empty; give at least one layer, e.g. '0..14,12..14,15..29'")
            object.__setattr__(self, "layer_path", layers)
        object.__setattr__(self, "removed_heads", _canonical_heads(dict(self.removed_heads)))

    @classmethod
    def duplicate(cls, i: int, j: int) -> Edit:
        """Block [i, j) run twice: layers 0..j-1, then i..j-1, then j..L-1."""
        return cls("duplicate", block=(i, j))

    @classmethod
    def skip(cls, i: int, j: int) -> Edit:
        """Block [i, j) removed: layers 0..i-1, then j..L-1."""
        return cls("skip", block=(i, j))

    @classmethod
    def layers(cls, path: Iterable[int]) -> Edit:
        """The layers run in the order ``path`` (repeats, omissions and reorderings allowed)."""
        return cls("path", layer_path=tuple(path))

    @classmethod
    def heads(cls, heads: Mapping[int, Iterable[int]]) -> Edit:
        """Heads ``{layer: [head, ...]}`` removed, every layer run once as exported."""
        return cls().with_heads(heads)

    def with_heads(self, heads: Mapping[int, Iterable[int]]) -> Edit:
        """This layer change with the heads ``{layer: [head, ...]}`` removed (instead of any removed before)."""
        if not isinstance(heads, Mapping):
            raise GraphPassError(f"heads are {{layer: [head, ...]}}, e.g. {{3: [0, 4]}}, not a {type(heads).__name__}")
        return Edit(self.kind, self.block, self.layer_path, tuple(heads.items()))

    @property
    def heads_by_layer(self) -> dict[int, list[int]]:
        """The removed heads as ``{layer: [head, ...]}`` (what ``prune_heads`` takes)."""
        return {layer: list(hs) for layer, hs in self.removed_heads}

    def check(self, num_layers: int, num_heads: int | None = None) -> None:
        """GraphPassError unless this edit fits a model of ``num_layers`` layers (and ``num_heads`` heads a layer)."""
        path = self._path(num_layers)
        for layer, hs in self.removed_heads:
            if layer >= num_layers:
                raise GraphPassError(f"edit {self.format()!r}: layer {layer} has no heads to remove, the model has {num_layers} layers (0..{num_layers - 1})")
            if layer not in path:
                raise GraphPassError(f"edit {self.format()!r}: layer {layer} is removed, so are its heads; remove heads of kept layers only")
            if num_heads is not None and hs[-1] >= num_heads:
                raise GraphPassError(f"edit {self.format()!r}: layer {layer} has heads 0..{num_heads - 1}; head {hs[-1]} does not exist")
            if num_heads is not None and len(hs) == num_heads:
                raise GraphPassError(f"edit {self.format()!r}: removing all {num_heads} heads of layer {layer} leaves it no attention; keep one, or remove the layer")

    def path(self, num_layers: int) -> list[int]:
        """The layers a model of ``num_layers`` layers runs, in order, after checking that the edit fits it."""
        self.check(num_layers)
        return self._path(num_layers)

    def _path(self, num_layers: int) -> list[int]:
        if self.kind == "duplicate":
            return paths.duplicate(*self.block, num_layers)
        if self.kind == "skip":
            return paths.skip(*self.block, num_layers)
        if self.kind == "path":
            return list(paths.check_path(self.layer_path, num_layers))
        return list(range(num_layers))

    def passes(self, num_layers: int, *, weights_dir: str | None = None) -> list[GraphPass]:
        """The passes that make this edit, for ``run_passes``: heads pruned first (they are numbered as in the original
        model), then the layers routed; weights left on disk are read from ``weights_dir``."""
        path = self.path(num_layers)
        return ([PruneHeads(self.heads_by_layer, weights_dir=weights_dir)] if self.removed_heads else []) + \
               ([Route(path)] if self.kind != "baseline" else [])

    @classmethod
    def parse(cls, text: str) -> Edit:
        """The edit ``text`` spells (see the module docstring); GraphPassError naming the bad part otherwise."""
        with _prefixed(f"edit {text!r}"):
            return _parse(text)

    def format(self) -> str:
        """The text ``parse`` reads back as this edit: one spelling for each edit."""
        if self.kind == "duplicate":
            layers = "{}:{}".format(*self.block)
        elif self.kind == "skip":
            layers = "skip:{}:{}".format(*self.block)
        elif self.kind == "path":
            layers = paths.format_path(self.layer_path)
        else:
            layers = "baseline"
        if not self.removed_heads:
            return layers
        heads = "heads:" + ",".join(f"{layer}.{head}" for layer, hs in self.removed_heads for head in hs)
        return heads if self.kind == "baseline" else f"{layers}+{heads}"

    def __str__(self) -> str:
        return self.format()

    def to_json(self) -> dict:
        """A plain dict (see the module docstring) that ``from_json`` reads back as this edit."""
        data: dict = {}
        if self.kind in ("duplicate", "skip"):
            data[self.kind] = list(self.block)
        elif self.kind == "path":
            data["path"] = list(self.layer_path)
        if self.removed_heads:
            data["heads"] = {str(layer): list(hs) for layer, hs in self.removed_heads}
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> Edit:
        """The edit a ``to_json`` dict describes; GraphPassError naming the bad key or value otherwise."""
        with _prefixed("edit JSON"):
            return _from_json(data)


@contextmanager
def _prefixed(what: str):
    """GraphPassErrors raised inside start with ``what`` (the text or JSON being read)."""
    try:
        yield
    except GraphPassError as exc:
        raise GraphPassError(f"{what}: {exc}") from None


def _parse(text: str) -> Edit:
    if not isinstance(text, str) or not text.strip():
        raise GraphPassError(f"nothing to read; give an edit, e.g. {EXAMPLES}")
    layers, heads = None, None
    for part in (part.strip() for part in text.split("+")):
        if not part:
            raise GraphPassError("an empty part around '+'; join one layer change and one heads: part, e.g. 'skip:12:15+heads:3.0'")
        found = _HEADS.match(part)
        if found and heads is None:
            heads = _parse_heads(found[1])
        elif not found and layers is None:
            layers = _parse_layers(part)
        else:
            raise GraphPassError(f"{part!r} is a second {'heads: part' if found else 'layer change'}; join one layer change and one heads: part with '+', e.g. 'skip:12:15+heads:3.0'")
    return (layers or Edit()).with_heads(heads or {})


def _parse_layers(part: str) -> Edit:
    """The layer change one ``+``-separated part spells."""
    if part == "baseline":
        return Edit()
    skipped = _SKIP.match(part)
    block = paths.parse_block(skipped[1] if skipped else part)
    if block is not None:
        return Edit("skip" if skipped else "duplicate", block=block)
    if skipped or ":" in part:
        raise GraphPassError(f"{part!r} is not a block I:J (J exclusive) or skip:I:J; e.g. {EXAMPLES}")
    try:
        return Edit.layers(paths.parse_path(part))
    except GraphPassError as exc:
        raise GraphPassError(f"{exc}; e.g. {EXAMPLES}") from None


def _parse_heads(listed: str) -> dict[int, list[int]]:
    heads: dict[int, list[int]] = {}
    for token in (token.strip() for token in listed.split(",")):
        found = _HEAD.match(token)
        if not found:
            raise GraphPassError(f"{token!r} is not a layer.head pair; e.g. 'heads:3.0,3.4' (heads 0 and 4 of layer 3)")
        heads.setdefault(int(found[1]), []).append(int(found[2]))
    return heads


def _from_json(data: Mapping) -> Edit:
    if not isinstance(data, Mapping):
        raise GraphPassError(f"an edit is an object, e.g. {{\"duplicate\": [12, 15]}}, not a {type(data).__name__}")
    unknown = next((key for key in data if key not in _JSON_KEYS), None)
    if unknown is not None:
        raise GraphPassError(f"key {unknown!r} is unknown; use duplicate, skip or path, and heads, e.g. {{\"skip\": [12, 15], \"heads\": {{\"3\": [0]}}}}")
    changes = [key for key in ("duplicate", "skip", "path") if key in data]
    if len(changes) > 1:
        raise GraphPassError(f"{' and '.join(changes)} given together; give one layer change, e.g. {{\"duplicate\": [12, 15]}}")
    edit = Edit()
    if changes == ["path"]:
        edit = Edit.layers(_json_list(data["path"], "path", "[0, 1, 2, 1, 2]"))
    elif changes:
        edit = Edit(changes[0], block=_pair(_json_list(data[changes[0]], changes[0], "[12, 15]"), changes[0]))
    heads = data.get("heads", {})
    if not isinstance(heads, Mapping):
        raise GraphPassError(f"heads is a {type(heads).__name__}; give {{layer: [head, ...]}}, e.g. {{\"3\": [0, 4]}}")
    return edit.with_heads({_layer_key(key): _json_list(hs, f"heads[{key!r}]", "[0, 4]") for key, hs in heads.items()})


def _canonical_heads(heads: Mapping[int, Iterable[int]]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Layers ascending, heads ascending and once each, layers without heads left out."""
    chosen = {}
    for layer, hs in heads.items():
        if isinstance(hs, (str, bytes)) or not isinstance(hs, Iterable):
            raise GraphPassError(f"the heads of layer {layer!r} are {hs!r}; give a list of head numbers, e.g. {{3: [0, 4]}}")
        chosen.setdefault(_number(layer, "layer"), set()).update(_number(h, f"layer {layer}'s head") for h in hs)
    return tuple((layer, tuple(sorted(hs))) for layer, hs in sorted(chosen.items()) if hs)


def _number(value, what: str) -> int:
    """``value`` as a layer, head or block number: an integer (not a bool), 0 or more."""
    try:
        number = operator.index(value)  # ints and numpy integers, not floats or strings
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 0:
        raise GraphPassError(f"{what} {value!r} is not a whole number 0 or more, e.g. 3 (layers and heads are numbered from 0)")
    return number


def _pair(value: Sequence, what: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise GraphPassError(f"{what} {value!r} is not a pair [i, j]; e.g. [12, 15] for layers 12..14")
    return tuple(value)


def _json_list(value, what: str, example: str) -> list:
    if not isinstance(value, list):
        raise GraphPassError(f"{what} is {value!r}, not a list; e.g. {example}")
    return value


def _layer_key(key) -> int:
    """A JSON heads key: a layer number, written as a string by JSON (or an int by a Python caller)."""
    if isinstance(key, str) and key.isdecimal():
        return int(key)
    return _number(key, "heads key")
