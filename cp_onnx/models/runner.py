"""onnxruntime on the CPU: tokenized batches in, named numpy activations out."""
from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import graph_passes
from cp_onnx.errors import CpOnnxError
from graph_passes.deployed import cache_dims
from graph_passes.graph_utils import PAST

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


class SharedWeights:
    """The big weights of one model, by name, and the onnxruntime values that wrap them without a copy.

    Every session over the model (the full graph, its segments, its head, a routed copy) is given these
    same buffers, so a process holds each weight once however many sessions read it.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], folder: Path | None = None):
        self.arrays = dict(arrays)
        self.folder = folder  # where the stubs' external data lies (None: stubs made in memory, see _detach)
        self._values: dict[str, ort.OrtValue] = {}

    def values(self, names: Iterable[str]) -> tuple[list[str], list[ort.OrtValue]]:
        """The given weights as OrtValues (made once; onnxruntime reads the numpy buffer in place)."""
        names = [n for n in names if n in self.arrays]
        for name in names:
            if name not in self._values:
                self._values[name] = ort.OrtValue.ortvalue_from_numpy(self.arrays[name])
        return names, [self._values[n] for n in names]

    def release(self, names: Iterable[str]) -> None:
        """Drop the resident pages of these mapped weights (the kernel reads them again from the file if used).

        After a session has prepacked quantized weights into its own buffers it no longer reads the
        originals, but the pages it read while packing would stay resident, counted once more."""
        for name in names:
            mapping = getattr(self.arrays.get(name), "_mmap", None)
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)


_OPENED: "weakref.WeakValueDictionary[tuple, _Opened]" = weakref.WeakValueDictionary()


class _Opened(SharedWeights):
    def __init__(self, graph: bytes, arrays: Mapping[str, np.ndarray], folder: Path):
        super().__init__(arrays, folder)
        self.graph = graph


def open_graph(path: str | Path) -> tuple[onnx.ModelProto, SharedWeights]:
    """A fresh copy of the graph at ``path`` (weights as stubs), and the process's one mapping of its weights.

    The mapping lives as long as a session or caller holds it; a second call meanwhile maps nothing new."""
    path = Path(path).resolve()
    try:
        status = path.stat()
    except OSError:
        raise CpOnnxError(f"no ONNX model at {path}; give the path of a model.onnx file") from None
    key = (str(path), status.st_mtime_ns, status.st_size)
    opened = _OPENED.get(key)
    if opened is None:
        try:
            light, arrays = graph_passes.mapped.load_mapped(path)
        except graph_passes.GraphPassError as exc:
            raise CpOnnxError(str(exc)) from exc
        opened = _Opened(light.SerializeToString(), arrays, path.parent)
        _OPENED[key] = opened
    return onnx.ModelProto.FromString(opened.graph), opened


def _detach(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` with its big in-memory initializers as stubs, and their values (copied out of the proto).

    For graphs built in memory; models on disk are opened with ``open_graph``, which copies nothing.
    Initializers numpy cannot hold as they are (bfloat16, ...) stay inline."""
    stubs, arrays = [], {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and graph_passes.graph_io.tensor_nbytes(tensor) >= graph_passes.graph_io.EXTERNAL_MIN_BYTES:
            array = numpy_helper.to_array(tensor)
            if array.dtype.type.__module__ == "numpy":
                arrays[tensor.name] = array
                stubs.append(graph_passes.graph_io.external_stub(tensor, "in-memory", 0, array.nbytes))
                continue
        stubs.append(tensor)
    if not arrays:
        return model, {}
    return graph_passes.graph_io.with_initializers(model, stubs), arrays


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Tensor names that the graph's nodes (subgraphs included) or outputs read."""
    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                names |= _names_read(subgraph)
    return names


# Ops whose weights onnxruntime must prepack to run fast (packing 4-bit blocks per call costs more than it saves).
_PREPACK_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat"})


def session_options(threads: int | None, *, shared_arena: bool = False, spinning: bool = True,
                    prepack: bool = False) -> ort.SessionOptions:
    """CPU session settings shared by every session cp-onnx makes.

    No memory arena of its own: an arena keeps as much memory as the session's largest call ever
    needed, for as long as the session lives. ``shared_arena``: the process's one arena, which every
    session so made allocates from (segment models run in turn, so one call's working memory serves
    them all). No prepacking of float weights: a packed weight is a second copy, per session, of a
    buffer every session shares; MLAS packs panels of it per call instead, which costs little when a
    call has many tokens."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0 lets onnxruntime use every core
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    options.enable_cpu_mem_arena = shared_arena
    if shared_arena:
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


_SHARED_ARENA: list[bool] = []


def _register_shared_arena() -> None:
    """Register the process's shared CPU arena once. Without an arena every intermediate tensor is a fresh
    allocation whose pages the kernel faults in and zeroes again: a layer of Qwen2.5-1.5B's shapes on 1,024
    tokens ran 14% slower so, and one arena per segment session held 4.8 GB more at peak than this one."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max memory: unbounded; extend by what is requested (not the next power of two); default chunk settings
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _SHARED_ARENA.append(True)


def make_session(model: onnx.ModelProto, weights: SharedWeights | None, threads: int | None, *,
                 shared_arena: bool = False, spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session over ``model``, whose stubbed weights come from ``weights`` (shared, not copied).

    Big weights still inline in ``model`` (graphs built in memory) are moved out of the proto first, so
    the serialised graph stays small. The session keeps what it reads (``session.cp_onnx_weights``)."""
    try:
        graph_passes.limits.check_graph(model.graph)  # onnxruntime allocates what a graph declares, however absurd
    except graph_passes.GraphPassError as exc:
        raise CpOnnxError(str(exc)) from None
    model, inline = _detach(model)
    sources = [s for s in (weights, SharedWeights(inline) if inline else None) if s is not None]
    used = _names_read(model.graph)  # onnxruntime drops unread initializers before it looks for supplied ones
    prepack = any(node.op_type in _PREPACK_OPS for node in model.graph.node)
    options = session_options(threads, shared_arena=shared_arena, spinning=spinning, prepack=prepack)
    for source in sources:
        names, values = source.values(name for name in source.arrays if name in used)
        if source.folder is None:  # stubs of a graph built in memory: onnxruntime copies these values
            if names:
                options.add_external_initializers(names, values)
            continue
        # add_initializer has onnxruntime use the buffer in place (add_external_initializers copies it); it
        # still checks that the stubs' data files exist, so it is told where they are.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(source.folder))
        for name, value in zip(names, values):
            options.add_initializer(name, value)
    tmpdir = None
    try:
        payload = model.SerializeToString()
    except ValueError:  # over protobuf's 2 GB even without the big weights (huge Constant nodes)
        tmpdir = tempfile.TemporaryDirectory(prefix="cp-onnx-")
        payload = str(Path(tmpdir.name) / "model.onnx")
        onnx.save_model(model, payload, save_as_external_data=True, location="model.onnx.data")
    releasing = _ReleaseWhilePacking(sources, used) if prepack else contextlib.nullcontext()
    try:
        with releasing:
            session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad graph
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CpOnnxError(f"onnxruntime cannot load {model.graph.name or 'the model'}: {first_line}; re-export it with `cp-onnx export`") from exc
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    if prepack:
        for source in sources:
            source.release(used)
    session.cp_onnx_weights = sources  # the buffers onnxruntime reads in place live as long as the session
    return session


class _ReleaseWhilePacking(threading.Thread):
    """While a session packs quantized weights, drop the mapped pages it has read every RELEASE_EVERY seconds.

    It reads each original once, to pack it; without this every page it read stays resident until the
    session is built, beside the packed copies (3B int4 statistics: 5.6 GB peak). The mapping is read-only
    and file-backed, so a dropped page that is read again comes back from the page cache, unchanged."""

    RELEASE_EVERY = 0.1

    def __init__(self, sources: list, names: set[str]):
        super().__init__(daemon=True)
        self.sources, self.names, self.done = sources, names, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.RELEASE_EVERY):
            for source in self.sources:
                source.release(self.names)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


_STATE = ort.capi.onnxruntime_pybind11_state
_ORT_ERRORS = tuple(getattr(_STATE, name) for name in ("Fail", "InvalidArgument", "InvalidGraph", "RuntimeException", "NotImplemented",
                                                        "EPFail", "EngineError") if hasattr(_STATE, name))


def run_session(session: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run``, with onnxruntime's failures (a graph that loads but cannot run these inputs) as one-line errors."""
    try:
        return session.run(names, feeds)
    except _ORT_ERRORS as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CpOnnxError(f"onnxruntime cannot run the model: {lines[0] if lines else type(exc).__name__}; "
                          "re-export it with `cp-onnx export`") from exc


def segment_session(model: onnx.ModelProto, weights: SharedWeights | None, threads: int | None) -> ort.InferenceSession:
    """A session for one of thirty-odd segment models run in turn (sweep, perturbation, prediction): no spinning
    threads (idle pools would spin against the session at work), and the process's shared arena."""
    return make_session(model, weights, threads, shared_arena=True, spinning=False)


class Runner:
    """One onnxruntime CPU session over a model file, or over a ModelProto whose stubbed weights ``weights`` holds.

    A path is opened with ``open_graph``: its weights are memory-mapped once per process and shared
    with every other session over the same file. A ModelProto with its weights inline works too.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, *, threads: int | None = None, weights: SharedWeights | None = None):
        if not isinstance(model, onnx.ModelProto):
            model, weights = open_graph(model)
        self.session = make_session(model, weights, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_dims = _symbolic_cache_dims(self.session, model)

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
        return dict(zip(names, run_session(self.session, names, self.feeds(input_ids, attention_mask, extra))))

    def run_texts(self, token_lists: Sequence[Sequence[int]], *, batch_size: int = 8, outputs: Iterable[str] | None = None, side: str = "right") -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Run token lists in order, ``batch_size`` at a time; yields (outputs, attention_mask) per batch."""
        if side == "left" and not self.pads_left_safely:
            side = "right"  # without position_ids the graph counts pads as positions
        names = list(outputs) if outputs is not None else None
        for start in range(0, len(token_lists), batch_size):
            ids, mask = pad_batch(token_lists[start : start + batch_size], side=side)
            yield self.run(ids, mask, names), mask


def _symbolic_cache_dims(session: ort.InferenceSession, graph: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """KV-cache sizes the session's inputs leave symbolic, read from the graph (a genai build loaded from its file)."""
    symbolic = [i for i in session.get_inputs() if PAST.match(i.name) and not all(isinstance(d, int) for d in list(i.shape)[1::2])]
    return cache_dims(graph) if symbolic else {}


def default_threads() -> int:
    """Threads for onnxruntime: CP_ONNX_THREADS, or every core."""
    value = os.environ.get("CP_ONNX_THREADS")
    return int(value) if value else (os.cpu_count() or 1)
