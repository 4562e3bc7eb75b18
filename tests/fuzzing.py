"""The fuzzing harness: a runner that executes each case in a child process and classifies how it ended
(the seeded mutators of every input kind are in mutators.py).

A case is a ``cp-onnx`` command line over files a mutator wrote. The child is forked from a server
process that has imported cp-onnx and onnxruntime (and, for export cases, torch and transformers) but never
ran a session (so forking is safe and costs milliseconds, not an interpreter start); its address space is
capped, so a memory bomb that got through ends in that child rather than in the machine. Outcomes:

  ok        exit 0
  error     exit 2, and stderr ends in one line ``cp-onnx: error: ...`` with no traceback anywhere
  traceback any other exit code, or a traceback on stderr
  crash     killed by a signal other than SIGKILL (a native crash inside onnxruntime, numpy, tokenizers or torch)
  hang      still running after the time limit (then killed)
  kill      what the out-of-memory killer would have ended without the cap: killed by SIGKILL the harness did not send,
            a peak resident size past KILL_RSS, or an error that is an allocation failing against the cap
  partial   ended in an error but left an output behind, or a temporary file anywhere in its folder
"""
from __future__ import annotations

import json
import os
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


OUTCOMES = ("ok", "error", "traceback", "crash", "hang", "kill", "partial")
TIME_LIMIT_S = 60.0
ADDRESS_SPACE = 6 << 30
# Every case is a tiny model or a small file: its child stays under 1.5 GB (an export with torch included); twice that
# is a sign it allocated what an input declared.
KILL_RSS = 3 << 30
ALLOCATION_FAILED = ("MemoryError", "Failed to allocate", "bad_alloc", "Cannot allocate memory", "out of memory")
PRELOAD = ("cp_onnx.cli", "cp_onnx.analyze", "cp_onnx.groundtruth.sweep", "cp_onnx.batch", "cp_onnx.outputs.embed", "cp_onnx.outputs.summary",
           "cp_onnx.models.apply", "cp_onnx.groundtruth.validate", "onnxruntime", "tokenizers", "matplotlib.figure", "exporters", "gguf")
# What an export imports (seconds per case otherwise): for the servers of GGUF cases only.
EXPORT_PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "transformers.integrations.ggml",
                  "transformers.modeling_gguf_pytorch_utils", "optimum.exporters.onnx", "exporters.optimum_export", "exporters.tokenizer_files")


class ForkServer:
    """A Python process that has imported cp-onnx and forks one child per case (this file run as a script).

    multiprocessing's forkserver re-imports the parent's main module (pytest) in every child; this one
    forks a process that is ready to run, so a case that fails early costs milliseconds."""

    def __init__(self, preload: tuple[str, ...] = ()):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "CP_ONNX_FUZZ_PRELOAD": ",".join(preload)}
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, case: "Case", time_limit: float) -> tuple[int | None, int]:
        """The case's exit code (negative: killed by that signal; None: still running after ``time_limit``) and its peak
        resident size in bytes."""
        request = {"argv": case.argv, "folder": str(case.folder), "limit": time_limit, "env": case.env}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["code"], answer["rss"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _serve() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the protocol's pipe; anything else printed to stdout goes to stderr
    os.dup2(2, 1)
    for name in PRELOAD + tuple(filter(None, os.environ.get("CP_ONNX_FUZZ_PRELOAD", "").split(","))):
        __import__(name)
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["folder"], case["env"])
        deadline, code, rss = time.monotonic() + case["limit"], None, 0
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                code, rss = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                rss = os.wait4(pid, 0)[2].ru_maxrss * 1024
                break
            time.sleep(0.002)
        print(json.dumps({"code": code, "rss": rss}), file=answers, flush=True)


def _child(argv: list[str], folder: str, env: dict[str, str]) -> None:
    """Run one command with stdout/stderr in files of ``folder``; exit with its code (1 and a traceback if it raised)."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    os.environ.update(CP_ONNX_THREADS="1", CP_ONNX_CACHE=str(Path(folder) / "cache"), **env)
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
    env: dict[str, str] = field(default_factory=dict)  # set in the child (a lower limit, to reach it with a small file)


@dataclass
class Tally:
    counts: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # child time per kind (both servers' summed)
    peak_rss: int = 0  # the largest peak resident size of any case, bytes
    wall: float = 0.0  # seconds the whole run took

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
        totals = {o: sum(c[o] for c in self.counts.values()) for o in OUTCOMES}
        lines.append(f"| **total** | {sum(totals.values())} | " + " | ".join(f"**{totals[o]}**" for o in OUTCOMES) + " | |")
        return "\n".join(lines) + (f"\n\n{self.wall / 60:.1f} min of wall time; the largest peak resident size of a case: "
                                   f"{self.peak_rss / 2**30:.2f} GB")


def run_cases(cases, tally: Tally, *, parallel: int = 2, time_limit: float = TIME_LIMIT_S, preload: tuple[str, ...] = ()) -> Tally:
    """Run ``cases`` (an iterable), ``parallel`` at a time (one fork server each, importing ``preload`` too), adding
    each outcome to ``tally``."""
    cases, lock = iter(cases), threading.Lock()

    def worker() -> None:
        server = ForkServer(preload)
        try:
            while True:
                with lock:
                    case = next(cases, None)
                if case is None:
                    return
                began = time.monotonic()
                code, rss = server.run(case, time_limit)
                tally.seconds[case.kind] = tally.seconds.get(case.kind, 0.0) + time.monotonic() - began
                tally.peak_rss = max(tally.peak_rss, rss)
                outcome = ("hang", f"still running after {time_limit:.0f} s") if code is None else classify(case, code, rss)
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


def classify(case: Case, code: int, rss: int = 0) -> tuple[str, str]:
    err = (case.folder / "stderr").read_text(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    temporary = [p.name for p in case.folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    if code == -signal.SIGKILL or rss > KILL_RSS or any(marker in err for marker in ALLOCATION_FAILED):
        return "kill", f"exit {code}, peak {rss / 2**30:.1f} GB; {last[:300]}"
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


def tally_to_json(tally: Tally) -> str:
    return json.dumps({k: dict(v) for k, v in tally.counts.items()}, indent=1, sort_keys=True)


if __name__ == "__main__":
    _serve()
