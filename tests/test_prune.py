"""Pruning on the tiny Llama: the methods' statistics and losses against torch, the greedy search, and `cp-onnx prune`
(layers gone from the graphs, heads from the weights) against torch with the same layers dropped and heads zeroed."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from cp_onnx.analysis.head_pruning import choose_heads
from cp_onnx.analysis.prune import predict_layers
from cp_onnx.models.generate import generate
from cp_onnx.models.model import open_model
from cp_onnx.models.runner import Runner
from exporters.manifest import read_manifest
from graph_passes import ablate, discover, graph_io, route
from support import SHOT_ITEMS, quiet, rel_err, repeated_layers, run

REASONING = ["Tom has 3 apples and buys 4 more, so he has 7.", "Half of 18 is 9, and 9 + 6 = 15 in all."]
GENERAL = ["The harbour was quiet in the early morning.", "Gulls circled over the nets while the boats came in."]


def torch_streams(hf, ids: list[int]) -> np.ndarray:
    """[layers + 1, seq, hidden]: the embedding and every decoder layer's output (hooks: the last one before the final norm)."""
    import torch

    found = []
    hooks = [layer.register_forward_hook(lambda m, a, out: found.append((out[0] if isinstance(out, tuple) else out)[0].double().numpy()))
             for layer in hf.model.layers]
    hooks.append(hf.model.embed_tokens.register_forward_hook(lambda m, a, out: found.insert(0, out[0].double().numpy())))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return np.stack(found)


def torch_nll(hf, token_lists: list[list[int]], kept: list[int]) -> float:
    """Mean next-token loss over all tokens of the texts, the model running only the ``kept`` layers."""
    import torch

    total = count = 0.0
    with repeated_layers(hf, "llama", kept), torch.no_grad():
        for ids in token_lists:
            logprobs = torch.log_softmax(hf(torch.tensor([ids]), use_cache=False).logits[0].double(), dim=-1)
            total -= sum(logprobs[p - 1, ids[p]].item() for p in range(1, len(ids)))
            count += len(ids) - 1
    return total / count


def test_statistics_losses_and_greedy_choices_match_torch(llama_folder):
    hf, folder = llama_folder
    model = open_model(folder)
    found = predict_layers(model, REASONING, GENERAL, max_layers=2)
    encode = lambda text: model.encode([text])[0][0]  # noqa: E731
    streams = [torch_streams(hf, encode(t)) for t in REASONING + GENERAL]
    unit = [s / np.linalg.norm(s, axis=-1, keepdims=True) for s in streams]
    cosines = np.concatenate([np.einsum("lsd,lsd->ls", u[:-1], u[1:]) for u in unit], axis=1)
    np.testing.assert_allclose(found.per_layer["block_influence"], 1 - cosines.mean(axis=1), atol=1e-5)
    for n in (1, 2):
        distance = {l: np.mean([np.arccos(np.clip(u[l, -1] @ u[l + n, -1], -1, 1)) / np.pi for u in unit]) for l in range(4 - n)}
        start = min(distance, key=lambda l: (distance[l], l))
        chosen = found.choices["angular_distance"][n]
        assert chosen.layers == tuple(range(start, start + n)) and chosen.score == pytest.approx(distance[start], abs=1e-5)
        lowest = tuple(sorted(np.argsort(1 - cosines.mean(axis=1), kind="stable")[:n]))
        assert found.choices["block_influence"][n].layers == lowest
    groups = {"reasoning": [encode(t) for t in REASONING], "general": [encode(t) for t in GENERAL],
              **{f"reasoning/{i}": [encode(t)] for i, t in enumerate(REASONING)}}  # the default's two held-out halves: a text each
    nll = {removed: {g: torch_nll(hf, ids, [l for l in range(3) if l not in removed]) for g, ids in groups.items()}
           for removed in [(), *combinations(range(3), 1), *combinations(range(3), 2)]}
    tokens = {g: sum(len(ids) - 1 for ids in groups[g]) for g in groups}
    for values in nll.values():
        values["all"] = sum(values[g] * tokens[g] for g in ("reasoning", "general")) / (tokens["reasoning"] + tokens["general"])
    for g in ("reasoning", "general", "all"):
        assert found.base_nll[g] == pytest.approx(nll[()][g], abs=1e-4)

    def greedy(group: str) -> dict[int, tuple[int, ...]]:
        first = min(((l,) for l in range(3)), key=lambda r: (nll[r][group], r))
        return {1: first, 2: min((tuple(sorted((*first, l))) for l in range(3) if l not in first), key=lambda r: (nll[r][group], r))}

    def block(group: str, n: int) -> tuple[int, ...]:
        return min((tuple(range(s, s + n)) for s in range(4 - n)), key=lambda r: (nll[r][group], r))

    for n in (1, 2):
        sleb = found.choices["sleb"][n]
        assert sleb.layers == greedy("general")[n] and sleb.nll["general"] == pytest.approx(nll[greedy("general")[n]]["general"], abs=1e-4)
        # The default: each search picks on one text and is scored on the other; the lower held-out loss wins and picks on both.
        held_out = {search: sum(nll[pick(part)][other] for part, other in (("reasoning/0", "reasoning/1"), ("reasoning/1", "reasoning/0")))
                    for search, pick in (("block", lambda g: block(g, n)), ("greedy", lambda g: greedy(g)[n]))}
        search = min(held_out, key=held_out.get)
        expected = block("reasoning", n) if search == "block" else greedy("reasoning")[n]
        chosen = found.choices["removal_loss"][n]
        assert found.searches[n] == search and chosen.layers == expected
        assert chosen.nll["reasoning"] == pytest.approx(nll[expected]["reasoning"], abs=1e-4)
    ranked = [(b.start, b.end) for b in found.blocks["removal_loss"]]
    assert ranked == sorted(ranked, key=lambda b: nll[tuple(range(*b))]["reasoning"])


def test_choose_heads_keeps_a_head_in_every_layer():
    scores = np.array([[0.1, 0.0, 0.3], [0.05, 0.2, 0.01], [0.9, 0.8, 0.7]])
    assert choose_heads(scores, 3) == {0: [1], 1: [0, 2]}
    assert choose_heads(scores, 5) == {0: [0, 1], 1: [0, 2], 2: [2]}  # (1, 1) and (0, 2) would be their layers' last heads
    assert choose_heads(scores, 6) == {0: [0, 1], 1: [0, 2], 2: [1, 2]}
    assert choose_heads(scores, 2, skip_layers=[0]) == {1: [0, 2]}
    with pytest.raises(Exception, match="can remove at most 6 heads"):
        choose_heads(scores, 7)


def torch_pruned_logits(hf, ids: np.ndarray, kept_layers: list[int], heads: dict[int, list[int]]) -> np.ndarray:
    """transformers' logits running only ``kept_layers``, with the removed heads' o_proj columns zeroed."""
    import torch

    saved = {l: hf.model.layers[l].self_attn.o_proj.weight.clone() for l in heads}
    dim = hf.config.hidden_size // hf.config.num_attention_heads
    try:
        with torch.no_grad():
            for l, hs in heads.items():
                for h in hs:
                    hf.model.layers[l].self_attn.o_proj.weight[:, h * dim : (h + 1) * dim] = 0
            with repeated_layers(hf, "llama", kept_layers):
                return hf(torch.from_numpy(ids), use_cache=False).logits.numpy()
    finally:
        with torch.no_grad():
            for l, weight in saved.items():
                hf.model.layers[l].self_attn.o_proj.weight.copy_(weight)


def test_prune_writes_a_smaller_model_equal_to_torch_with_the_layers_dropped_and_heads_zeroed(llama_folder, tmp_path, capsys):
    hf, folder = llama_folder
    out = tmp_path / "pruned"
    code, stdout, _ = run(["prune", folder, "--skip", "1:2", "--heads", "3", "--out", out, "-n", "2", "--max-length", "32"], capsys)
    assert code == 0 and stdout.strip() == str(out)
    pruned = read_manifest(out)["pruned"]
    heads = {int(l): hs for l, hs in pruned["heads"].items()}
    assert pruned["layers"] == [1] and sum(map(len, heads.values())) == 3 and set(heads) <= {0, 2}
    assert read_manifest(out)["num_layers"] == 2 and read_manifest(out)["layer_path"] == "0,2"
    ids = np.array([[1, 40, 41, 42, 7, 80, 80, 3]])
    logits = Runner(out / "model.onnx").run(ids, np.ones_like(ids), ["logits"])["logits"]
    assert rel_err(logits, torch_pruned_logits(hf, ids, [0, 2], heads)) < 1e-4
    original = graph_io.load(folder / "model.onnx")
    ablated = ablate(original, discover(original), heads)
    expected = Runner(route(ablated, discover(ablated), [0, 2])).run(ids, np.ones_like(ids), ["logits"])["logits"]
    assert rel_err(logits, expected) < 1e-4
    for graph in ("model.onnx", "with_past/model.onnx"):
        assert (out / graph).stat().st_size < 0.8 * (folder / graph).stat().st_size
    model = open_model(out)
    _, cached = generate(model, "Hello there", 10, log=quiet)
    _, uncached = generate(model, "Hello there", 10, use_cache=False, log=quiet)
    prompt = model.encode(["Hello there"])[0][0]
    expected_ids, tokens = [], list(prompt)
    for _ in range(len(cached)):  # greedy decoding by torch, one full forward per token
        expected_ids.append(int(np.argmax(torch_pruned_logits(hf, np.array([tokens]), [0, 2], heads)[0, -1])))
        tokens.append(expected_ids[-1])
    assert cached == uncached == expected_ids and len(set(cached)) > 1


def test_prune_layers_by_a_method_and_its_refusals(llama_folder, tmp_path, capsys):
    _, folder = llama_folder
    out = tmp_path / "sleb"
    assert run(["prune", folder, "--layers", "1", "--method", "sleb", "-n", "2", "--max-length", "32", "--out", out], capsys)[0] == 0
    manifest = read_manifest(out)
    assert len(manifest["pruned"]["layers"]) == 1 and manifest["pruned"]["heads"] == {} and manifest["num_layers"] == 2
    for args, fragment in (([], "give what to remove"), (["--layers", "1", "--skip", "0:1"], "not both"),
                           (["--skip", "0:3"], "cannot remove layers [0, 1, 2] of this 3-layer model"),
                           (["--heads", "10", "-n", "1"], "can remove at most 9 heads")):
        target = tmp_path / "refused"
        code, _, err = run(["prune", folder, *args, "--out", target], capsys)
        line = err.strip().splitlines()[-1]
        assert code == 2 and line.startswith("cp-onnx: error: ") and fragment in line, line
        assert not target.exists()


def test_analyze_prune_sweep_skip_validate_and_report(llama_folder, tmp_path, capsys):
    import jsonschema

    from cp_onnx.analysis import report as report_mod
    from cp_onnx.groundtruth.probes import save_suite

    _, folder = llama_folder
    suite = save_suite(SHOT_ITEMS, tmp_path / "suite.jsonl")  # both regimes: zero-shot and few-shot
    args = ["-n", "2", "--max-length", "32", "--block-sizes", "1,2"]
    assert run(["analyze", folder, "--prune", "--heads", "--out", tmp_path / "report", *args], capsys)[0] == 0
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    jsonschema.validate(data, report_mod.schema())
    layers = data["pruning"]["layers"]
    assert set(layers["methods"]) == {"block_influence", "angular_distance", "sleb", "removal_loss"} and layers["num_layers"] == 3
    assert all(len(m["blocks"]) == 3 and [c["n"] for c in m["choices"]] == [1] for m in layers["methods"].values())  # L/4 rounds to 1 layer
    heads = data["pruning"]["heads"]["methods"]["head_ablation"]
    zero = {(r["layer"], r["head"]): r["loss_zero"] for r in data["heads"]["heads"]}
    assert [zero[(h["layer"], h["head"])] for h in heads["cheapest"]] == sorted(zero.values())[: len(heads["cheapest"])]
    code, out, _ = run(["sweep", folder, "--skip", "1", "--suite", suite, "--out", tmp_path / "skip.jsonl"], capsys)
    assert code == 0 and "zero_shot: best block removed" in out and "few_shot: best block removed" in out
    code, printed, _ = run(["validate", tmp_path / "report" / "report.json", tmp_path / "skip.jsonl", "--out", tmp_path / "validation"], capsys)
    assert code == 0 and printed.index("== zero_shot ==") < printed.index("== few_shot ==")
    result = json.loads((tmp_path / "validation" / "validation.json").read_text())
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["sweep_heatmap_few_shot.png", "sweep_heatmap_zero_shot.png", "validation.json"]
    lines = [json.loads(line) for line in (tmp_path / "skip.jsonl").read_text().splitlines()[1:]]
    for regime in ("zero_shot", "few_shot"):  # each regime judged on its own metrics
        rows = {(r["start"], r["end"]): r["regimes"][regime] for r in lines}
        for method, entry in result["regimes"][regime]["sizes"]["1"]["methods"].items():
            layer = layers["methods"][method]["choices"][0]["layers"][0]
            change = rows[(layer, layer + 1)]["answer_logprob"] - rows[(None, None)]["answer_logprob"]
            assert entry["answer_logprob"]["choice"]["gain"] == pytest.approx(change)
        best = result["regimes"][regime]["sizes"]["1"]["best"]["answer_logprob"]
        assert best["gain"] == max(r["answer_logprob"] for b, r in rows.items() if b[0] is not None) - rows[(None, None)]["answer_logprob"]
    code, text, _ = run(["report", tmp_path / "report" / "report.json", "--text"], capsys)
    assert code == 0 and "prune removal_loss 1 " in text and "prune_head head_ablation " in text
    code, summary, _ = run(["report", tmp_path / "report" / "report.json"], capsys)
    assert "pruning candidates" in summary and "cheapest heads (head_ablation)" in summary
    page = tmp_path / "page.html"
    assert run(["report", tmp_path / "report" / "report.json", "--html", page, "--sweep", tmp_path / "skip.jsonl"], capsys)[0] == 0
    assert "id='pruning'" in page.read_text() and "id='removals-zero_shot'" in page.read_text() and "id='removals-few_shot'" in page.read_text()


@pytest.mark.slow
def test_smollm2_pruned_matches_torch_and_zero_ablation_and_generates(smollm2_dir, smollm2_torch, tmp_path):
    """20% of SmolLM2's layers and heads of two layers (one whole key/value group, one split) gone from the written model."""
    from cp_onnx.models.apply import prune_folder
    from graph_passes.edit import Edit

    model = open_model(smollm2_dir)
    layers, heads = [3, 4, 5, 6, 7, 17], {12: [0, 1, 2], 20: [1, 5, 7]}
    edit = Edit.layers([l for l in range(30) if l not in layers]).with_heads(heads)
    out = prune_folder(model, edit, tmp_path / "pruned", log=quiet)
    # The file shrinks by the removed layers' float32 weights and the removed heads' slices of q and o (and of k
    # and v where a whole key/value group goes: layer 12's heads 0-2 are its group 0), counted from torch.
    config = smollm2_torch.config
    head_dim = config.hidden_size // config.num_attention_heads
    slice_bytes = 4 * head_dim * config.hidden_size  # one head's rows of q (or columns of o, or rows of k or v)
    removed = sum(4 * p.numel() for l in layers for p in smollm2_torch.model.layers[l].parameters())
    removed += sum(2 * len(hs) * slice_bytes for hs in heads.values()) + 2 * slice_bytes  # q and o per head; k and v of one group
    expected = model.onnx_path.stat().st_size - removed
    assert abs((out / "model.onnx").stat().st_size - expected) < 0.002 * expected
    kept = [l for l in range(30) if l not in layers]
    ids = np.array([model.encode(["The capital of France is"])[0][0]])
    logits = Runner(out / "model.onnx").run(ids, np.ones_like(ids), ["logits"])["logits"]
    assert rel_err(logits, torch_pruned_logits(smollm2_torch, ids, kept, heads)) < 1e-4
    original = graph_io.load(model.onnx_path)
    ablated = ablate(original, discover(original), heads)
    del original
    zeroed = Runner(route(ablated, discover(ablated), kept)).run(ids, np.ones_like(ids), ["logits"])["logits"]
    assert rel_err(logits, zeroed) < 1e-4
    text, new = generate(open_model(out), "The capital of France is", 6, use_cache=False, log=quiet)
    tokens, expected = list(ids[0]), []
    for _ in range(len(new)):
        expected.append(int(np.argmax(torch_pruned_logits(smollm2_torch, np.array([tokens]), kept, heads)[0, -1])))
        tokens.append(expected[-1])
    assert new == expected and text.strip()
