"""apply and generate: applied folders against torch models with repeated layers, KV-cached decoding against full re-runs."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cp_onnx.errors import CpOnnxError
from cp_onnx.models.apply import apply
from cp_onnx.models.generate import CachedDecoder, eos_token_ids, generate, generate_ids, with_past_graph
from cp_onnx.models.model import open_model
from graph_passes.edit import Edit
from cp_onnx.models.runner import Runner, pad_batch
from exporters.manifest import read_manifest
from graph_passes import GraphPassError, graph_io
from graph_passes.metadata import routed_path
from support import quiet, rel_err, repeated_layers, torch_generate, torch_logits

DUPLICATE = [0, 1, 2, 1, 2]  # block 1:3 of the 3-layer tiny model run twice
PROMPT = "Hello there, world"
NEW_TOKENS = 12


@pytest.mark.parametrize("which", ["original", "duplicated"])
def test_cached_generation_equals_uncached_and_torch(llama_folder, duplicated, which):
    hf, source = llama_folder
    folder, path = (source, [0, 1, 2]) if which == "original" else (duplicated, DUPLICATE)
    model = open_model(folder)
    text, cached = generate(model, PROMPT, NEW_TOKENS)
    _, uncached = generate(model, PROMPT, NEW_TOKENS, use_cache=False)
    prompt_ids = model.encode([PROMPT])[0][0]
    assert prompt_ids[0] == 1 and len(prompt_ids) == len(PROMPT) + 1  # BOS + one id per character
    assert cached == uncached == torch_generate(hf, prompt_ids, path, NEW_TOKENS)
    assert len(cached) == NEW_TOKENS or cached[-1] in eos_token_ids(model)
    assert len(set(cached)) > 1  # not a single repeated token: the comparison means something
    assert text == model.tokenizer.decode(cached, skip_special_tokens=True)


def test_applied_cache_gives_the_logits_of_full_reruns(duplicated):
    """Teacher-forced: each cached step's logits equal the no-cache graph's at that position (slots renumbered right)."""
    model = open_model(duplicated)
    decoder = CachedDecoder(Runner(with_past_graph(model), threads=1), model.manifest)
    tokens = [1, 40, 41, 42, 7, 80, 80, 3]
    steps = [decoder.start(tokens[:3])] + [decoder.step(t) for t in tokens[3:]]
    ids = np.array([tokens], dtype=np.int64)
    full = Runner(model.onnx_path, threads=1).run(ids, np.ones_like(ids))["logits"][0]
    for position, logits in zip(range(2, len(tokens)), steps):
        assert rel_err(logits, full[position]) < 1e-5


def test_apply_writes_a_routed_folder(llama_folder, duplicated):
    hf, source = llama_folder
    manifest, original = read_manifest(duplicated), read_manifest(source)
    assert manifest["layer_path"] == "0..2,1..2" and manifest["num_layers"] == 5
    assert manifest["derived_from"] == {key: original[key] for key in ("source", "source_kind", "weights_sha256", "num_layers", "cache_key")}
    assert manifest["cache_key"] != original["cache_key"]
    assert manifest["onnx"] == {"model": "model.onnx", "with_past": "with_past/model.onnx", "model_data": None, "with_past_data": None}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"):
        assert (duplicated / name).read_bytes() == (source / name).read_bytes()
    assert not list(duplicated.parent.glob(".*"))  # no staging folder left behind
    for graph in ("model.onnx", "with_past/model.onnx"):
        assert routed_path(graph_io.load(duplicated / graph, weights=False)) == DUPLICATE
    ids, mask = pad_batch([[1, 40, 50, 60, 70, 80], [1, 33, 34]], side="right")
    runner = Runner(duplicated / "model.onnx", threads=1)
    got = runner.run(ids, mask, ["logits"])["logits"]
    with repeated_layers(hf, "llama", DUPLICATE):
        expected = torch_logits(hf, runner.feeds(ids, mask))
    real = mask.astype(bool)
    assert rel_err(got[real], expected[real]) < 1e-3


def test_apply_without_a_with_past_graph_routes_what_there_is(llama_folder, duplicated, tmp_path):
    source = tmp_path / "no_past"
    shutil.copytree(llama_folder[1], source, ignore=shutil.ignore_patterns("with_past"))
    edit_json(source / "cp_onnx.json", onnx={**read_manifest(llama_folder[1])["onnx"], "with_past": None})
    messages = []
    out = apply(open_model(source), Edit.layers(DUPLICATE), tmp_path / "out", log=messages.append)
    assert any("no with_past graph: routing model.onnx only" in m for m in messages)
    assert read_manifest(out)["onnx"]["with_past"] is None and not (out / "with_past").exists()
    model = open_model(out)
    assert with_past_graph(model) is None
    logged = []
    assert generate(model, PROMPT, NEW_TOKENS, log=logged.append) == generate(open_model(duplicated), PROMPT, NEW_TOKENS)
    assert "re-running the whole sequence" in logged[0]


def test_apply_refuses_bad_output_folders_and_paths(llama_folder, duplicated, tmp_path):
    source = open_model(llama_folder[1])
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(CpOnnxError, match="is not a cp-onnx model folder; choose another --out folder"):
        apply(source, Edit.parse("1:3"), stranger, log=quiet)
    assert (stranger / "notes.txt").read_text() == "keep me"
    with pytest.raises(CpOnnxError, match="is the source model folder"):
        apply(source, Edit.parse("1:3"), llama_folder[1], log=quiet)
    with pytest.raises(CpOnnxError, match=r"already routed \(layer path 0..2,1..2\)"):
        apply(open_model(duplicated), Edit.parse("0"), tmp_path / "again", log=quiet)
    with pytest.raises(GraphPassError, match="'z' is not a layer number"):
        Edit.parse("0..2,z")
    with pytest.raises(CpOnnxError, match="out of range|is not a layer of this model|has 3 layers"):
        apply(source, Edit.layers([0, 7]), tmp_path / "bad", log=quiet)
    assert not (tmp_path / "bad").exists()
    # A previous applied folder is replaced.
    first = apply(source, Edit.parse("1:3"), tmp_path / "reused", log=quiet)
    apply(source, Edit.layers([2, 0]), first, log=quiet)
    assert read_manifest(first)["layer_path"] == "2,0" and read_manifest(first)["num_layers"] == 2


def edit_json(path: Path, **changes) -> None:
    """Set (or with None, remove) keys of a JSON file."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({key: value for key, value in data.items() if value is not None}))


def test_generation_stops_at_eos(llama_folder, tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(llama_folder[1], folder)
    free = generate_ids(open_model(folder), [1, 40, 41, 42], 8)
    assert len(free) == 8 and len(set(free[:3])) == 3
    edit_json(folder / "cp_onnx.json", eos_token_id=[250, free[2]])
    assert eos_token_ids(open_model(folder)) == {250, free[2]}
    assert generate_ids(open_model(folder), [1, 40, 41, 42], 8) == free[:3]
    assert generate_ids(open_model(folder), [1, 40, 41, 42], 8, use_cache=False) == free[:3]


def test_eos_comes_from_the_manifest_then_the_config_files(llama_folder, tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(llama_folder[1], folder)
    assert eos_token_ids(open_model(folder)) == {2}  # LlamaConfig's default, recorded by export
    edit_json(folder / "cp_onnx.json", eos_token_id=None)
    edit_json(folder / "generation_config.json", eos_token_id=7)
    assert eos_token_ids(open_model(folder)) == {7}
    edit_json(folder / "generation_config.json", eos_token_id=None)
    edit_json(folder / "config.json", eos_token_id=[8, 9])
    assert eos_token_ids(open_model(folder)) == {8, 9}
    edit_json(folder / "config.json", eos_token_id=None)
    assert eos_token_ids(open_model(folder)) == {2}  # "</s>" in tokenizer_config.json, looked up in tokenizer.json
    edit_json(folder / "tokenizer_config.json", eos_token=None)
    assert eos_token_ids(open_model(folder)) == set()


def test_generate_refuses_nonsense(llama_folder):
    model = open_model(llama_folder[1])
    with pytest.raises(CpOnnxError, match="max_new_tokens must be at least 1"):
        generate(model, PROMPT, 0)
    with pytest.raises(CpOnnxError, match="is not a text-generation-with-past graph"):
        CachedDecoder(Runner(model.onnx_path, threads=1), model.manifest)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    model = open_model(smollm2_dir)
    start = time.perf_counter()
    text, ids = generate(model, "The capital of France is", 3, log=quiet)
    print(f"SmolLM2 greedy, 3 tokens without cache: {time.perf_counter() - start:.1f} s -> {text!r}")
    assert text.startswith(" Paris")
