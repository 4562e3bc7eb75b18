"""JSON and TOML files from elsewhere (reports, sweeps, manifests, calibration lines, batch manifests): parsed
after their nesting is bounded (cp_onnx.nesting), then checked against a schema before any field is used.

A report is read by the summary, the text form, the HTML page, embed and validate; each indexes it
freely, so a hand-edited or hostile file would otherwise end in a KeyError or TypeError traceback.
The schema shipped for users (``data/report.schema.json``) is the one checked here, by this small
subset of JSON Schema (type, const, enum, required, properties, additionalProperties, items,
minItems, minimum, maximum, minLength, maxLength, pattern, local $ref), so jsonschema is not needed at run time.

"number" means a finite number: JSON has no NaN or Infinity, though Python's reader accepts them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from cp_onnx import inputs, nesting
from cp_onnx.errors import CpOnnxError
from cp_onnx.inputs import MAX_NESTING

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    # finite, and (for integers) small enough to become a float: readers compute with these
    "number": lambda v: (isinstance(v, float) and math.isfinite(v)) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1e300),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def parse_json(text: str | bytes, path: Path | str, hint: str, *, scan: bool = True):
    """The JSON value of ``text`` (a file's contents, or one line of it), or a one-line error ending in ``hint``.

    Bytes are decoded as json.loads would (UTF-8, -16 or -32); the nesting is bounded before the parser recurses (without
    ``scan``, by json's own recursion limit alone: for a large file whose every reader stops deep nesting itself)."""
    too_deep = f"{path} nests JSON too deeply (more than {MAX_NESTING} levels) to be a cp-onnx input; {hint}"
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode(json.detect_encoding(text), "surrogatepass")
        if scan and nesting.json_depth(text) > MAX_NESTING:
            raise CpOnnxError(too_deep)
        return json.loads(text)
    except RecursionError:  # the scan above is the guard (or, without it, json's own limit)
        raise CpOnnxError(f"{path} nests JSON too deeply to be read; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CpOnnxError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); {hint}") from None
    except ValueError as exc:  # numbers with more digits than Python converts
        raise CpOnnxError(f"{path} is not valid JSON ({exc}); {hint}") from None


def read_json(path: Path, what: str, hint: str, *, cap_mb: float | None = inputs.MAX_JSON_MB):
    """The JSON value in the file ``path`` (at most ``cap_mb``, None: the file limit), or a one-line error ending
    in ``hint`` (FileNotFoundError passes through for the caller's hint)."""
    return parse_json(inputs.read_text(path, what, cap_mb=cap_mb), path, hint)


def parse_toml(text: str, path: Path, hint: str) -> dict:
    """The TOML table of ``text``, its nesting bounded first, or a one-line error ending in ``hint``."""
    import tomllib  # Python 3.11; callers say what to do on 3.10

    if nesting.toml_depth(text) > MAX_NESTING:
        raise CpOnnxError(f"{path} nests tables, arrays or dotted keys more than {MAX_NESTING} deep; {hint}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CpOnnxError(f"{path} is not valid TOML ({exc}); {hint}") from None
    except RecursionError:  # the bound above is the guard; this is its backstop
        raise CpOnnxError(f"{path} nests TOML too deeply; {hint}") from None


def check(value, schema: dict, where: str, hint: str, *, root: dict | None = None, at: str = "") -> None:
    """CpOnnxError naming the first place where ``value`` breaks ``schema``."""
    root = schema if root is None else root
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]

    def fail(what: str) -> None:
        raise CpOnnxError(f"{where}: {at or 'the top level'} {what}; {hint}")

    types = schema.get("type")
    if types is not None and not any(_TYPES[t](value) for t in ([types] if isinstance(types, str) else types)):
        fail(f"should be {' or '.join([types] if isinstance(types, str) else types)}, not {shown(value)}")
    if "const" in schema and value != schema["const"]:
        fail(f"should be {schema['const']!r}, not {shown(value)}")
    if "enum" in schema and value not in schema["enum"]:
        fail(f"should be one of {', '.join(map(repr, schema['enum']))}, not {shown(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and not value >= schema["minimum"]:
            fail(f"should be at least {schema['minimum']}, not {shown(value)}")
        if "maximum" in schema and not value <= schema["maximum"]:
            fail(f"should be at most {schema['maximum']}, not {shown(value)}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        fail(f"does not match {schema['pattern']}")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        fail(f"should be {schema.get('minLength', 0)} to {schema.get('maxLength', 'any number of')} characters long, not {len(value):,}")
    if isinstance(value, dict):
        missing = [key for key in schema.get("required", ()) if key not in value]
        if missing:
            fail(f"lacks {', '.join(missing)}")
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = properties.get(key, extra)
            if sub is False:
                fail(f"has an unexpected key {key!r}")
            if isinstance(sub, dict):
                check(item, sub, where, hint, root=root, at=f"{at}.{key}" if at else key)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            fail(f"should hold at least {schema['minItems']} item(s)")
        if isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                check(item, schema["items"], where, hint, root=root, at=f"{at}[{index}]")


def shown(value) -> str:
    """A value from a file as an error message may quote it: JSON-escaped, at most 40 characters."""
    text = json.dumps(value, allow_nan=True, default=str) if not isinstance(value, (dict, list)) else type(value).__name__.replace("dict", "an object").replace("list", "an array")
    return text if len(text) <= 40 else text[:37] + "..."
