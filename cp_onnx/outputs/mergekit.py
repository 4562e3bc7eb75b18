"""mergekit passthrough configs: a layer path as the self-merge YAML that builds it from the Hugging Face checkpoint
(``mergekit-yaml CONFIG.yml OUT``), and a user's self-merge config read back as a layer path.

A passthrough config lists slices; each slice takes the layers ``layer_range: [a, b]`` (b exclusive) of one model,
and the merged model runs the slices' layers one after another. A layer path is such a list of runs, so each run of
consecutive ascending layers becomes one slice. Configs are untrusted input: read with PyYAML's safe loader, bounded
in size, nesting and node count, anchors refused, and every problem reported in one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from cp_onnx.errors import CpOnnxError
from cp_onnx.files import write_text
from graph_passes.edit import Edit
from graph_passes.errors import GraphPassError
from graph_passes.layer_path import check_path, format_path

SUFFIXES = (".yml", ".yaml")
MAX_BYTES = 256 * 1024  # a passthrough config of a 1,000-layer model is a few kB
MAX_DEPTH = 16
MAX_NODES = 50_000
DTYPES = ("float32", "bfloat16", "float16")


def is_config(spec) -> bool:
    """Whether a layer-path argument names a mergekit YAML file rather than a path or a block."""
    return isinstance(spec, (str, Path)) and Path(str(spec)).suffix.lower() in SUFFIXES


def read_edit(spec, num_layers: int) -> Edit:
    """The edit a user gives to apply or evaluate: an ``Edit``, its text (``I:J``, ``skip:I:J``, ``0..14,12..14,15..29``,
    ...: ``Edit.parse``), a list of layers, or a mergekit passthrough config file; checked against ``num_layers``."""
    if isinstance(spec, Edit):
        edit = spec
    elif is_config(spec):
        edit = Edit.layers(read_config(Path(str(spec)), num_layers))
    elif isinstance(spec, str):
        edit = Edit.parse(spec.strip().strip("'\""))
    else:
        edit = Edit.layers(check_path(spec, num_layers))
    try:
        edit.check(num_layers)
    except GraphPassError as exc:
        raise CpOnnxError(str(exc)) from None
    return edit


def slices(layers: Sequence[int]) -> list[tuple[int, int]]:
    """The path as passthrough slices: each run of consecutive ascending layers, as ``(first, last + 1)``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([layer, layer + 1])
    return [(first, end) for first, end in runs]


def config_text(layers: Sequence[int], model: str, *, dtype: str = "bfloat16") -> str:
    """The passthrough YAML that runs ``model``'s layers along ``layers``."""
    if dtype not in DTYPES:
        raise CpOnnxError(f"mergekit dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    name = json.dumps(str(model))  # a JSON string is a valid YAML scalar, whatever the name holds
    lines = [f"# cp-onnx: layer path {format_path(layers)} ({len(layers)} layers) as a mergekit self-merge.",
             "# Build it with: mergekit-yaml THIS_FILE.yml OUT_FOLDER   (layer_range ends are exclusive)", "slices:"]
    for first, end in slices(layers):
        lines += ["  - sources:", f"      - model: {name}", f"        layer_range: [{first}, {end}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def write_config(layers: Sequence[int], model: str, out: Path, *, dtype: str = "bfloat16") -> Path:
    out = Path(out).expanduser()
    if not is_config(out):
        raise CpOnnxError(f"{out} does not end in .yml or .yaml; name the mergekit config to write OUT.yml")
    return write_text(out, config_text(layers, model, dtype=dtype))


def read_config(path: Path, num_layers: int | None = None) -> list[int]:
    """The layer path of a mergekit passthrough config of one model (slices of ``layer_range``, ends exclusive)."""
    data = _load(path)
    where = f"mergekit config {path}"
    if not isinstance(data, dict):
        raise CpOnnxError(f"{where} is not a mapping with slices and merge_method; write it like mergekit's passthrough examples")
    method = data.get("merge_method")
    if method != "passthrough":
        raise CpOnnxError(f"{where} has merge_method {method!r}; only passthrough configs (layers stacked as they are) are layer paths")
    if "parameters" in data:
        raise CpOnnxError(f"{where} sets parameters (weight scales), which a layer path cannot express; remove them to use its layers")
    entries = data.get("slices")
    if not isinstance(entries, list) or not entries:
        raise CpOnnxError(f"{where} has no slices list; a self-merge lists slices with sources and layer_range")
    path: list[int] = []
    models = set()
    for number, entry in enumerate(entries, 1):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
            raise CpOnnxError(f"{where}: slice {number} needs exactly one source (passthrough takes each slice from one model)")
        source = sources[0]
        if "parameters" in entry or "parameters" in source:
            raise CpOnnxError(f"{where}: slice {number} sets parameters (weight scales), which a layer path cannot express; remove them")
        models.add(json.dumps(source.get("model"), sort_keys=True, default=str))
        first, end = _layer_range(source.get("layer_range"), f"{where}: slice {number}", num_layers)
        path.extend(range(first, end))
    if len(models) > 1:
        raise CpOnnxError(f"{where} takes layers from {len(models)} different models; a layer path routes one model's layers")
    return path


def _layer_range(value, where: str, num_layers: int | None) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise CpOnnxError(f"{where} has layer_range {value!r}; give [first, end] with 0 <= first < end (end exclusive)")
    if num_layers is not None and value[1] > num_layers:
        raise CpOnnxError(f"{where} has layer_range {value!r} but the model has {num_layers} layers (ranges end at {num_layers} at most)")
    return value[0], value[1]


def _load(path: Path):
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CpOnnxError(f"cannot read the mergekit config {path} ({exc.strerror}); give an existing .yml file") from None
    if size > MAX_BYTES:
        raise CpOnnxError(f"the mergekit config {path} is {size} bytes, more than a passthrough config needs ({MAX_BYTES}); check the file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CpOnnxError(f"cannot read the mergekit config {path} ({type(exc).__name__}); save it as UTF-8 text") from None

    class Loader(yaml.SafeLoader):
        """The safe loader, refusing anchors and bounding nesting and size before anything is built."""

        depth = nodes = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise CpOnnxError(f"the mergekit config {path} uses a YAML alias (*name); write the values out")
            self.depth, self.nodes = self.depth + 1, self.nodes + 1
            if self.depth > MAX_DEPTH or self.nodes > MAX_NODES:
                raise CpOnnxError(f"the mergekit config {path} is nested deeper or holds more values than a passthrough config does; check the file")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise CpOnnxError(f"the mergekit config {path} is not valid YAML ({problem}{where})") from None
