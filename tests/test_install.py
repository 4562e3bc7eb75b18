"""The install lines the README gives keep the environment working: the installed versions of transformers, datasets,
huggingface-hub and lm-eval satisfy each other's requirements and import together, and pip's resolver, asked for the
export and lm-eval extras together into an empty environment, picks versions that do (transformers 4.57, hub < 1.0)."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("transformers", "datasets", "huggingface-hub", "lm-eval", "tokenizers", "accelerate", "optimum", "optimum-onnx", "torch")


def _unsatisfied(versions: dict[str, str], requirements: dict[str, list[str]]) -> list[str]:
    """Requirements (without extras markers) of the checked packages that the given versions break."""
    broken = []
    for name, lines in requirements.items():
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an optional extra's requirement
            found = versions.get(requirement.name.lower().replace("_", "-"))
            if found is not None and not requirement.specifier.contains(Version(found).public, prereleases=True):
                broken.append(f"{name} needs {line}, found {found}")
    return broken


def test_installed_versions_satisfy_each_other_and_import():
    versions = {}
    for dist in importlib.metadata.distributions():
        versions[dist.metadata["Name"].lower().replace("_", "-")] = dist.version
    present = [name for name in CHECKED if name in versions]
    requirements = {name: importlib.metadata.requires(name) or [] for name in present}
    assert _unsatisfied(versions, requirements) == []
    modules = "import transformers, huggingface_hub, tokenizers" + (", datasets, lm_eval" if "lm-eval" in versions else "")
    done = subprocess.run([sys.executable, "-c", modules + "; from transformers import AutoModelForCausalLM"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    assert Version(versions["transformers"]) < Version("4.58") and Version(versions["huggingface-hub"]) < Version("1.0")


@pytest.mark.slow
def test_pip_resolves_the_export_and_lm_eval_extras_to_working_versions(tmp_path):
    """What `pip install -e ".[export,lm-eval]"` would install into an empty environment (about 30 s; needs the index)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                           "-e", f"{ROOT}[export,lm-eval]"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and any(word in done.stderr for word in ("ConnectionError", "NewConnectionError", "Could not fetch", "No matching distribution")):
        pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    installed = json.loads(report.read_text())["install"]
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}
    requirements = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"].get("requires_dist", []) for item in installed}
    assert _unsatisfied(versions, {name: requirements[name] for name in CHECKED if name in requirements}) == []
    assert Version(versions["transformers"]) < Version("4.58") and Version(versions["huggingface-hub"]) < Version("1.0")
    assert Version(versions["torch"]).release <= (2, 13, 0) and "lm-eval" in versions
    print({name: versions.get(name) for name in CHECKED})
