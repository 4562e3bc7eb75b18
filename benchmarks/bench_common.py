"""What every benchmark script shares: stopwatches, peak memory, machine facts, a table, the JSON file."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("numpy", "onnx", "onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "tokenizers")
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.wall`` and ``t.cpu`` (user + system seconds of this process)."""

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far, in MB (ru_maxrss is in kB on Linux); RUSAGE_CHILDREN: the largest waited-for child."""
    return resource.getrusage(who).ru_maxrss / 1024


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def say_load(when: str) -> list[float]:
    """Print the 1, 5 and 15 minute load averages against the core count; return them."""
    load, cores = load_average(), os.cpu_count()
    busy = " (the machine is busy: figures are not comparable to a quiet run)" if load[0] > cores / 2 else ""
    print(f"load average at {when}: {load} on {cores} cores{busy}")
    return load


def machine_info() -> dict:
    """Cores, CPU model, Python and package versions, and the checkout's commit: what a rerun must match."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []

    def field(key: str) -> str | None:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.split(":", 1)[0].strip() == key), None)

    model = field("model name") or platform.processor()
    # The model name alone ("AMD EPYC" under a hypervisor) does not tell two CPU generations apart; family, model and
    # the vector extensions do, and onnxruntime's float32 and int4 kernels run 2.5-3x apart between them.
    flags = set((field("flags") or "").split())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "cpu_family_model": f"{field('cpu family')}/{field('model')}",
        "cpu_vector_extensions": sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"}),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit or None,
    }


def print_table(title: str, rows: list[tuple]) -> None:
    """Rows of (label, value[, note]) as aligned columns."""
    print(f"\n{title}")
    width = max(len(str(row[0])) for row in rows)
    for label, value, *note in rows:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {label:<{width}}  {text:>10}  {note[0] if note else ''}".rstrip())


def run_json(command: list[str], **kwargs) -> dict:
    """Run a helper process that prints one JSON object as its last stdout line; its stderr passes through."""
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, **kwargs)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(name: str, data: dict) -> Path:
    """benchmarks/results/NAME.json, written atomically, with the machine and load average added."""
    from cp_onnx.files import write_json

    return write_json({"benchmark": name, "machine": machine_info(), **data}, RESULTS / f"{name}.json")
