"""The genai graph format: onnxruntime-genai's model builder run on a Hugging Face folder.

The builder runs in a subprocess (``python -m onnxruntime_genai.models.builder``) so that its imports
(torch, transformers, its own onnxruntime wrapper) stay out of this process, with the hub switched off.
Its graph fuses each layer (packed qkv, GroupQueryAttention with the KV cache inside, SkipSimplified
LayerNormalization) and always takes ``past_key_values`` inputs; see FACTS.md, "Deployed graph formats".
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .errors import ExportError
from .graph_files import move_graph
from .quantize import quantize_graph

GRAPH_FORMATS = ("optimum", "genai")
DEFAULT_GRAPH_FORMAT = "optimum"
INSTALL_HINT = "pip install onnxruntime-genai==0.15.2"  # the newest whose builder imports with transformers 4.57
BUILDER_MODULE = "onnxruntime_genai.models.builder"
KEPT_FILES = ("genai_config.json",)  # lets onnxruntime-genai's own runtime load the exported folder too
SCRATCH = "_genai"  # scratch sub-folders of the staging folder (pipeline.SCRATCH_PREFIX), removed before the rename


def check_graph_format(graph_format: str) -> str:
    """``graph_format`` if cp-onnx knows it, else a one-line ExportError."""
    if graph_format not in GRAPH_FORMATS:
        raise ExportError(f"unknown format {graph_format!r}; use one of {', '.join(GRAPH_FORMATS)}")
    return graph_format


def check_installed() -> None:
    """ExportError unless onnxruntime-genai can be found (without importing it)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ExportError(f"--format genai needs onnxruntime-genai, which is not installed; {INSTALL_HINT}")


def build_genai(hf_dir: Path, stage: Path, precision: str, family: str) -> dict:
    """Run the builder on ``hf_dir`` (which must hold tokenizer files) into ``stage``; return the manifest's "onnx" entry."""
    check_installed()
    out, cache = stage / SCRATCH, stage / f"{SCRATCH}_cache"
    # The builder runs at fp32 and cp-onnx quantizes its graph (exporters.quantize: the same MatMulNBits, blocks
    # of 32, symmetric, one weight in memory at a time). The builder's own int4 step serialises the whole float
    # model beside the torch model it loaded: two float32 copies, OOM-killed at 24 GB on a 3B model (measured).
    command = [sys.executable, "-m", BUILDER_MODULE, "-i", str(hf_dir), "-o", str(out), "-p", "fp32",
               "-e", "cpu", "-c", str(cache), "--extra_options", "hf_token=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=stage)
    produced = out / "model.onnx"
    if done.returncode != 0 or not produced.is_file():
        raise ExportError(f"onnxruntime-genai's builder failed on this {family} model ({last_error_line(done)}); "
                          f"run `python -m {BUILDER_MODULE} -i {hf_dir} -o OUT -p fp32 -e cpu` to see its output")
    for name in KEPT_FILES:
        if (out / name).is_file():
            os.replace(out / name, stage / name)
    rel, data = move_graph(produced, stage, "model.onnx")
    if precision != "fp32":
        rel, data = quantize_graph(stage, rel, precision)
    return {"model": rel, "with_past": None, "model_data": data, "with_past_data": None}


def last_error_line(done: subprocess.CompletedProcess) -> str:
    """The builder's last meaningful stderr line (its progress bars share the stream)."""
    lines = [line.strip() for line in (done.stderr or "").replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or [f"exit code {done.returncode}"])[-1])[:300]
