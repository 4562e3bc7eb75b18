"""Whole folders written atomically: built under a temporary sibling name and renamed when complete."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import ExportError

STAGING_MARK = ".tmp-"  # staging folders are named ".{final name}.tmp-XXXX" next to their final place


def writable_parent(folder: Path, what: str, hint: str = "choose a writable folder") -> None:
    """Create ``folder``'s parent if needed and check a staging folder can be made there."""
    parent = Path(folder).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{Path(folder).name}{STAGING_MARK}probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise ExportError(f"cannot write the {what} {folder} ({err.strerror or err}); {hint}") from None


@contextlib.contextmanager
def staging_folder(final: Path, keep_existing: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield an empty sibling folder of ``final``; on success it replaces ``final``, on failure it is removed.

    ``keep_existing``: asked at the end; True keeps a ``final`` that appeared meanwhile (another process
    finished the same cache entry first: replacing it would pull it from under that process's reader)."""
    final = Path(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING_MARK}", dir=final.parent))
    try:
        yield staging
        if keep_existing is None or not keep_existing():
            replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, final: Path) -> None:
    """Move the complete folder ``new`` to ``final``, putting an existing ``final`` aside first."""
    if not final.exists():
        try:
            os.rename(new, final)
            return
        except OSError:
            if not final.exists():
                raise
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING_MARK}old-", dir=final.parent))
    os.rename(final, old / final.name)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete staging folders under ``root`` left by exports that were killed more than ``max_age_s`` ago."""
    for folder in Path(root).glob(f".*{STAGING_MARK}*"):
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)


def copy_folder(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` into the existing empty folder ``dst`` (plain copies: no shared inodes)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)


def sha256_files(paths: Sequence[Path], chunk: int = 1 << 22) -> str:
    """SHA-256 of the files' bytes concatenated in the given order (one file: its ordinary sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
