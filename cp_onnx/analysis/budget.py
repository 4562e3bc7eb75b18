"""Memory an analysis will need, checked before the first batch runs.

The largest allocation of ``cp-onnx analyze`` is one batch's exposed activations: the residual stream
after every layer ([batch, seq, hidden] each), the attention patterns ([batch, heads, seq, seq] per
layer: quadratic in the text length) and the logits ([batch, seq, vocab]). A long enough text makes
that terabytes, which onnxruntime would try to allocate (and the out-of-memory killer would end). The
estimate uses the texts as tokenized, so a large --max-length over short texts costs nothing.

Available memory: $CP_ONNX_MEMORY_GB, else the system's MemAvailable (what may be used without swapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cp_onnx.errors import CpOnnxError
from cp_onnx.inputs import env_amount
from graph_passes.limits import gigabytes, physical_memory

MEMORY_ENV = "CP_ONNX_MEMORY_GB"
FLOAT = 4
# onnxruntime's working tensors inside one layer (scores before and after softmax, MLP activations) beside the outputs.
WORKING_FACTOR = 1.5


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    vocab: int


def available_memory() -> int:
    """Bytes this process may use: $CP_ONNX_MEMORY_GB, else MemAvailable, else the physical memory."""
    value = env_amount(MEMORY_ENV, "gigabytes")
    if value is not None:
        return int(value * 1e9)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def batch_bytes(shape: Shape, rows: int, length: int, *, patterns: bool = True) -> int:
    """Bytes of one batch of ``rows`` texts of ``length`` tokens: exposed activations, logits, working tensors."""
    stream = (shape.layers + 1) * rows * length * shape.hidden * FLOAT
    attention = shape.layers * rows * shape.heads * length * length * FLOAT if patterns else 0
    logits = rows * length * shape.vocab * FLOAT
    return int((stream + attention + logits) * WORKING_FACTOR)


def check_batches(shape: Shape, token_lists: Sequence[Sequence[int]], batch_size: int, *, patterns: bool = True) -> None:
    """CpOnnxError when the longest batch would not fit in memory, saying what it needs and what --max-length fits."""
    if not token_lists:
        return
    rows, length = min(batch_size, len(token_lists)), max(len(t) for t in token_lists)
    need, have = batch_bytes(shape, rows, length, patterns=patterns), available_memory()
    if need <= have:
        return
    low, high = 0, length  # the longest length that fits, by bisection (the need grows with the length)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if batch_bytes(shape, rows, middle, patterns=patterns) <= have else (low, middle - 1)
    fits = f"--max-length {low} fits" if low else "no text length fits: lower --batch-size"
    raise CpOnnxError(
        f"texts of {length} tokens in batches of {rows} need about {gigabytes(need)} of memory ({shape.layers} layers, hidden "
        f"{shape.hidden}, {shape.heads} heads, vocabulary {shape.vocab}), and {gigabytes(have)} is available; {fits} "
        f"(or lower --batch-size; ${MEMORY_ENV} sets the memory to plan for)")


def model_shape(model, layer_map) -> Shape:
    """The sizes that set an analysis's memory: from the manifest, else the discovered graph, else the tokenizer."""
    manifest = model.manifest or {}

    def size(key: str, found) -> int:
        value = manifest.get(key) if isinstance(manifest.get(key), int) else found
        return max(int(value or 1), 1)

    vocab = manifest.get("vocab_size") if isinstance(manifest.get("vocab_size"), int) else model.tokenizer.get_vocab_size()
    return Shape(layer_map.num_layers, size("hidden_size", layer_map.hidden_size), size("num_heads", layer_map.num_heads), max(int(vocab), 1))
