"""cp-onnx's own walk over a GGUF file's header, run before transformers or the gguf package reads the file.

The gguf package's reader (which transformers uses) trusts the header: a count of key-value pairs or
tensors larger than the file, or a key length of 2**60, makes it index past the end of its memory map
(IndexError); nested arrays make it recurse; every array item becomes an object of its own. This walk
reads the header field by field from a memory map and checks each count, length, type, dimension and
offset against the bytes left in the file before reading what it declares, so a damaged or hostile
file ends in one ExportError and nothing else has opened it.

Layout (little- or big-endian; versions 2 and 3): magic ``GGUF``, version u32, tensor count u64,
key-value count u64; each key-value pair: key (u64 length, then UTF-8), value type u32, value (an array
is item type u32, count u64, then the items); each tensor info: name, dimension count u32, dims u64 each,
ggml type u32, offset u64 from the data section, which starts at the first multiple of
``general.alignment`` (default 32) after the tensor infos.

Beyond the layout, what the model loader would allocate from the metadata is checked against the
tensors the file holds: ``{arch}.block_count`` must be the number of blocks its tensors name, and the
parameters the metadata's sizes imply may not exceed those of its tensors by more than DECLARED_SLACK
(transformers initialises every weight the file lacks, so a 1 MB file declaring a billion-parameter
model would otherwise be allocated).
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what the gguf package reads (version 1 counted in u32 and is long gone)
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most four dimensions
# The format allows arrays of arrays; no model file uses them, and the gguf reader recurses once per level.
MAX_ARRAY_NESTING = 4
# Array items over all metadata values. The gguf reader keeps one object per item (a few hundred bytes); real
# vocabularies hold 50k-260k tokens, with scores, types and merges about 1M items in all.
MAX_METADATA_ITEMS = 4_000_000
DEFAULT_ALIGNMENT = 32
# Parameters the metadata's sizes imply, at most this many times those of the file's tensors (real files: 1 to 2,
# from grouped-query attention and tied embeddings, which the estimate counts as full and untied).
DECLARED_SLACK = 4
HINT = "the file is damaged or not a model: download or convert the GGUF again"

STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value (an empty key is allowed)
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dim, type, offset
_BLOCK = re.compile(r"(?:^|\.)blk\.(\d+)\.")


@dataclass(frozen=True)
class ArrayValue:
    """An array's item type and length (its items are walked, not kept)."""

    item_type: int
    count: int


@dataclass
class Header:
    """What the walk found: the version, the metadata (arrays as ArrayValue) and each tensor's dims and type."""

    version: int
    metadata: dict[str, object] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


class _Cursor:
    """Reads from the memory map, refusing before any read that would pass the end of the file."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.at, self.order = data, path, 0, "<"

    def left(self) -> int:
        return len(self.data) - self.at

    def need(self, size: int, what: str) -> None:
        if size > self.left():
            raise bad(self.path, f"{what} needs {size:,} bytes at offset {self.at:,}, but the file has {self.left():,} left")

    def number(self, code: str, what: str):
        size = struct.calcsize(code)
        self.need(size, what)
        value = struct.unpack_from(self.order + code, self.data, self.at)[0]
        self.at += size
        return value

    def skip(self, size: int, what: str) -> None:
        self.need(size, what)
        self.at += size

    def string(self, what: str) -> bytes:
        length = self.number("Q", f"the length of {what}")
        self.need(length, what)
        self.at += length
        return self.data[self.at - length : self.at]

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(self.path, f"{what} is not UTF-8 text") from None


def bad(path: Path, what: str) -> ExportError:
    return ExportError(f"{path} is not a usable GGUF file: {what}; {HINT}")


def read_header(path: str | Path) -> Header:
    """Walk the header of the GGUF at ``path``; ExportError naming the first thing that does not fit the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                raise bad(path, "it is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Cursor(data, path))
    except OSError as exc:
        raise ExportError(f"cannot read {path} ({exc.strerror or exc}); check the file and its permissions") from None


def _walk(cursor: _Cursor) -> Header:
    path = cursor.path
    magic = bytes(cursor.data[:4])
    if magic != MAGIC:
        raise ExportError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); give a .gguf model file")
    cursor.at = 4
    version = cursor.number("I", "the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine: every number is byte-swapped
        cursor.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in VERSIONS:
        raise bad(path, f"it is GGUF version {version}, and versions {' and '.join(map(str, VERSIONS))} are read")
    tensor_count = cursor.number("Q", "the tensor count")
    kv_count = cursor.number("Q", "the key-value count")
    for count, least, what in ((kv_count, _MIN_KV, "key-value pairs"), (tensor_count, _MIN_TENSOR, "tensors")):
        if count * least > cursor.left():
            raise bad(path, f"its header declares {count:,} {what}, more than the {cursor.left():,} bytes after it can hold")
    header, items = Header(version), [0]
    for k in range(kv_count):
        key = cursor.text(f"key {k + 1}")
        if key in header.metadata:
            raise bad(path, f"the key {key[:80]!r} appears twice")
        kind = cursor.number("I", f"the type of {key[:80]!r}")
        if key == "general.alignment" and kind != 4:  # the gguf reader takes it as u32 only
            raise bad(path, f"general.alignment has value type {kind}, not 4 (u32)")
        header.metadata[key] = _value(cursor, kind, key[:80], items, 0)
    infos = [_tensor_info(cursor, t, header) for t in range(tensor_count)]
    _check_data(cursor, header, infos)
    _check_metadata(path, header)
    return header


def _value(cursor: _Cursor, kind: int, key: str, items: list[int], depth: int):
    """One value of type ``kind``: a number, a string, or an ArrayValue whose items were walked."""
    if kind in _SCALARS:
        return cursor.number(_SCALARS[kind], f"the value of {key!r}")
    if kind == STRING:
        return cursor.text(f"the value of {key!r}")
    if kind != ARRAY:
        raise bad(cursor.path, f"{key!r} has value type {kind}, which GGUF does not define")
    if depth >= MAX_ARRAY_NESTING:
        raise bad(cursor.path, f"{key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
    item_type = cursor.number("I", f"the item type of {key!r}")
    if item_type not in _SCALARS and item_type not in (STRING, ARRAY):
        raise bad(cursor.path, f"{key!r} is an array of type {item_type}, which GGUF does not define")
    count = cursor.number("Q", f"the length of {key!r}")
    least = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8 if item_type == STRING else 12  # a string's length, an array's type and length
    if count * least > cursor.left():
        raise bad(cursor.path, f"{key!r} declares {count:,} items, more than the {cursor.left():,} bytes left can hold")
    items[0] += count
    if items[0] > MAX_METADATA_ITEMS:
        raise bad(cursor.path, f"its metadata arrays hold more than {MAX_METADATA_ITEMS:,} items")
    if item_type in _SCALARS:
        cursor.skip(count * least, f"the items of {key!r}")
    else:
        for _ in range(count):
            if item_type == STRING:
                cursor.skip(cursor.number("Q", f"an item length of {key!r}"), f"an item of {key!r}")
            else:
                _value(cursor, ARRAY, key, items, depth + 1)
    return ArrayValue(item_type, count)


def _tensor_info(cursor: _Cursor, index: int, header: Header) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dims, ggml type, offset) of tensor ``index``."""
    name = cursor.text(f"the name of tensor {index}")
    where = f"tensor {name[:80]!r}"
    if name in header.tensors:
        raise bad(cursor.path, f"{where} appears twice")
    n_dims = cursor.number("I", f"the dimension count of {where}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise bad(cursor.path, f"{where} has {n_dims} dimensions, and ggml tensors have 1 to {MAX_DIMS}")
    dims = tuple(cursor.number("Q", f"a dimension of {where}") for _ in range(n_dims))
    kind = cursor.number("I", f"the type of {where}")
    offset = cursor.number("Q", f"the offset of {where}")
    header.tensors[name] = (dims, kind)
    return name, dims, kind, offset


def _check_data(cursor: _Cursor, header: Header, infos: list) -> None:
    """Alignment, then every tensor's bytes (by its type's block size) inside the data section, at an aligned offset."""
    path = cursor.path
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise bad(path, f"general.alignment is {alignment!r}, not a power of two")
    start = -(-cursor.at // alignment) * alignment
    size = len(cursor.data) - start
    sizes = _quant_sizes()
    for name, dims, kind, offset in infos:
        where = f"tensor {name[:80]!r}"
        if kind not in sizes:
            raise bad(path, f"{where} has ggml type {kind}, which the gguf package does not know")
        block, type_size = sizes[kind]
        if min(dims) < 1 or dims[0] % block:
            raise bad(path, f"{where} has dims {list(dims)}; each must be at least 1, the first a multiple of {block} for its type")
        nbytes = math.prod(dims) // block * type_size
        if offset % alignment or offset + nbytes > size:
            raise bad(path, f"{where} declares {nbytes:,} bytes at offset {offset:,} of the data section, which holds "
                            f"{max(size, 0):,} bytes (aligned to {alignment})")


def _check_metadata(path: Path, header: Header) -> None:
    """The architecture named, and the model its sizes declare no larger than what the tensors hold."""
    architecture = header.metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        found = "no general.architecture key" if architecture is None else "a general.architecture that is not text"
        raise bad(path, f"it has {found} (the model family, such as llama)")
    declared = header.metadata.get(f"{architecture}.block_count")
    if declared is not None:
        blocks = {int(m.group(1)) for name in header.tensors if (m := _BLOCK.search(name))}
        if not _is_count(declared) or len(blocks) != declared or blocks != set(range(len(blocks))):
            listed = ", ".join(map(str, sorted(blocks)[:6])) + (", ..." if len(blocks) > 6 else "") if blocks else "none"
            raise bad(path, f"{architecture}.block_count is {_shown(declared)}, but its tensors belong to {len(blocks)} blocks ({listed})")
    held = sum(math.prod(dims) for dims, _ in header.tensors.values())
    implied = declared_parameters(header)
    if implied > DECLARED_SLACK * held + (1 << 20):
        raise bad(path, f"its metadata declares a model of about {implied:,} parameters, and its tensors hold {held:,}")


def declared_parameters(header: Header) -> int:
    """Parameters the metadata's sizes imply, counted generously: embeddings and output untied, full attention
    (4 hidden x hidden), a gated MLP (3 hidden x feed-forward) per expert, in every block."""
    prefix = header.metadata["general.architecture"] + "."

    def size(key: str) -> int:
        value = header.metadata.get(prefix + key)
        if isinstance(value, ArrayValue):  # per-layer sizes (OpenELM): their largest is not known without reading them
            return 0
        return value if _is_count(value) else 0

    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = max(size("vocab_size"), tokens.count if isinstance(tokens, ArrayValue) else 0)
    hidden, mlp = size("embedding_length"), size("feed_forward_length")
    return 2 * vocab * hidden + size("block_count") * (4 * hidden * hidden + 3 * hidden * mlp * max(size("expert_count"), 1))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value) -> str:
    return f"an array of {value.count:,} items" if isinstance(value, ArrayValue) else repr(value)[:40]


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (block size in elements, bytes per block), as the gguf package knows them."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        raise ExportError("reading a GGUF file needs the gguf package; install cp-onnx with the export extra: pip install 'cp-onnx[export]'") from None
    return {int(kind): sizes for kind, sizes in GGML_QUANT_SIZES.items()}
