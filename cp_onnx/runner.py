"""onnxruntime on the CPU: tokenized batches in, named numpy activations out."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from cp_onnx.errors import CpOnnxError
from graph_passes import graph_io
from graph_passes.deployed import cache_dims
from graph_passes.route import PAST

# onnxruntime's element type names -> numpy dtypes, for zero-length KV caches.
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32, "tensor(double)": np.float64}


def pad_batch(token_lists: Sequence[Sequence[int]], *, side: str = "right", pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack token lists into ``input_ids`` and ``attention_mask`` arrays [batch, max_len]."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise CpOnnxError("cannot run an empty text: every text must tokenize to at least one token")
    if side not in ("left", "right"):
        raise CpOnnxError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), width), dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        span = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def position_ids_for(attention_mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only, so a left-padded text sees the positions it would alone."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)


def cache_feeds(inputs: Sequence[ort.NodeArg], rows: int, dims: Mapping[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Zero-length KV caches [rows, kv_heads, 0, head_dim] for the ``past_key_values.*`` inputs, typed as declared.

    A graph with fused attention (onnxruntime-genai's GroupQueryAttention) takes its cache inputs even
    for a whole text; ``dims`` (name -> (kv_heads, head_dim)) supplies the sizes a graph leaves symbolic."""
    feeds = {}
    for value in inputs:
        if not PAST.match(value.name):
            continue
        shape = list(value.shape)
        if len(shape) != 4:
            raise CpOnnxError(f"the KV-cache input {value.name} has shape {shape}, expected [batch, kv_heads, past, head_dim]; re-export the model")
        known = (dims or {}).get(value.name) or (None, None)
        sizes = [size if isinstance(size, int) else fallback for size, fallback in zip(shape[1::2], known)]
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            raise CpOnnxError(f"cannot tell the KV-cache size of {value.name} (shape {shape}); run graph_passes.discover on the graph first, it pins the sizes")
        feeds[value.name] = np.zeros((rows, sizes[0], 0, sizes[1]), dtype=_DTYPES.get(value.type, np.float32))
    return feeds


def detach_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` with its big initializers as stubs (``graph_io.weightless_copy``), and their values by name.

    Passes then work on a graph of a few MB, and onnxruntime takes the weights from memory
    (``Runner(light, weights=...)``) instead of serialising, parsing and copying hundreds of MB.
    Returns ``(model, {})`` if a weight has no plain numpy type (bfloat16, float8, ...).
    """
    light = graph_io.weightless_copy(model)
    weights = {}
    for original, stub in zip(model.graph.initializer, light.graph.initializer):
        if original.data_location != onnx.TensorProto.EXTERNAL and stub.data_location == onnx.TensorProto.EXTERNAL:
            array = numpy_helper.to_array(original)
            if array.dtype.type.__module__ != "numpy":  # ml_dtypes: onnxruntime cannot wrap it as it is
                return model, {}
            weights[original.name] = array
    return light, weights


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Tensor names that the graph's nodes (subgraphs included) or outputs read."""
    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                names |= _names_read(subgraph)
    return names


def session_options(threads: int | None) -> ort.SessionOptions:
    """CPU session settings shared by every session cp-onnx makes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0 lets onnxruntime use every core
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    return options


def segment_session(model: onnx.ModelProto, threads: int | None, *, arena: bool = False) -> ort.InferenceSession:
    """A session for one of thirty-odd segment models run in turn (sweep, perturbation): no memory arena
    unless asked (each session would keep an arena as large as its largest call: 10 GB against 2.4 GB on
    SmolLM2; the one head session takes it: its vocabulary-wide logits run 25% faster in it) and no
    spinning threads (idle pools would spin against the session at work)."""
    options = session_options(threads)
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise CpOnnxError(f"onnxruntime cannot load segment {model.graph.name}: {str(exc).strip().splitlines()[0]}; re-export the model") from exc


class Runner:
    """One onnxruntime CPU session over a model file or an in-memory ModelProto.

    ``weights`` supplies initializers that the model holds as stubs (see ``detach_weights``); a
    ModelProto with its weights inline is detached here rather than serialised whole.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, *, threads: int | None = None, weights: Mapping[str, np.ndarray] | None = None):
        options = session_options(threads)
        source = model
        self._tmpdir = None
        weights = dict(weights or {})
        if isinstance(model, onnx.ModelProto):
            model, detached = detach_weights(model)
            # onnxruntime drops initializers nothing reads before it looks for the ones supplied here.
            used = _names_read(model.graph)
            weights = {name: value for name, value in {**weights, **detached}.items() if name in used}
            model = self._as_loadable(model)
        # onnxruntime reads these buffers for as long as the session lives, so the session keeps them.
        self._weights = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in weights.values()]
        if weights:
            options.add_external_initializers(list(weights), self._weights)
        try:
            self.session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CpOnnxError(f"onnxruntime cannot load the model: {first_line}; re-export it with `cp-onnx export`") from exc
        self.session.cp_onnx_weights = self._weights  # callers may keep only the session (sweep, perturbation)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_dims = _symbolic_cache_dims(self.session, source)

    def _as_loadable(self, model: onnx.ModelProto) -> bytes | Path:
        try:
            return model.SerializeToString()
        except ValueError:  # over protobuf's 2 GB even without the big weights (huge Constant nodes)
            pass
        # Too big for bytes: onnxruntime needs a file, with the weights as external data beside it.
        self._tmpdir = tempfile.TemporaryDirectory(prefix="cp-onnx-")
        path = Path(self._tmpdir.name) / "model.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return path

    @property
    def pads_left_safely(self) -> bool:
        """Left padding keeps results equal to unpadded runs only if positions can be supplied (fused attention
        that reads sequence lengths from the mask, like GroupQueryAttention, assumes the pads on the right)."""
        return "position_ids" in self.input_names

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The graph inputs for a padded batch: position_ids and token_type_ids where the graph takes them,
        an empty KV cache where the graph takes one (onnxruntime-genai builds), plus ``extra`` inputs a
        rewritten graph added (perturbation deltas, ...)."""
        feeds = {**cache_feeds(self.session.get_inputs(), len(input_ids), self.cache_dims), "input_ids": input_ids,
                 "attention_mask": attention_mask, **(extra or {})}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = position_ids_for(attention_mask)
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise CpOnnxError(
                f"the model needs inputs {', '.join(missing)} that a plain text batch cannot supply; "
                "export it without KV cache (cp-onnx export, the default)"
            )
        return feeds

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: Iterable[str] | None = None, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run one padded batch; returns the requested graph outputs (all of them by default) by name."""
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise CpOnnxError(f"the model has no output named {unknown[0]!r}; expose it first (graph_passes.expose)")
        values = self.session.run(names, self.feeds(input_ids, attention_mask, extra))
        return dict(zip(names, values))

    def run_texts(self, token_lists: Sequence[Sequence[int]], *, batch_size: int = 8, outputs: Iterable[str] | None = None, side: str = "right") -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Run token lists in order, ``batch_size`` at a time; yields (outputs, attention_mask) per batch."""
        if side == "left" and not self.pads_left_safely:
            side = "right"  # without position_ids the graph counts pads as positions
        names = list(outputs) if outputs is not None else None
        for start in range(0, len(token_lists), batch_size):
            ids, mask = pad_batch(token_lists[start : start + batch_size], side=side)
            yield self.run(ids, mask, names), mask


def _symbolic_cache_dims(session: ort.InferenceSession, source) -> dict[str, tuple[int, int]]:
    """KV-cache sizes the session's inputs leave symbolic, read from the graph (a genai build loaded from its file)."""
    symbolic = [i for i in session.get_inputs() if PAST.match(i.name) and not all(isinstance(d, int) for d in list(i.shape)[1::2])]
    if not symbolic:
        return {}
    graph = source if isinstance(source, onnx.ModelProto) else graph_io.load(source, weights=False)
    return cache_dims(graph)


def default_threads() -> int:
    """Threads for onnxruntime: CP_ONNX_THREADS, or every core."""
    value = os.environ.get("CP_ONNX_THREADS")
    return int(value) if value else (os.cpu_count() or 1)
