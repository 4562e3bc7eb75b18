"""Edit: text and JSON round trips, the layer paths it runs (against layer_path and against paths built here by
hand), one-line errors for bad text and JSON, and routing a tiny model along its path."""
from __future__ import annotations

import dataclasses
import json

import pytest

from graph_passes import GraphPassError, discover, layer_path, run_passes
from graph_passes.edit import Edit
from graph_passes.prune_heads import prune_heads
from graph_passes.route import route

HEADS = {1: [3, 0], 4: [2]}


def blocks(num_layers: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(num_layers) for j in range(i + 1, num_layers + 1)]


def every_edit(num_layers: int) -> list[Edit]:
    """Every block duplicated or removed, a few layer paths, the baseline; each also with heads removed."""
    changes = [Edit()] + [Edit.duplicate(i, j) for i, j in blocks(num_layers)]
    changes += [Edit.skip(i, j) for i, j in blocks(num_layers) if j - i < num_layers]
    changes += [Edit.layers(path) for path in ([0], [num_layers - 1, 0], [0, 0, 1], list(range(num_layers))[::-1], [0, 2, 1, 2, 3])]
    return changes + [edit.with_heads({0: [1]}) for edit in changes]


def duplicated_by_hand(i: int, j: int, num_layers: int) -> list[int]:
    """Run the layers in order; after layer j-1 go back to i once."""
    path = []
    for layer in range(num_layers):
        path.append(layer)
        if layer == j - 1:
            path.extend(range(i, j))
    return path


def test_text_and_json_read_back_as_the_same_edit():
    for edit in every_edit(6):
        text = edit.format()
        assert Edit.parse(text) == edit, text
        assert Edit.parse(text).format() == text
        assert Edit.from_json(json.loads(json.dumps(edit.to_json()))) == edit, text


@pytest.mark.parametrize("text, json_form", [
    ("baseline", {}),
    ("12:15", {"duplicate": [12, 15]}),
    ("skip:12:15", {"skip": [12, 15]}),
    ("0..14,12..29", {"path": [*range(15), *range(12, 30)]}),
    ("2,0..1", {"path": [2, 0, 1]}),
    ("7", {"path": [7]}),
    ("heads:3.0,3.4,5.1", {"heads": {"3": [0, 4], "5": [1]}}),
    ("skip:12:15+heads:3.0,3.4", {"skip": [12, 15], "heads": {"3": [0, 4]}}),
    ("0..2,1..2+heads:1.0", {"path": [0, 1, 2, 1, 2], "heads": {"1": [0]}}),
])
def test_canonical_text_is_written_back_exactly_and_matches_its_json(text, json_form):
    edit = Edit.parse(text)
    assert edit.format() == text and str(edit) == text
    assert edit.to_json() == json_form and Edit.from_json(json_form) == edit


@pytest.mark.parametrize("typed, canonical", [
    (" 12 : 15 ", "12:15"),  # what `apply --duplicate` and lm-eval's duplicate= accept
    ("0..14,12..14,15..29", "0..14,12..29"),  # the community's spelling of the same path
    ("0..14,12,13,14,15..29", "0..14,12..29"),
    ("skip: 3 : 5", "skip:3:5"),
    ("heads: 5.1 , 3.4,3.0,3.4", "heads:3.0,3.4,5.1"),  # any order, repeats once
    ("heads:3.0+skip:1:2", "skip:1:2+heads:3.0"),
    ("baseline+heads:1.0", "heads:1.0"),
])
def test_other_spellings_read_as_their_canonical_edit(typed, canonical):
    assert Edit.parse(typed).format() == canonical


def test_paths_equal_layer_path_and_paths_built_by_hand_for_every_block():
    for num_layers in range(1, 7):
        for i, j in blocks(num_layers):
            assert Edit.duplicate(i, j).path(num_layers) == layer_path.duplicate(i, j, num_layers) == duplicated_by_hand(i, j, num_layers)
            assert Edit.parse(f"{i}:{j}").path(num_layers) == layer_path.parse_spec(f"{i}:{j}", num_layers)
            if j - i < num_layers:
                expected = [layer for layer in range(num_layers) if not i <= layer < j]
                assert Edit.skip(i, j).path(num_layers) == layer_path.skip(i, j, num_layers) == expected
        assert Edit().path(num_layers) == list(range(num_layers))


@pytest.mark.parametrize("text", ["0..5", "0..14,12..14,15..29", "3,2,1,0", "0..2,1,2", "29"])
def test_a_layer_path_runs_what_layer_path_parses(text):
    assert Edit.parse(text).path(30) == layer_path.parse_path(text, 30) == layer_path.parse_spec(text, 30)


def test_heads_go_with_any_layer_change_and_are_numbered_as_in_the_original():
    edit = Edit.parse("skip:2:4+heads:5.2,1.0")
    assert edit.path(6) == [0, 1, 4, 5]
    assert edit.heads_by_layer == {1: [0], 5: [2]}
    edit.check(6, num_heads=4)
    assert Edit.heads(HEADS) == Edit().with_heads(HEADS) == Edit.parse("heads:1.0,1.3,4.2")
    assert Edit.heads(HEADS).path(6) == list(range(6))  # heads only: every layer runs once
    assert Edit.duplicate(1, 3).with_heads(HEADS).with_heads({}) == Edit.duplicate(1, 3)


def test_equal_edits_compare_and_hash_equal_and_stay_as_built():
    assert len({Edit.parse("12:15"), Edit.duplicate(12, 15), Edit.from_json({"duplicate": [12, 15]})}) == 1
    assert Edit.heads({3: [4, 0, 0], 5: []}) == Edit.parse("heads:3.0,3.4")
    assert Edit.layers([0, 1]) != Edit() and Edit.duplicate(1, 2) != Edit.skip(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Edit.duplicate(1, 2).block = (0, 1)


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(GraphPassError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("text, bad", [
    ("", "nothing to read"),
    ("   ", "nothing to read"),
    ("12:", "'12:'"),
    ("15:12", "block 15:12 is empty"),
    ("-1:3", "'-1:3'"),
    ("skip:3", "'skip:3'"),
    ("skip:a:b", "'skip:a:b'"),
    ("dup:3:5", "'dup:3:5'"),
    ("3:5+4:6", "'4:6' is a second layer change"),
    ("heads:1.0+heads:2.0", "'heads:2.0' is a second heads: part"),
    ("12:15+", "empty part"),
    ("heads:", "'' is not a layer.head pair"),
    ("heads:3", "'3' is not a layer.head pair"),
    ("heads:3.x", "'3.x' is not a layer.head pair"),
    ("heads:3.0;3.1", "'3.0;3.1' is not a layer.head pair"),
    ("0..3,,4", "stray comma"),
    ("3..1", "'3..1' is a reversed range"),
    ("0..14;15", "'0..14;15' is not a layer number"),
    ("heads", "'heads' is not a layer number"),
])
def test_bad_text_is_refused_in_one_line_naming_it_with_an_example(text, bad):
    message = one_line_error(lambda: Edit.parse(text), f"edit {text!r}", bad)
    assert "e.g." in message


@pytest.mark.parametrize("data, bad", [
    ([12, 15], "not a list"),
    ("12:15", "not a str"),
    ({"dup": [1, 2]}, "key 'dup' is unknown"),
    ({"duplicate": [1]}, "duplicate [1] is not a pair"),
    ({"duplicate": "1:2"}, "duplicate is '1:2', not a list"),
    ({"duplicate": [1, 2], "skip": [1, 2]}, "duplicate and skip given together"),
    ({"skip": [2, 1]}, "block 2:1 is empty"),
    ({"duplicate": [True, 2]}, "block bound True"),
    ({"duplicate": [1.0, 2]}, "block bound 1.0"),
    ({"path": []}, "the layer path is empty"),
    ({"path": "0..3"}, "path is '0..3', not a list"),
    ({"path": [0, -1]}, "layer -1"),
    ({"heads": [1]}, "heads is a list"),
    ({"heads": {"x": [1]}}, "heads key 'x'"),
    ({"heads": {"3": 1}}, "heads['3'] is 1, not a list"),
    ({"heads": {"3": [-1]}}, "layer 3's head -1"),
])
def test_bad_json_is_refused_in_one_line_naming_it_with_an_example(data, bad):
    message = one_line_error(lambda: Edit.from_json(data), "edit JSON: ", bad)
    assert "e.g." in message


@pytest.mark.parametrize("build, bad", [
    (lambda: Edit.duplicate(3, 3), "block 3:3 is empty"),
    (lambda: Edit.skip(-1, 2), "block bound -1"),
    (lambda: Edit.layers([]), "the layer path is empty"),
    (lambda: Edit.layers([1.5]), "layer 1.5"),
    (lambda: Edit.heads({1: "0"}), "the heads of layer 1 are '0'"),
    (lambda: Edit.heads([(1, [0])]), "not a list"),
    (lambda: Edit("path"), "a path edit needs its layers"),
    (lambda: Edit("duplicate"), "a duplicate edit needs a block"),
    (lambda: Edit("baseline", block=(1, 2)), "a baseline edit takes no block"),
    (lambda: Edit("reverse"), "unknown edit kind 'reverse'"),
])
def test_constructors_refuse_what_is_not_an_edit(build, bad):
    one_line_error(build, bad, "e.g.")


@pytest.mark.parametrize("edit, num_heads, bad", [
    (Edit.duplicate(3, 9), None, "cannot duplicate block 3:9"),
    (Edit.skip(2, 9), None, "cannot remove block 2:9"),
    (Edit.skip(0, 6), None, "cannot remove all 6 layers"),
    (Edit.layers([0, 6]), None, "entry 6 is not a layer of this model"),
    (Edit.heads({6: [0]}), None, "layer 6 has no heads to remove"),
    (Edit.skip(2, 4).with_heads({3: [0]}), None, "layer 3 is removed, so are its heads"),
    (Edit.layers([0, 1]).with_heads({2: [0]}), None, "layer 2 is removed, so are its heads"),
    (Edit.heads({1: [4]}), 4, "head 4 does not exist"),
    (Edit.heads({1: [0, 1, 2, 3]}), 4, "removing all 4 heads of layer 1"),
])
def test_check_refuses_an_edit_the_model_cannot_take(edit, num_heads, bad):
    one_line_error(lambda: edit.check(6, num_heads), bad)
    if num_heads is None:
        one_line_error(lambda: edit.path(6), bad)


def test_routing_along_an_edit_equals_routing_along_layer_path(llama):
    model, layer_map = llama
    num_layers = layer_map.num_layers
    for i, j in blocks(num_layers):
        assert route(model, layer_map, Edit.duplicate(i, j).path(num_layers)).SerializeToString() == \
            route(model, layer_map, layer_path.duplicate(i, j, num_layers)).SerializeToString()
        if j - i < num_layers:
            assert route(model, layer_map, Edit.skip(i, j).path(num_layers)).SerializeToString() == \
                route(model, layer_map, layer_path.skip(i, j, num_layers)).SerializeToString()


def test_an_edits_passes_make_what_prune_makes(llama):
    model, layer_map = llama
    edit = Edit.parse("skip:1:2+heads:0.1,2.0,2.3")
    pruned = prune_heads(model, layer_map, {0: [1], 2: [0, 3]})
    expected = route(pruned, discover(pruned), [0, 2])  # cp-onnx prune's order: heads first, rediscover, then layers
    assert run_passes(model, layer_map, edit.passes(layer_map.num_layers)).SerializeToString() == expected.SerializeToString()
    assert Edit().passes(layer_map.num_layers) == []
