"""How deep a JSON or TOML text nests, found by a linear scan before any parser recurses into it.

Python's json and tomllib recurse once per level of nesting: 100,000 opening brackets end in a
RecursionError (or, with tomllib's dotted keys, in memory that grows with the square of the key's
parts: 100,000 parts took 19 GB). The scans here use regular expressions that match in one pass
(strings are matched whole, and an unterminated one runs to the end of the text rather than being
retried from every later quote) and count brackets with numpy in chunks, so a hostile file costs time
and memory linear in its size. They bound what the parser will meet, nothing more: the parser still
checks the syntax.
"""
from __future__ import annotations

import re

import numpy as np

# A JSON string, escapes included; unterminated, it runs to the end of the text.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
# TOML's strings (multi-line first) and comments: their brackets and dots are text, not structure.
_TOML_TEXT = re.compile(r'"""[\s\S]*?(?:"""|\Z)' r"|'''[\s\S]*?(?:'''|\Z)" r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*(?:"|\\?$)'
                        r"|'[^'\n]*(?:'|$)" r"|#[^\n]*", re.M)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_KEY_BREAKS = re.compile(r"[=\n\[\]{},]")  # a dotted key lies between two of these
_CHUNK = 1 << 22


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings left out)."""
    return _deepest(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)))


def toml_depth(text: str) -> int:
    """A bound on how deep ``text`` nests as TOML: its deepest brackets (arrays, inline tables, table headers)
    plus the most parts of any dotted key (``a.b.c`` nests three tables)."""
    bare = _TOML_TEXT.sub("", text)
    parts = max((segment.count(".") for segment in _KEY_BREAKS.split(bare)), default=0) + 1
    return _deepest(_NOT_BRACKET.sub("", bare)) + parts


def _deepest(brackets: str) -> int:
    """The highest running count of opening minus closing brackets in a string of brackets only."""
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    deepest = level = 0
    for start in range(0, len(codes), _CHUNK):
        part = codes[start : start + _CHUNK]
        steps = np.where((part == ord("[")) | (part == ord("{")), 1, -1).astype(np.int64)
        running = np.cumsum(steps) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest
