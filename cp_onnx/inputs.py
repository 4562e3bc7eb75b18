"""Every user file cp_onnx reads as text goes through here, so that none is read past a named limit.

A calibration file, probe suite, report, sweep, batch manifest or tokenizer.json may come from
anyone; read whole, a multi-gigabyte one (or a line of a gigabyte, which the tokenizer would then
expand tenfold) takes the machine's memory before any check runs. Reads stop one byte past the
limit, so even a file whose size the system misreports (``/proc``, a growing file) is bounded.

Limits (environment variables, for the rare genuine input that needs more):
  CP_ONNX_MAX_FILE_MB   size of any one input file (default 256)
  CP_ONNX_MAX_LINE_MB   one line of a text or JSONL file: one calibration text or probe item (default 1)
"""
from __future__ import annotations

import os
from pathlib import Path

from cp_onnx.errors import CpOnnxError

FILE_LIMIT_ENV, FILE_LIMIT_MB = "CP_ONNX_MAX_FILE_MB", 256
LINE_LIMIT_ENV, LINE_LIMIT_MB = "CP_ONNX_MAX_LINE_MB", 1


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


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of ``path``, refused past CP_ONNX_MAX_FILE_MB (FileNotFoundError passes through for the caller's hint)."""
    cap = limit(FILE_LIMIT_ENV, FILE_LIMIT_MB)
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


def read_text(path: Path, what: str, *, encoding: str = "utf-8") -> str:
    """The text of ``path`` (size-limited), or a one-line error when it is not text in ``encoding``."""
    try:
        return read_bytes(path, what).decode(encoding)
    except UnicodeDecodeError:
        raise CpOnnxError(f"{path} is not UTF-8 text; save it with UTF-8 encoding") from None


def check_lines(lines: list[str], path: Path, what: str) -> list[str]:
    """``lines``, refused if one is longer than CP_ONNX_MAX_LINE_MB (characters, which UTF-8 can only make longer)."""
    cap = limit(LINE_LIMIT_ENV, LINE_LIMIT_MB)
    for number, line in enumerate(lines, start=1):
        if len(line) > cap:
            raise CpOnnxError(f"line {number} of the {what} {path} is longer than {cap / 1e6:g} MB; split it, or raise the limit "
                              f"with {LINE_LIMIT_ENV}=N")
    return lines
