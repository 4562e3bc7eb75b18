"""Process settings held for the duration of an export: hub offline, quiet transformers. Restored afterwards."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Module attributes that hold the hub's offline switch once imported (they read the environment only at import).
OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode"))
TRUE_VALUES = ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration; restore (or unset) them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration, also in hub modules imported before; restored afterwards."""
    saved = {flag: getattr(sys.modules.get(flag[0]), flag[1], None) for flag in OFFLINE_FLAGS}
    outside = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in TRUE_VALUES
    try:
        with scoped_env(HF_HUB_OFFLINE="1"):
            set_offline_flags({flag: True for flag in OFFLINE_FLAGS})
            yield
    finally:
        # modules first imported inside the block read "1": give them what they would have read outside it
        set_offline_flags({flag: outside if value is None else value for flag, value in saved.items()})


def set_offline_flags(values: dict[tuple[str, str], bool]) -> None:
    """Set the offline switch of each hub module already imported."""
    for (module_name, attribute), value in values.items():
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            setattr(module, attribute, value)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Only errors from transformers' logger and no progress bars for the duration (export() logs progress)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
