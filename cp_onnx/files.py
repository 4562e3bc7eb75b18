"""Every file cp_onnx writes goes through here: a temporary name in the same folder, renamed when complete,
so a reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from cp_onnx.errors import CpOnnxError


def _default_mode() -> int:
    """What a plain open() would give: 0666 less the umask (mkstemp alone gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_real_folder(folder: str | Path, what: str = "output folder") -> None:
    """Refuse an output folder that is a symbolic link: writing through it would land wherever it points."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CpOnnxError(f"the {what} {folder} is a symbolic link (to {os.readlink(folder)}); give the real folder instead")


@contextlib.contextmanager
def atomic_open(path: str | Path, *, binary: bool = False, mode: int | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    check_real_folder(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CpOnnxError(f"cannot write to {path.parent} ({exc.strerror}); choose another output folder") from None
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as out:
            yield out
        os.chmod(temp, _default_mode() if mode is None else mode)
        os.replace(temp, path)
    except BaseException as exc:
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk or a file-size limit: the previous file, if any, is untouched
            raise CpOnnxError(f"cannot write {path} ({exc.strerror or exc}); free space on that disk or choose another output folder") from None
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as out:
        out.write(text)
    return Path(path)


def write_json(data, path: str | Path) -> Path:
    """JSON with one space of indent; NaN is refused (report.py turns non-finite numbers into null first)."""
    return write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN/Inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
