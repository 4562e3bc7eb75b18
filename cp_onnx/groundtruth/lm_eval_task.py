"""The shipped lm-eval task ``cp_onnx_probes``: the probe suite's questions asked zero-shot, as a standard lm-eval
task (the YAML in cp_onnx/data/lm_eval) over a JSONL that cp-onnx generates from a seed, so no data set is downloaded.

The seed differs from the sweep's (0 and 1), so the questions that decide nothing in cp-onnx's own validation are the
ones this task scores: an applied circuit is judged on held-out items.
"""
from __future__ import annotations

import json
from pathlib import Path

from cp_onnx.calibration import DATA_DIR
from cp_onnx.files import write_text
from cp_onnx.groundtruth.probes import probe_suite

TASK = "cp_onnx_probes"
SEED = 2  # the sweeps of benchmarks/results used seeds 0 and 1
PER_KIND = 100  # 700 questions: a standard error of about 1.3 points at 15% accuracy
TEMPLATE = DATA_DIR / "lm_eval" / f"{TASK}.yaml"


def write_task(folder: str | Path, *, seed: int = SEED, per_kind: int = PER_KIND) -> Path:
    """Write ``TASK.yaml`` and ``TASK.jsonl`` into ``folder`` (the YAML names the JSONL by its absolute path, so lm-eval
    finds it from any working directory); the same seed writes the same bytes. Returns the folder for ``--include_path``."""
    import yaml

    folder = Path(folder).expanduser().resolve()
    data = folder / f"{TASK}.jsonl"
    lines = [json.dumps({"id": item.id, "kind": item.kind, "prompt": item.prompt, "answer": item.answer}, ensure_ascii=False)
             for item in probe_suite(seed, per_kind)]
    write_text(data, "\n".join(lines) + "\n")
    template = TEMPLATE.read_text(encoding="utf-8")
    config = yaml.safe_load(template)
    config["dataset_kwargs"]["data_files"]["test"] = str(data)
    header = "".join(line + "\n" for line in template.splitlines() if line.startswith("#"))
    note = f"# Written for seed {seed}, {per_kind} questions per kind.\n"
    write_text(folder / f"{TASK}.yaml", header + note + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return folder
