"""mergekit passthrough configs: `apply --mergekit` writes slices whose layers, read back by an independent reader (PyYAML
and mergekit's rule that layer_range ends are exclusive), are the path the routed graph runs; a checkpoint assembled
from those slices as mergekit's passthrough writes one gives the routed model's logits; and `apply --path CONFIG.yml`
takes a user's self-merge."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cp_onnx.cli import main
from cp_onnx.errors import CpOnnxError
from cp_onnx.models.runner import Runner
from cp_onnx.outputs.mergekit import read_config
from exporters.manifest import read_manifest
from graph_passes import graph_io

PATHS = {"duplicate": ("--duplicate", "1:3"), "repeat": ("--path", "0,1,1,1,2"), "skip": ("--path", "0,2"), "reorder": ("--path", "2,0..2")}
SOFTMAX = re.compile(r"^/model/layers\.(\d+)/self_attn/Softmax(/dup\d+)?$")
IDS = [1, 40, 41, 42, 7, 80, 80, 3]


def slices_path(config: Path) -> list[int]:
    """The layers a passthrough config stacks, read as mergekit reads it: each slice's layer_range, end exclusive."""
    data = yaml.safe_load(config.read_text())
    assert data["merge_method"] == "passthrough"
    path = []
    for entry in data["slices"]:
        [source] = entry["sources"]
        first, end = source["layer_range"]
        path.extend(range(first, end))
    return path


def executed_path(graph: Path) -> list[int]:
    """The order in which the routed graph runs its layers: its attention Softmax nodes (one per copy of a layer, named
    after the layer) in the graph's topological order, where each copy must follow the copy whose output it reads."""
    return [int(match[1]) for node in graph_io.load(graph, weights=False).graph.node if (match := SOFTMAX.match(node.name))]


def passthrough_logits(hf_folder: Path, config: Path, out: Path) -> np.ndarray:
    """Logits of the checkpoint mergekit's passthrough would write: layer k of the merge is the config's k-th layer."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    weights = {key: value for file in sorted(hf_folder.glob("*.safetensors")) for key, value in load_file(file).items()}
    merged = {key: value for key, value in weights.items() if not key.startswith("model.layers.")}
    for k, layer in enumerate(slices_path(config)):
        prefix = f"model.layers.{layer}."
        merged.update({f"model.layers.{k}.{key[len(prefix):]}": value.clone() for key, value in weights.items() if key.startswith(prefix)})
    out.mkdir()
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    config_json = json.loads((hf_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config_json, "num_hidden_layers": len(slices_path(config))}))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


@pytest.mark.parametrize("name", PATHS)
def test_the_configs_slices_are_the_path_the_routed_graph_runs(llama_folder, name, tmp_path):
    _, source = llama_folder
    config, out = tmp_path / "merge.yml", tmp_path / "applied"
    assert main(["apply", str(source), *PATHS[name], "--out", str(out), "--mergekit", str(config)]) == 0
    data = yaml.safe_load(config.read_text())
    assert {s["sources"][0]["model"] for s in data["slices"]} == {read_manifest(source)["source"]}  # the HF folder exported
    assert data["dtype"] == "float32"  # as the checkpoint's config.json says
    assert slices_path(config) == executed_path(out / "model.onnx") == executed_path(out / "with_past/model.onnx")
    ids = np.array([IDS], dtype=np.int64)
    routed = Runner(out / "model.onnx").run(ids, np.ones_like(ids), ["logits"])["logits"][0]
    assert np.abs(passthrough_logits(Path(read_manifest(source)["source"]), config, tmp_path / "merged") - routed).max() < 1e-4


def test_apply_and_lm_eval_take_a_users_self_merge_config(llama_folder, tmp_path):
    _, source = llama_folder
    config = tmp_path / "rys.yaml"
    config.write_text("""# a self-merge in the RYS style: layers 1-2 again
slices:
- sources:
  - model: my/base-model
    layer_range: [0, 3]
- sources:
  - {model: my/base-model, layer_range: [1, 3]}
merge_method: passthrough
dtype: bfloat16
""")
    assert read_config(config, 3) == [0, 1, 2, 1, 2]
    assert main(["apply", str(source), "--path", str(config), "--out", str(tmp_path / "out")]) == 0
    assert read_manifest(tmp_path / "out")["layer_path"] == "0..2,1..2"
    pytest.importorskip("lm_eval")
    from cp_onnx.lm_eval_backend import CpOnnxLM

    assert CpOnnxLM(model=str(source), path=str(config)).layer_path == "0..2,1..2"


BAD = {
    "linear": ("slices:\n- sources:\n  - {model: a, layer_range: [0, 3]}\nmerge_method: linear\n", "only passthrough configs"),
    "scaled": ("slices:\n- sources:\n  - {model: a, layer_range: [0, 3], parameters: {scale: 0.5}}\nmerge_method: passthrough\n",
               "sets parameters (weight scales)"),
    "two models": ("slices:\n- sources:\n  - {model: a, layer_range: [0, 2]}\n- sources:\n  - {model: b, layer_range: [1, 3]}\n"
                   "merge_method: passthrough\n", "takes layers from 2 different models"),
    "reversed": ("slices:\n- sources:\n  - {model: a, layer_range: [2, 1]}\nmerge_method: passthrough\n", "0 <= first < end"),
    "too far": ("slices:\n- sources:\n  - {model: a, layer_range: [0, 4]}\nmerge_method: passthrough\n", "the model has 3 layers"),
    "two sources": ("slices:\n- sources:\n  - {model: a, layer_range: [0, 3]}\n  - {model: a, layer_range: [0, 3]}\nmerge_method: passthrough\n",
                    "needs exactly one source"),
    "alias": ("base: &m {model: a, layer_range: [0, 3]}\nslices:\n- sources: [*m]\nmerge_method: passthrough\n", "uses a YAML alias"),
    "deep": ("slices: " + "[" * 5000 + "]" * 5000 + "\nmerge_method: passthrough\n", "nested deeper"),
    "broken": ("slices: [\n  - {model: a\n", "is not valid YAML"),
    "list": ("- 1\n- 2\n", "is not a mapping"),
    "huge": ("# " + "x" * 300_000 + "\n", "more than a passthrough config needs"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_are_one_line_errors(llama_folder, case, tmp_path, capsys):
    text, message = BAD[case]
    config = tmp_path / "bad.yml"
    config.write_text(text)
    assert main(["apply", str(llama_folder[1]), "--path", str(config), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("cp-onnx: error:") and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_config_needs_a_checkpoint_name_when_the_source_is_not_a_hf_folder(llama_folder, tmp_path, capsys):
    onnx_file = tmp_path / "bare" / "model.onnx"  # a bare graph: no manifest, so no checkpoint is known
    onnx_file.parent.mkdir()
    shutil.copy(llama_folder[1] / "model.onnx", onnx_file)
    assert main(["apply", str(onnx_file), "--duplicate", "1:3", "--mergekit", str(tmp_path / "m.yml")]) == 2
    assert "name it with --mergekit-model" in capsys.readouterr().err
    assert main(["apply", str(onnx_file), "--duplicate", "1:3", "--mergekit", str(tmp_path / "m.yml"), "--mergekit-model", "org/base"]) == 0
    assert slices_path(tmp_path / "m.yml") == [0, 1, 2, 1, 2] and yaml.safe_load((tmp_path / "m.yml").read_text())["dtype"] == "bfloat16"
    with pytest.raises(CpOnnxError, match="does not end in .yml"):
        from cp_onnx.outputs.mergekit import write_config

        write_config([0, 1], "org/base", tmp_path / "m.txt")
