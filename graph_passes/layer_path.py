"""Layer paths: the order in which a routed model runs its decoder layers.

The syntax is the layer-duplication community's (llm-circuit-finder): comma-separated layer numbers
and INCLUSIVE ranges, e.g. ``0..14,12,13,14,15..39`` runs layers 0-14, then 12-14 again, then 15-39.
"""
from __future__ import annotations

import operator
import re
from typing import Sequence

from graph_passes.errors import GraphPassError

_NUMBER = re.compile(r"^\d+$")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_BLOCK = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
EXAMPLE = "0..14,12..14,15..29"


def parse_path(text: str, num_layers: int | None = None) -> list[int]:
    """``"0..2,1,2"`` -> ``[0, 1, 2, 1, 2]``; GraphPassError naming the first bad token. Layers are checked against
    ``num_layers`` when it is given."""
    if not text.strip():
        raise GraphPassError(f"layer path {text!r} is empty; give layers like '{EXAMPLE}'")
    path: list[int] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            raise GraphPassError(f"layer path {text!r} has an empty entry (a stray comma); remove it")
        number, span = _NUMBER.match(token), _RANGE.match(token)
        if number:
            layers = [int(token)]
        elif span:
            first, last = int(span[1]), int(span[2])
            if first > last:
                raise GraphPassError(f"layer path {text!r}: {token!r} is a reversed range; ranges go up, e.g. '{last}..{first}' (list layers one by one to run them backwards)")
            layers = list(range(first, last + 1))
        else:
            raise GraphPassError(f"layer path {text!r}: {token!r} is not a layer number or a..b range (layers are numbered from 0)")
        bad = next((layer for layer in layers if layer >= num_layers), None) if num_layers is not None else None
        if bad is not None:
            raise GraphPassError(f"layer path {text!r}: {token!r} is out of range, the model has {num_layers} layers (0..{num_layers - 1})")
        path.extend(layers)
    return path


def duplicate(i: int, j: int, num_layers: int) -> list[int]:
    """The path that runs block ``[i, j)`` twice: ``0..j-1, i..j-1, j..L-1``."""
    if not 0 <= i < j <= num_layers:
        raise GraphPassError(f"cannot duplicate block {i}:{j}: need 0 <= i < j <= {num_layers} (the model has {num_layers} layers; j is exclusive)")
    return [*range(j), *range(i, j), *range(j, num_layers)]


def skip(i: int, j: int, num_layers: int) -> list[int]:
    """The path without block ``[i, j)``: ``0..i-1, j..L-1`` (layers removed, the rest in order)."""
    if not 0 <= i < j <= num_layers:
        raise GraphPassError(f"cannot remove block {i}:{j}: need 0 <= i < j <= {num_layers} (the model has {num_layers} layers; j is exclusive)")
    if j - i == num_layers:
        raise GraphPassError(f"cannot remove all {num_layers} layers; remove fewer")
    return [*range(i), *range(j, num_layers)]


def parse_block(text: str) -> tuple[int, int] | None:
    """``"i:j"`` -> ``(i, j)``, spaces allowed around the numbers; None for any other text."""
    block = _BLOCK.match(text)
    return (int(block[1]), int(block[2])) if block else None


def parse_spec(text: str, num_layers: int) -> list[int]:
    """A layer path (``0..14,12..14,15..29``) or the duplication shorthand ``i:j`` (block [i, j) run twice);
    ``edit.Edit.parse`` reads these and the other edits."""
    block = parse_block(text)
    return duplicate(*block, num_layers) if block else parse_path(text, num_layers)


def check_path(path: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """``path`` as a tuple after checking it is non-empty and every entry is a layer of the model."""
    checked = []
    for layer in path:
        try:
            number = operator.index(layer)  # ints and numpy integers, not floats or strings
        except TypeError:
            number = None
        if number is None or isinstance(layer, bool) or not 0 <= number < num_layers:
            raise GraphPassError(f"layer path entry {layer!r} is not a layer of this model, which has {num_layers} layers (0..{num_layers - 1})")
        checked.append(number)
    if not checked:
        raise GraphPassError("the layer path is empty; give at least one layer")
    return tuple(checked)


def format_path(path: Sequence[int]) -> str:
    """Compact form: runs of consecutive ascending layers as ``a..b``; ``parse_path`` reads it back."""
    runs: list[list[int]] = []
    for layer in path:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
