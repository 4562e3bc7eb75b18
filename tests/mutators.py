"""Seeded mutators of every input kind the fuzzer feeds cp-onnx: ONNX graphs, JSON (reports, sweep lines, manifests,
tokenizer.json), text and JSONL files (calibration texts and questions, probe suites), TOML batch manifests, GGUF
files. Each returns the damaged input and a short name of what it did (the tallies' examples name it)."""
from __future__ import annotations

import json
import math
import random

import onnx

from support import Place, get, put

def mutate_model(model: onnx.ModelProto, rng: random.Random) -> tuple[onnx.ModelProto | bytes, str]:
    """One structural mutation of a copy of ``model`` (or the serialized bytes, damaged), and its description."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, how = model.graph, rng.choice(MODEL_MUTATIONS)
    nodes, inits = graph.node, graph.initializer
    if how == "dims":
        tensor = rng.choice(inits)
        dims = list(tensor.dims) or [1]
        dims[rng.randrange(len(dims))] = rng.choice([0, -1, 2, 3, 1 << 20, 1 << 40, 7])
        del tensor.dims[:]
        tensor.dims.extend(rng.choice([dims, dims[:-1], dims + [1]]))
    elif how == "dtype":
        rng.choice(inits).data_type = rng.choice([t for t in range(0, 26) if t != onnx.TensorProto.FLOAT])
    elif how == "attribute":
        node = rng.choice([n for n in nodes if n.attribute])
        attribute = rng.choice(node.attribute)
        if rng.random() < 0.25:
            node.attribute.remove(attribute)
        elif attribute.type == onnx.AttributeProto.INT:
            attribute.i = rng.choice([0, -1, -(1 << 31), 1 << 31, 1 << 62, 2, 3, 64])
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30])
        elif attribute.type == onnx.AttributeProto.INTS:
            values = list(attribute.ints) + [rng.choice([-1, 0, 1, 5, 1 << 40])]
            rng.shuffle(values)
            del attribute.ints[:]
            attribute.ints.extend(values[: rng.randrange(len(values) + 1)])
        elif attribute.type == onnx.AttributeProto.TENSOR:
            dims = [rng.choice([0, 1, 3, 1 << 30])]
            del attribute.t.dims[:]
            attribute.t.dims.extend(dims)
        else:
            attribute.type = rng.choice([onnx.AttributeProto.INT, onnx.AttributeProto.STRING, onnx.AttributeProto.FLOATS])
    elif how == "rewire":
        node = rng.choice([n for n in nodes if n.input])
        names = [o for n in nodes for o in n.output] + [i.name for i in graph.input] + [t.name for t in inits]
        node.input[rng.randrange(len(node.input))] = rng.choice(names + ["", "no_such_tensor"])
    elif how == "drop":
        nodes.remove(rng.choice(nodes))
    elif how == "duplicate":
        index = rng.randrange(len(nodes))
        nodes.insert(rng.randrange(len(nodes)), onnx.NodeProto.FromString(nodes[index].SerializeToString()))
    elif how == "opset":
        model.opset_import[0].version = rng.choice([1, 7, 11, 13, 16, 21, 22, 99, 1 << 40])
    elif how == "domain":
        rng.choice(nodes).domain = rng.choice(["com.microsoft", "ai.onnx.ml", "bogus.domain", "ai.onnx.preview.training"])
    elif how == "op_type":
        rng.choice(nodes).op_type = rng.choice(["Identity", "Relu", "MatMul", "Softmax", "Loop", "NoSuchOp", "Gather", "Reshape"])
    elif how == "input_shape":
        value = rng.choice(list(graph.input) + list(graph.output))
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 1 << 40])
        value.type.tensor_type.elem_type = rng.choice([1, 1, 7, 10, 11, 0])
    elif how in ("flip", "truncate"):
        data = bytearray(model.SerializeToString())
        if how == "truncate":
            return bytes(data[: rng.randrange(len(data))]), how
        span = len(data) if rng.random() < 0.3 else max(len(data) // 5, 1)  # the graph's nodes come before its weights
        for _ in range(rng.choice([1, 2, 8, 64])):
            data[rng.randrange(span)] ^= 1 << rng.randrange(8)
        return bytes(data), how
    return model, how


MODEL_MUTATIONS = ("dims", "dtype", "attribute", "rewire", "drop", "duplicate", "opset", "domain", "op_type", "input_shape",
                   "flip", "flip", "truncate")
HOSTILE_VALUES = [None, True, -1, 0, 10**400, 1e308, "", "x" * 5000, [], {}, [[[[]]]], "NaN", "<script>alert(1)</script>", "../../etc/passwd",
                  "\x00\x1b[31m", 3.5, -(2**63), 2**64]


# Values that are large rather than odd: a long string, long arrays, many keys (a few MB of text, a few hundred MB parsed).
BIG_VALUES = (lambda: "x" * 2_000_000, lambda: list(range(300_000)), lambda: [{}] * 300_000, lambda: {str(k): k for k in range(100_000)},
              lambda: "\u2028\ud7ff" * 300_000)


def mutate_json(data, rng: random.Random) -> tuple[str, str]:
    """A JSON text made from ``data`` with one hostile change: a value's type or size, a missing or extra key, NaN, depth
    (the whole text, or one value nested just past the limit), or damaged text."""
    how = rng.choice(("value", "value", "value", "delete", "extra", "nan", "deep", "deep_value", "size", "text"))
    data = json.loads(json.dumps(data))
    if how == "deep":
        return "[" * rng.choice([1000, 100_000]) + "]" * rng.choice([0, 1000, 100_000]), how
    containers = list(_containers(data))
    parent, key = rng.choice(containers) if containers else (None, None)
    if how in ("value", "nan") and parent is not None:
        parent[key] = math.nan if how == "nan" else rng.choice(HOSTILE_VALUES + [math.inf])
    elif how == "size" and parent is not None:
        parent[key] = rng.choice(BIG_VALUES)()
    elif how == "deep_value" and parent is not None:
        depth = rng.choice([60, 64, 65, 70])  # either side of the nesting limit (64, counting the document's own levels)
        parent[key] = json.loads("[" * depth + "]" * depth)
    elif how == "delete" and parent is not None:
        del parent[key]
    elif how == "extra" and isinstance(parent, dict):
        parent[rng.choice(["extra", "__proto__", "format", "version"])] = rng.choice(HOSTILE_VALUES)
    text = json.dumps(data, allow_nan=True)
    if how == "text":
        text = damage_text(text, rng)
    return text, how


def _containers(value, parent=None, key=None):
    """(container, key) of every value inside ``value``, the root's children first."""
    if parent is not None:
        yield parent, key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in list(items):
        yield from _containers(v, value, k)


def damage_text(text: str, rng: random.Random) -> str:
    """``text`` cut, with control characters, invalid code points or doubled lines (as one string; see as_bytes)."""
    how = rng.choice(("cut", "control", "surrogate", "blank", "repeat"))
    at = rng.randrange(len(text) + 1)
    if how == "cut":
        return text[:at]
    if how == "control":
        return text[:at] + rng.choice(["\x00", "\x1b[2J", "\r", "\u2028", "\ufeff", "\x7f", "\t\v\f"]) + text[at:]
    if how == "surrogate":
        return text[:at] + "\ud800" + text[at:]
    if how == "blank":
        return text[:at] + "\n\n   \n" + text[at:]
    return text + "\n" + text


def as_bytes(text: str, rng: random.Random) -> bytes:
    """``text`` encoded as a user's editor might: mostly UTF-8, sometimes UTF-16, Latin-1, a BOM, or bytes flipped."""
    how = rng.choice(("utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "flip"))
    data = text.encode("utf-8" if how == "flip" else how, errors="surrogatepass" if how.startswith("utf") else "replace")
    if how == "flip" and data:
        data = bytearray(data)
        data[rng.randrange(len(data))] ^= 0x80
        data = bytes(data)
    return data


def mutate_lines(lines: list[str], rng: random.Random) -> tuple[str, str]:
    """A text file of ``lines`` with hostile changes: empty lines, control characters, huge or empty lines, odd line ends."""
    lines = list(lines)
    how = rng.choice(("empty_lines", "control", "long", "empty_file", "whitespace", "crlf", "damage", "many", "drop"))
    if how == "empty_lines":
        for _ in range(rng.randrange(1, 5)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(["", " ", "\t"]))
    elif how == "control":
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + rng.choice(["\x00", "\x1b[31m", "\x08", "\u202e", "\ufffe", "\x85"])
    elif how == "long":
        lines[rng.randrange(len(lines))] += "9" * rng.choice([10_000, 200_000, 1_100_000])
    elif how == "empty_file":
        return "", how
    elif how == "whitespace":
        return "\n".join(" " * rng.randrange(5) for _ in lines), how
    elif how == "crlf":
        return "\r\n".join(lines) + "\r\n", how
    elif how == "damage":
        return damage_text("\n".join(lines), rng), how
    elif how == "many":
        lines = lines * rng.choice([10, 200])
    else:
        lines = lines[: rng.randrange(len(lines) + 1)]
    return "\n".join(lines) + "\n", how


def toml_text(data: dict) -> str:
    """A TOML rendering of the batch manifest's shape (top-level keys, [settings], [sweep], [[models]]) via JSON literals,
    which TOML shares for strings, numbers, booleans and arrays."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        return json.dumps(v) if v is not None else '""'

    out = [f"{json.dumps(k)} = {value(v)}" for k, v in data.items() if not isinstance(v, (dict, list)) or k not in ("settings", "sweep", "models")]
    for table in ("settings", "sweep"):
        if isinstance(data.get(table), dict):
            out += [f"[{table}]"] + [f"{json.dumps(k)} = {value(v)}" for k, v in data[table].items()]
    for model in data.get("models") or [] if isinstance(data.get("models"), list) else []:
        out.append("[[models]]")
        out += [f"{json.dumps(k)} = {value(v)}" for k, v in model.items()] if isinstance(model, dict) else []
    return "\n".join(out) + "\n"




# ----------------------------------------------------------------------------------------------- GGUF

GGUF_MUTATIONS = ("count", "key_length", "value_type", "string_length", "array_count", "array_item_type", "scalar", "scalar",
                  "n_dims", "dim", "tensor_type", "tensor_offset", "name_length", "version", "truncate", "truncate", "flip",
                  "architecture", "append", "tensor_data")


def mutate_gguf(data: bytes, places: dict[str, list[Place]], rng: random.Random) -> tuple[bytes, str]:
    """A GGUF file with one field of its header set to a value the file cannot back (or a plausible one), cut, flipped in
    its header, renamed to another architecture, extended, or with its weights' bytes flipped; ``places`` locate the
    fields (support.places)."""
    data, how = bytearray(data), rng.choice(GGUF_MUTATIONS)
    header_end = max(p.offset for ps in places.values() for p in ps) + 8
    if how == "truncate":
        return bytes(data[: rng.choice([rng.randrange(header_end), rng.randrange(len(data))])]), how
    if how == "flip":
        for _ in range(rng.choice([1, 2, 8])):
            data[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        return bytes(data), how
    if how == "architecture":  # general.architecture's value, same length: another family's loader over llama tensors
        at = data.find(b"llama")
        data[at : at + 5] = rng.choice([b"qwen2", b"gemma", b"bogus", b"\xff\xfe\x00ab", b"LLAMA", b"phi3\x00"])
        return bytes(data), how
    if how == "append":
        return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 31, 4096]))), how
    if how == "tensor_data":
        for _ in range(64):
            data[rng.randrange(header_end, len(data))] = rng.randrange(256)
        return bytes(data), how
    if how == "count":
        place = rng.choice(places["tensor_count"] + places["kv_count"])
    else:
        place = rng.choice(places["scalar" if how == "scalar" else how])
    old = get(data, place)
    bits = 8 * {"B": 1, "H": 2, "I": 4, "Q": 8}[place.code]
    put(data, place, rng.choice([0, 1, old - 1, old + 1, 2 * old, 13, 99, 1 << 31, (1 << 32) - 1, 1 << 60, (1 << 63) + 1,
                                 (1 << 64) - 1, rng.randrange(1 << bits)]))
    return bytes(data), f"{how} {old}"


# ----------------------------------------------------------------------------------------------- TOML batch manifests

TOML_MUTATIONS = ("json", "json", "json", "deep_array", "deep_table", "dotted_key", "long_header", "big_int", "date", "duplicate",
                  "long_string", "oversized", "text")


def mutate_toml(data: dict, rng: random.Random) -> tuple[str, str]:
    """A batch manifest from ``data`` with one hostile change: a JSON-level one (types, keys, NaN) rendered as TOML, nesting
    of arrays, inline tables, dotted keys or table headers either side of the limit or far past it, integers past 64 bits,
    dates where numbers go, a key twice, a 2 MB string, a file past the manifest size limit, or damaged text."""
    how = rng.choice(TOML_MUTATIONS)
    base = toml_text(data)
    depth = rng.choice([10, 60, 66, 1000, 100_000])
    if how == "json":
        text, how = mutate_json(data, rng)
        try:
            return toml_text(json.loads(text)), "json " + how
        except (ValueError, RecursionError):  # a damaged or too deep JSON text: TOML gets damaged text too
            return damage_text(base, rng), "json " + how + "+text"
    if how == "deep_array":
        return f"extra = {'[' * depth}{']' * depth}\n" + base, f"{how} {depth}"
    if how == "deep_table":
        return f"extra = {'{a = ' * depth}1{'}' * depth}\n" + base, f"{how} {depth}"
    if how == "dotted_key":
        return "extra" + ".a" * depth + " = 1\n" + base, f"{how} {depth}"
    if how == "long_header":
        return base + "[" + ".".join(["t"] * depth) + "]\nx = 1\n", f"{how} {depth}"
    if how == "big_int":
        return base.replace('"n" = 3', f'"n" = {rng.choice(["9223372036854775808", "-9223372036854775809", "1" + "0" * 400, "0x7fffffffffffffff"])}'), how
    if how == "date":
        return base.replace('"n" = 3', '"n" = 1979-05-27T07:32:00Z'), how
    if how == "duplicate":
        return base + base, how
    if how == "long_string":
        return base.replace('"name" = "tiny"', '"name" = "' + "n" * 2_000_000 + '"'), how
    if how == "oversized":
        return base + "#" + "x" * 4_100_000 + "\n", how
    return damage_text(base, rng), how


# ----------------------------------------------------------------------------------------------- calibration questions

QUESTION_MUTATIONS = ("long_question", "long_answer", "long_text", "many", "types", "json", "unicode", "empty_fields", "encoding")


def mutate_questions(records: list[dict], rng: random.Random) -> tuple[bytes, str]:
    """A JSONL file of calibration questions (``records``: text, answer, question, kind) with hostile lengths (questions,
    answers or texts of up to 1.1 million characters), counts (up to 1,500 lines), types, JSON, text or encodings."""
    records = [dict(r) for r in records]
    how = rng.choice(QUESTION_MUTATIONS)
    target = rng.choice(records)
    size = rng.choice([300, 5_000, 60_000, 400_000, 1_100_000])
    filler = rng.choice(["x", "7 ", "数", "\u0301", "\U0001F600", " "])
    if how in ("long_question", "long_answer", "long_text"):
        target[how.split("_")[1]] = filler * (size // len(filler))
        how = f"{how} {size}"
    elif how == "many":
        count = rng.choice([50, 300, 1_500])
        records = (records * (count // len(records) + 1))[:count]
        how = f"many {count}"
    elif how == "types":
        target[rng.choice(["text", "answer", "question", "kind"])] = rng.choice(HOSTILE_VALUES)
    elif how == "unicode":
        target["question"] = "\u202e\u0000" + target.get("question", "") + "\ufeff\U0010ffff" * 20
    elif how == "empty_fields":
        target[rng.choice(["answer", "question", "text"])] = rng.choice(["", " ", "\n"])
    lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records]
    if how == "json":
        k = rng.randrange(len(lines))
        text, how = mutate_json(records[k], rng)
        lines[k] = text.replace("\n", " ")
        how = "json " + how
    text = "\n".join(lines) + "\n"
    return (as_bytes(text, rng), how + " encoded") if how == "encoding" else (text.encode("utf-8", "surrogatepass"), how)


# ----------------------------------------------------------------------------------------------- tokenizer.json

TOKENIZER_MUTATIONS = ("json", "json", "vocab_ids", "merges", "added_tokens", "model_type", "pre_tokenizer", "normalizer",
                       "post_processor", "truncation")
# Backtracking patterns (tokenizers uses Oniguruma), invalid ones, and ones that match everywhere or nowhere.
HOSTILE_PATTERNS = ("(a+)+$", "(.*)*x", "(\\w+\\s?)*$", "(", "[z-a]", "(?<=a+)b", "", ".", "\\p{Bogus}", "(?=)" * 1000)


def mutate_tokenizer(data: dict, rng: random.Random) -> tuple[str, str]:
    """tokenizer.json of ``data`` with one hostile change: a JSON-level one, vocabulary ids far out of range or repeated,
    merges of unknown tokens or of another shape, added tokens with huge ids or contents, an unknown model type, a
    pre-tokenizer or normalizer built on a backtracking or invalid regex, special-token ids out of range, truncation odd."""
    how = rng.choice(TOKENIZER_MUTATIONS)
    if how == "json":
        text, inner = mutate_json(data, rng)
        return text, "json " + inner
    data = json.loads(json.dumps(data))
    model = data["model"]
    huge = rng.choice([-1, 256, 1 << 31, (1 << 63) - 1, 1 << 64, 10**30])
    if how == "vocab_ids":
        token = rng.choice(list(model["vocab"]))
        model["vocab"][token] = huge if rng.random() < 0.7 else 0
    elif how == "merges":
        model["merges"] = rng.choice([[["nope", "never"]], [["a", "b", "c"]], ["a"], [[1, 2]], [["Ġ", "Ġ"]] * 1000])
    elif how == "added_tokens":
        data["added_tokens"] = [{"id": huge, "content": rng.choice(["<x>", "", "a" * 100_000]), "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": rng.choice([True, False, "yes"]), "special": True}]
    elif how == "model_type":
        model["type"] = rng.choice(["WordPiece", "Unigram", "WordLevel", "Bogus", 7])
    elif how == "pre_tokenizer":
        data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": rng.choice(HOSTILE_PATTERNS)},
                                 "behavior": rng.choice(["Isolated", "Removed", "Bogus"]), "invert": rng.choice([False, True])}
    elif how == "normalizer":
        data["normalizer"] = rng.choice([{"type": "Replace", "pattern": {"Regex": rng.choice(HOSTILE_PATTERNS)}, "content": "aa"},
                                         {"type": "Prepend", "prepend": "z" * rng.choice([10, 1_000_000])},
                                         {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 10_000}])
    elif how == "post_processor":
        data["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<b>", "type_id": 0}},
                                                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [], "special_tokens": {"<b>": {"id": "<b>", "ids": [huge], "tokens": ["<b>"]}}}
    else:
        data["truncation"] = {"direction": "Right", "max_length": rng.choice([0, 1, huge]), "strategy": "LongestFirst", "stride": huge}
    return json.dumps(data), f"{how} {huge}"
