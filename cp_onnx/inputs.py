"""Every user file cp_onnx reads as text goes through here, so that none is read past a named limit.

A calibration file, probe suite, report, sweep, batch manifest or tokenizer.json may come from
anyone; read whole, a multi-gigabyte one (or a line of a gigabyte, which the tokenizer would then
expand tenfold) takes the machine's memory before any check runs. Reads stop one byte past the
limit, so even a file whose size the system misreports (``/proc``, a growing file) is bounded.

Limits (environment variables, for the rare genuine input that needs more):
  CP_ONNX_MAX_FILE_MB   size of any one input file (default 256)
  CP_ONNX_MAX_LINE_MB   one line of a text or JSONL file: one calibration text, question, answer, probe item or shots,
                        in characters before anything tokenizes it (default 1)
  CP_ONNX_MAX_LINES     lines of one text or JSONL file: texts, questions, probe items, sweep rows (default 100,000)
and, fixed: MAX_NESTING, how deep JSON and TOML may nest (parsers recurse once per level: cp-onnx's own files nest
under 10 deep, tokenizer.json too), MAX_JSON_MB, the size of a JSON document (parsed, it takes up to 20 times
that), MAX_TOML_MB, the size of a batch manifest (tomllib's time grows with the square of a dotted key's parts),
and the sizes of probe items and added tokens below. A text's length in tokens is bounded where the texts are used:
calibration texts are cut at --max-length, zero-shot questions longer than it are refused, probe items past
MAX_ITEM_TOKENS (--max-item-length) too.
"""
from __future__ import annotations

import os
from pathlib import Path

from cp_onnx.errors import CpOnnxError

FILE_LIMIT_ENV, FILE_LIMIT_MB = "CP_ONNX_MAX_FILE_MB", 256
LINE_LIMIT_ENV, LINE_LIMIT_MB = "CP_ONNX_MAX_LINE_MB", 1
LINES_LIMIT_ENV, LINES_LIMIT = "CP_ONNX_MAX_LINES", 100_000
MAX_NESTING = 64
MAX_TOML_MB = 4
# A JSON document (report, manifest, config): json.loads makes up to 20 times its size of Python objects
# ([{},{},...] is 64 bytes of dict per 3 bytes of text); reports are about 100 kB.
MAX_JSON_MB = 16
# A probe item's tokens with its shots, prompt and answer (`cp-onnx sweep --max-item-length`): the shipped items are under
# 300 bytes; a longer item is refused as soon as it is tokenized, before its tokens are kept.
MAX_ITEM_TOKENS = 2048
# Options of one probe item (the shipped ones have 2 to 4): each is tokenized and matched against the item's other
# sequences, work that grows with the square of their number (20,000 options of one 1 MB line took seconds; 90,000, minutes).
MAX_PROBE_OPTIONS = 64
# Characters of one added token of tokenizer.json (real ones are under 100): the tokenizers library builds its matcher
# for them in time that grows with the square of a token's length.
MAX_ADDED_TOKEN_CHARS = 1000
# What str.splitlines() splits at: each is a line of its own for the line count.
LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def env_amount(env: str, unit: str) -> float | None:
    """The positive number in the environment variable ``env`` (None when unset), counted in ``unit``."""
    text = os.environ.get(env)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CpOnnxError(f"${env} must be a positive number of {unit}, not {text!r}")
    return value


def limit(env: str, default_mb: float) -> int:
    """A limit in bytes from ``env`` (megabytes), or the default."""
    value = env_amount(env, "megabytes")
    return int((default_mb if value is None else value) * 1e6)


def read_bytes(path: Path, what: str, *, cap_mb: float | None = None) -> bytes:
    """The bytes of ``path``, refused past CP_ONNX_MAX_FILE_MB, or ``cap_mb`` where smaller (FileNotFoundError passes
    through for the caller's hint)."""
    cap = limit(FILE_LIMIT_ENV, FILE_LIMIT_MB)
    cap = cap if cap_mb is None else min(cap, int(cap_mb * 1e6))
    try:
        if "\0" in str(path):  # pathlib's exists() answers False for these rather than raising
            raise ValueError("embedded null byte")
        special = path.exists() and not path.is_dir() and not path.is_file()  # a FIFO or device would block or never end
    except (OSError, ValueError) as exc:  # a name too long, or with a NUL byte
        raise CpOnnxError(f"the {what} path {str(path)[:80]!r} is not usable ({type(exc).__name__}); give the path of a file") from None
    if special:
        raise CpOnnxError(f"the {what} {path} is not a regular file; give the path of a file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(cap + 1)
    except IsADirectoryError:
        raise CpOnnxError(f"{path} is a folder; give the path of the {what}") from None
    except PermissionError:
        raise CpOnnxError(f"cannot read the {what} {path} (permission denied); check its permissions") from None
    if len(data) > cap:
        raise CpOnnxError(f"the {what} {path} is larger than {cap / 1e6:g} MB; if it is genuine, raise the limit with {FILE_LIMIT_ENV}=N")
    return data


def read_text(path: Path, what: str, *, encoding: str = "utf-8", cap_mb: float | None = None) -> str:
    """The text of ``path`` (size-limited), or a one-line error when it is not text in ``encoding``."""
    try:
        return read_bytes(path, what, cap_mb=cap_mb).decode(encoding)
    except UnicodeDecodeError:
        raise CpOnnxError(f"{path} is not UTF-8 text; save it with UTF-8 encoding") from None


def split_lines(text: str, path: Path, what: str) -> list[str]:
    """The lines of ``text`` (as str.splitlines gives them), counted before they are split: refused past
    CP_ONNX_MAX_LINES lines, or with a line longer than CP_ONNX_MAX_LINE_MB characters."""
    breaks = sum(text.count(mark) for mark in LINE_BREAKS) - text.count("\r\n")  # str.count allocates nothing; a split would
    check_line_count(breaks, path, what)
    return check_lines(text.splitlines(), path, what)


def check_line_count(breaks: int, path: Path, what: str) -> None:
    """Refuse a file of more than CP_ONNX_MAX_LINES lines (``breaks``: its line breaks), before it is split."""
    most = int(env_amount(LINES_LIMIT_ENV, "lines") or LINES_LIMIT)
    if breaks > most:
        raise CpOnnxError(f"the {what} {path} has more than {most:,} lines; split it, or if it is genuine raise the limit with {LINES_LIMIT_ENV}=N")


def check_lines(lines: list[str], path: Path, what: str) -> list[str]:
    """``lines``, refused if one is longer than CP_ONNX_MAX_LINE_MB (characters, which UTF-8 can only make longer)."""
    cap = limit(LINE_LIMIT_ENV, LINE_LIMIT_MB)
    for number, line in enumerate(lines, start=1):
        if len(line) > cap:
            raise CpOnnxError(f"line {number} of the {what} {path} is longer than {cap / 1e6:g} MB; split it, or raise the limit "
                              f"with {LINE_LIMIT_ENV}=N")
    return lines
