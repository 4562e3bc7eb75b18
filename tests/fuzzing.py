"""The fuzzing harness: seeded mutators of every input kind, and a runner that executes each case in a
child process and classifies how it ended.

A case is a ``cp-onnx`` command line over files a mutator wrote. The child is forked from a server
process that has imported cp-onnx and onnxruntime but never ran a session (so forking is safe and
costs milliseconds, not an interpreter start); its address space is capped, so a memory bomb that got
through ends in that child. Outcomes:

  ok        exit 0
  error     exit 2, and stderr ends in one line ``cp-onnx: error: ...`` with no traceback anywhere
  traceback any other exit code, or a traceback on stderr
  crash     killed by a signal (a native crash inside onnxruntime or numpy)
  hang      still running after the time limit (then killed)
  partial   ended in an error but left an output behind, or a temporary file anywhere in its folder
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

OUTCOMES = ("ok", "error", "traceback", "crash", "hang", "partial")
TIME_LIMIT_S = 60.0
ADDRESS_SPACE = 6 << 30
PRELOAD = ("cp_onnx.cli", "cp_onnx.analyze", "cp_onnx.groundtruth.sweep", "cp_onnx.batch", "cp_onnx.outputs.embed", "cp_onnx.outputs.summary",
           "cp_onnx.models.apply", "cp_onnx.groundtruth.validate", "onnxruntime", "tokenizers", "matplotlib.figure")


class ForkServer:
    """A Python process that has imported cp-onnx and forks one child per case (this file run as a script).

    multiprocessing's forkserver re-imports the parent's main module (pytest) in every child; this one
    forks a process that is ready to run, so a case that fails early costs milliseconds."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list[str], folder: Path, time_limit: float) -> int | None:
        """The case's exit code (negative: killed by that signal), or None when it ran past ``time_limit``."""
        self.process.stdin.write(json.dumps({"argv": argv, "folder": str(folder), "limit": time_limit}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["code"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _serve() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the protocol's pipe; anything else printed to stdout goes to stderr
    os.dup2(2, 1)
    for name in PRELOAD:
        __import__(name)
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["folder"])
        deadline, code = time.monotonic() + case["limit"], None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        print(json.dumps({"code": code}), file=answers, flush=True)


def _child(argv: list[str], folder: str) -> None:
    """Run one command with stdout/stderr in files of ``folder``; exit with its code (1 and a traceback if it raised)."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    os.environ.update(CP_ONNX_THREADS="1", CP_ONNX_CACHE=str(Path(folder) / "cache"))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    code = 1
    try:
        from cp_onnx.cli import main

        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # what the console script would print: an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class Case:
    kind: str
    argv: list[str]
    folder: Path  # the case's own folder: inputs, outputs, stdout, stderr
    outputs: list[Path]  # what the command writes on success: none may exist after an error
    detail: str = ""
    failed_ok: bool = False  # exit 1 with a closing `cp-onnx: ` line is a success too (a batch whose models failed)


@dataclass
class Tally:
    counts: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # child time per kind (both servers' summed)

    def add(self, case: Case, outcome: str, message: str) -> None:
        self.counts.setdefault(case.kind, Counter())[outcome] += 1
        if outcome not in ("ok", "error"):
            self.examples.setdefault(outcome, []).append(f"{case.kind} {case.detail} [{case.folder}]: {message}")

    def bad(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.examples.items()}

    def table(self) -> str:
        lines = ["| input kind | cases | " + " | ".join(OUTCOMES) + " | ms/case |", "| --- | ---: | " + " | ".join("---:" for _ in OUTCOMES) + " | ---: |"]
        for kind, counter in sorted(self.counts.items()):
            total = sum(counter.values())
            lines.append(f"| {kind} | {total} | " + " | ".join(str(counter[o]) for o in OUTCOMES) + f" | {1000 * self.seconds.get(kind, 0) / total:.0f} |")
        return "\n".join(lines)


def run_cases(cases, tally: Tally, *, parallel: int = 2, time_limit: float = TIME_LIMIT_S) -> Tally:
    """Run ``cases`` (an iterable), ``parallel`` at a time (one fork server each), adding each outcome to ``tally``."""
    cases, lock = iter(cases), threading.Lock()

    def worker() -> None:
        server = ForkServer()
        try:
            while True:
                with lock:
                    case = next(cases, None)
                if case is None:
                    return
                began = time.monotonic()
                code = server.run(case.argv, case.folder, time_limit)
                tally.seconds[case.kind] = tally.seconds.get(case.kind, 0.0) + time.monotonic() - began
                outcome = ("hang", f"still running after {time_limit:.0f} s") if code is None else classify(case, code)
                with lock:
                    tally.add(case, *outcome)
                if outcome[0] in ("ok", "error"):  # the disk stays small; the folders of bad cases stay to be read
                    shutil.rmtree(case.folder, ignore_errors=True)
        finally:
            server.close()

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def classify(case: Case, code: int) -> tuple[str, str]:
    err = (case.folder / "stderr").read_text(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    temporary = [p.name for p in case.folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    if code < 0:
        return "crash", f"signal {-code}; {last[:300]}"
    if case.failed_ok and code == 1 and last.startswith("cp-onnx: ") and "Traceback" not in err:
        return "ok", ""
    if "Traceback (most recent call last)" in err or code not in (0, 2):
        return "traceback", f"exit {code}; {last[:300]}"
    if temporary:
        return "partial", f"temporary files left: {temporary}"
    if code == 2:
        if not last.startswith("cp-onnx: error: "):
            return "traceback", f"exit 2 without a one-line error: {last[:300]}"
        left = [str(p) for p in case.outputs if p.exists()]
        return ("partial", f"error but wrote {left}: {last[:200]}") if left else ("error", last)
    return "ok", ""


# ----------------------------------------------------------------------------------------------- mutators


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


def mutate_json(data, rng: random.Random) -> tuple[str, str]:
    """A JSON text made from ``data`` with one hostile change: a value's type, a missing or extra key, NaN, depth, or damaged text."""
    how = rng.choice(("value", "value", "value", "delete", "extra", "nan", "deep", "text"))
    data = json.loads(json.dumps(data))
    if how == "deep":
        return "[" * rng.choice([1000, 100_000]) + "]" * rng.choice([0, 1000, 100_000]), how
    containers = list(_containers(data))
    parent, key = rng.choice(containers) if containers else (None, None)
    if how in ("value", "nan") and parent is not None:
        parent[key] = math.nan if how == "nan" else rng.choice(HOSTILE_VALUES + [math.inf])
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


def tally_to_json(tally: Tally) -> str:
    return json.dumps({k: dict(v) for k, v in tally.counts.items()}, indent=1, sort_keys=True)


if __name__ == "__main__":
    _serve()
