"""LayerStatistics against a naive one-text-at-a-time implementation, and tiny cases worked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cp_onnx.analysis.stats import STAT_NAMES, LayerStatistics
from cp_onnx.errors import CpOnnxError

LAYERS, HIDDEN, HEADS = 3, 8, 2


def random_texts(rng, count, min_len=2, max_len=7):
    """Per text: unpadded resid_in, resid_out [layers][n, hidden] and causal patterns [layers][heads, n, n]."""
    texts = []
    for _ in range(count):
        n = int(rng.integers(min_len, max_len + 1))
        resid_in = [rng.normal(size=(n, HIDDEN)) * (layer + 1) for layer in range(LAYERS)]
        resid_out = [x + rng.normal(size=(n, HIDDEN)) for x in resid_in]
        logits = rng.normal(size=(LAYERS, HEADS, n, n)) + np.triu(np.full((n, n), -np.inf), 1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        texts.append((resid_in, resid_out, list(probs / probs.sum(-1, keepdims=True))))
    return texts


def naive_stats(texts):
    """The statistics of METHOD.md computed literally: one text at a time, plain loops, no padding."""
    out = {name: np.zeros(LAYERS) for name in STAT_NAMES}
    for layer in range(LAYERS):
        changes, sims, growths, entropies, outputs, change_vectors = [], [], [], [], [], []
        for i, (resid_in, resid_out, patterns) in enumerate(texts):
            a, b = resid_in[layer].mean(axis=0), resid_out[layer].mean(axis=0)
            changes.append(math.sqrt(sum((bi - ai) ** 2 for ai, bi in zip(a, b))))
            norm_a, norm_b = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            sims.append(sum(ai * bi for ai, bi in zip(a, b)) / (norm_a * norm_b))
            if norm_a > 1e-8:
                growths.append(norm_b / norm_a)
            rows = [
                -sum(max(p, 1e-10) * math.log(max(p, 1e-10)) for p in row)
                for head in patterns[layer] for row in head
            ]
            entropies.append(sum(rows) / len(rows))
            outputs.append(b)
            if i < 50:
                change_vectors.append(b - a)
        out["representation_change"][layer] = np.mean(changes)
        out["self_similarity"][layer] = np.mean(sims)
        out["norm_growth"][layer] = np.mean(growths)
        out["attention_entropy"][layer] = np.mean(entropies)
        out["cross_example_variance"][layer] = np.mean(np.var(np.stack(outputs), axis=0))
        if len(change_vectors) >= 5:
            s = np.linalg.svd(np.stack(change_vectors), compute_uv=False)
            p = s / (s.sum() + 1e-10)
            p = p[p > 1e-10]
            out["representation_rank"][layer] = math.exp(-sum(p * np.log(p)))
    first_in, first_out, _ = texts[0]
    for layer in range(LAYERS - 1):
        b0, b1 = first_out[layer].mean(axis=0), first_out[layer + 1].mean(axis=0)
        out["forward_similarity"][layer] = b0 @ b1 / (np.linalg.norm(b0) * np.linalg.norm(b1))
    return out


def padded_batch(texts, side, rng):
    """Pad texts to one length on `side`; pad positions hold garbage (NaN, huge values) that must be ignored."""
    seq = max(t[0][0].shape[0] for t in texts)
    mask = np.zeros((len(texts), seq), dtype=np.int64)
    resid_in = [np.full((len(texts), seq, HIDDEN), np.nan, dtype=np.float32) for _ in range(LAYERS)]
    resid_out = [np.full((len(texts), seq, HIDDEN), 1e30, dtype=np.float32) for _ in range(LAYERS)]
    patterns = [np.full((len(texts), HEADS, seq, seq), np.nan, dtype=np.float32) for _ in range(LAYERS)]
    for i, (t_in, t_out, t_pat) in enumerate(texts):
        n = t_in[0].shape[0]
        where = slice(0, n) if side == "right" else slice(seq - n, seq)
        mask[i, where] = 1
        for layer in range(LAYERS):
            resid_in[layer][i, where] = t_in[layer]
            resid_out[layer][i, where] = t_out[layer]
            # Valid query rows put probability 0 on pad keys, as a masked softmax does.
            patterns[layer][i, :, where] = 0.0
            patterns[layer][i, :, where, where] = t_pat[layer]
    if rng.random() < 0.5:  # integer and boolean masks both work
        mask = mask.astype(bool)
    return resid_in, resid_out, mask, patterns


def as_float32(texts):
    """The texts rounded to float32, as a model would produce them (the naive version then sees the same numbers)."""
    return [tuple([x.astype(np.float32).astype(np.float64) for x in part] for part in text) for text in texts]


def collect(texts, chunks, side, rng, with_patterns=True):
    stats = LayerStatistics(LAYERS)
    start = 0
    for size in chunks:
        resid_in, resid_out, mask, patterns = padded_batch(texts[start : start + size], side, rng)
        stats.add_batch(resid_in, resid_out, mask, patterns if with_patterns else None)
        start += size
    assert start == len(texts)
    return stats.result()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("count, chunks", [(12, [12]), (12, [1, 4, 2, 5]), (57, [20, 1, 30, 6])])
def test_batched_padded_matches_one_text_at_a_time(side, count, chunks):
    rng = np.random.default_rng(count + len(chunks))
    texts = as_float32(random_texts(rng, count))
    got = collect(texts, chunks, side, rng)
    expected = naive_stats(texts)
    assert set(got) == set(STAT_NAMES)
    for name in STAT_NAMES:
        assert got[name].dtype == np.float64 and got[name].shape == (LAYERS,)
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert expected["forward_similarity"][-1] == got["forward_similarity"][-1] == 0.0


def test_rank_needs_five_texts_and_entropy_needs_patterns():
    rng = np.random.default_rng(1)
    texts = as_float32(random_texts(rng, 4))
    got = collect(texts, [2, 2], "left", rng, with_patterns=False)
    # The reference leaves the rank at its default, 0.0, below 5 texts (METHOD.md item 6).
    np.testing.assert_array_equal(got["representation_rank"], np.zeros(LAYERS))
    assert np.isnan(got["attention_entropy"]).all()
    np.testing.assert_allclose(got["representation_change"], naive_stats(texts)["representation_change"], rtol=1e-9)


def test_pooled_statistics_by_hand():
    # One layer, hidden 2. Text 1: x = [[1,0],[3,0]] -> a = [2,0]; y = [[2,2],[4,2]] -> b = [3,2].
    #   change |[1,2]| = sqrt 5; cos = 6 / (2 sqrt 13) = 3 / sqrt 13; growth sqrt 13 / 2.
    # Text 2 (one position, right-padded to 2): a = [0,0] (skipped for growth), b = [5,2]:
    #   change sqrt 29; cos 0 (torch clamps the zero norm at 1e-8).
    # variance across texts of b: dims (3,5) -> 1, (2,2) -> 0; mean 0.5.
    stats = LayerStatistics(1)
    resid_in = [np.array([[[1, 0], [3, 0]], [[0, 0], [7, 7]]], dtype=np.float32)]
    resid_out = [np.array([[[2, 2], [4, 2]], [[5, 2], [7, 7]]], dtype=np.float32)]
    stats.add_batch(resid_in, resid_out, np.array([[1, 1], [1, 0]]))
    got = stats.result()
    assert got["representation_change"][0] == pytest.approx((math.sqrt(5) + math.sqrt(29)) / 2)
    assert got["self_similarity"][0] == pytest.approx(3 / math.sqrt(13) / 2)
    assert got["norm_growth"][0] == pytest.approx(math.sqrt(13) / 2)
    assert got["cross_example_variance"][0] == pytest.approx(0.5)
    assert got["forward_similarity"][0] == 0.0


def test_forward_similarity_uses_the_first_text_only():
    # Layer outputs of the first text pool to [1,0], [1,1], [0,1]: cos 1/sqrt2, 1/sqrt2, then 0 for the last layer.
    stats = LayerStatistics(3)
    outs = [np.array([[[1, 0]], [[9, -3]]]), np.array([[[1, 1]], [[-2, 5]]]), np.array([[[0, 1]], [[4, 4]]])]
    stats.add_batch([np.ones((2, 1, 2))] * 3, outs, np.ones((2, 1)))
    stats.add_batch([np.ones((1, 1, 2))] * 3, [np.array([[[1.0, -1.0]]])] * 3, np.ones((1, 1)))
    np.testing.assert_allclose(stats.result()["forward_similarity"], [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])


def test_uniform_attention_rows_have_entropy_log_n_over_valid_keys():
    # A 4-token text left-padded to 6, every valid row uniform over its 4 valid keys: entropy log 4
    # (not log 6: pad keys and pad query rows do not count). A 6-token text likewise gives log 6.
    pattern = np.zeros((2, 3, 6, 6))
    pattern[0, :, 2:, 2:] = 1 / 4
    pattern[0, :, :2, :] = 1 / 6  # pad query rows: ignored
    pattern[1] = 1 / 6
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    stats = LayerStatistics(1)
    stats.add_batch([np.ones((2, 6, 4))], [np.ones((2, 6, 4))], mask, [pattern])
    assert stats.result()["attention_entropy"][0] == pytest.approx((math.log(4) + math.log(6)) / 2)


def test_rank_of_orthogonal_and_parallel_changes_by_hand():
    # Five texts whose change vectors are e_1..e_5 (equal norms): singular values all 1, p = 1/5, rank 5.
    # Five texts with the same change e_1: one singular value, p = [1], rank exp(0) = 1.
    def rank_of(changes):
        stats = LayerStatistics(1)
        for change in changes:
            stats.add_batch([np.zeros((1, 3, 6))], [np.tile(change, (1, 3, 1))], np.ones((1, 3)))
        return stats.result()["representation_rank"][0]

    assert rank_of(np.eye(6)[:5]) == pytest.approx(5, rel=1e-8)
    assert rank_of([np.eye(6)[0]] * 5) == pytest.approx(1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activation_at_a_valid_position_names_the_layer(bad):
    rng = np.random.default_rng(2)
    resid_in, resid_out, mask, patterns = padded_batch(as_float32(random_texts(rng, 3)), "left", rng)
    resid_out[1][2, -1, 3] = bad  # the last position is valid for every left-padded text
    stats = LayerStatistics(LAYERS)
    with pytest.raises(CpOnnxError, match=r"^layer 1 produced NaN/Inf activations \(blocks\.1\.resid_out\); "):
        stats.add_batch(resid_in, resid_out, mask, patterns)
    assert stats.num_texts == 0  # a rejected batch leaves no trace
    resid_in[2] = resid_out[1]  # in a real model layer 1's output is layer 2's input: still blamed on layer 1
    with pytest.raises(CpOnnxError, match=r"^layer 1 produced NaN/Inf activations \(blocks\.1\.resid_out\); "):
        stats.add_batch(resid_in, resid_out, mask, patterns)
    resid_in[0][0, -1, 0] = bad
    with pytest.raises(CpOnnxError, match=r"^layer 0 received NaN/Inf activations \(blocks\.0\.resid_in\); "):
        stats.add_batch(resid_in, resid_out, mask, patterns)
    resid_in[0][0, -1, 0] = 0.0
    patterns[2][0, 1, -1, -1] = np.nan
    resid_out[1][2, -1, 3] = 0.0
    with pytest.raises(CpOnnxError, match=r"blocks\.2\.attn\.pattern"):
        stats.add_batch(resid_in, resid_out, mask, patterns)


def test_bad_input_is_rejected_with_a_clear_message():
    stats = LayerStatistics(2)
    ok = [np.zeros((1, 3, 4))] * 2
    with pytest.raises(CpOnnxError, match="no calibration texts"):
        stats.result()
    with pytest.raises(CpOnnxError, match="got 1 resid_out tensors for a 2-layer model"):
        stats.add_batch(ok, ok[:1], np.ones((1, 3)))
    with pytest.raises(CpOnnxError, match=r"blocks\.1\.resid_in has shape \(1, 2, 4\), expected \(1, 3, 4\)"):
        stats.add_batch([ok[0], np.zeros((1, 2, 4))], ok, np.ones((1, 3)))
    with pytest.raises(CpOnnxError, match="text 0 of the batch has no valid position"):
        stats.add_batch(ok, ok, np.zeros((1, 3)))
    stats.add_batch(ok, ok, np.ones((1, 3)))
    with pytest.raises(CpOnnxError, match="for some batches and not others"):
        stats.add_batch(ok, ok, np.ones((1, 3)), [np.ones((1, 2, 3, 3))] * 2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_texts_added_out_of_order_with_positions_match_calibration_order(side):
    # 57 texts (more than the 50 the rank uses), added in a shuffled order in uneven batches, each
    # batch saying where its texts stand: "first text" and "first 50" must still mean calibration order.
    rng = np.random.default_rng(7)
    texts = as_float32(random_texts(rng, 57))
    order = rng.permutation(len(texts))
    stats = LayerStatistics(LAYERS)
    start = 0
    for size in (9, 1, 30, 17):
        members = order[start : start + size]
        resid_in, resid_out, mask, patterns = padded_batch([texts[i] for i in members], side, rng)
        stats.add_batch(resid_in, resid_out, mask, patterns, positions=members.tolist())
        start += size
    got, expected = stats.result(), naive_stats(texts)
    for name in STAT_NAMES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
