"""The indexer's dense warm-up on the trained capstone model (helpers.dsa.warmup): the sparse layer built from a
capstone MLA layer is that layer, the whole model with sparse attention equals the dense one when k covers the
window, a short warm-up trains only the indexers and raises held-out recall, the recall curve for every k equals
the recall at each k, and the saved run is consistent."""

import json
import pathlib

import pytest
import torch

from helpers.dsa.warmup import (
    CHECKPOINT,
    attention_distribution,
    attention_inputs_of,
    capstone_text,
    indexer_kl_loss,
    indexer_log_probs,
    recall_curve,
    recent_order,
    recent_recall,
    sparse_from_mla,
    topk_recall,
    validation_loss,
    warm_up,
    with_sparse_attention,
)
from helpers.mla import MultiHeadLatentAttention
from helpers.model.hf import load_pretrained

INDEXER = dict(index_n_heads=4, index_head_dim=32)
SAVED = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "results" / "dsa_warmup.json"


@pytest.fixture(scope="module")
def capstone():
    return load_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def text():
    return capstone_text(seq_len=64, n_train=16, n_val=8, train_files=10)  # (16, 64) training, (8, 64) held out


@pytest.fixture(scope="module")
def windows(text):
    return text[1]


def test_sparse_layer_from_mla_is_the_same_attention(capstone, windows):
    mla = capstone.layers[1].attn
    layer = sparse_from_mla(mla, 8, **INDEXER)
    x = attention_inputs_of(capstone, windows[:2])[1]  # (2, 64, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, sparse=False), mla(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(x), mla(x), atol=1e-3)  # k = 8 < 64: the selection matters
    with pytest.raises(ValueError, match="q_lora_rank"):
        sparse_from_mla(MultiHeadLatentAttention(16, 2, 8, 4, 4, 4), 8, **INDEXER)


def test_sparse_model_equals_dense_when_k_covers_the_window(capstone, windows):
    w = windows[:3]  # (3, 64)
    layers = [sparse_from_mla(b.attn, 8, seed=i, **INDEXER) for i, b in enumerate(capstone.layers)]
    with torch.no_grad():
        dense = capstone(w)  # (3, 64, V)
        for mode in ("sparse", "recent"):
            torch.testing.assert_close(with_sparse_attention(capstone, layers, 64, mode)(w), dense,
                                       atol=1e-5, rtol=1e-5)
            assert not torch.allclose(with_sparse_attention(capstone, layers, 8, mode)(w), dense, atol=1e-3)
    assert validation_loss(with_sparse_attention(capstone, layers, 64), w) == pytest.approx(
        validation_loss(capstone, w), abs=1e-5)


def test_short_warm_up_trains_only_the_indexer_and_raises_held_out_recall(capstone, text):
    train_x, val_x = attention_inputs_of(capstone, text[0]), attention_inputs_of(capstone, text[1])
    for i, (train, held_out) in enumerate(zip(train_x, val_x)):  # (16, 64, H), (8, 64, H) per block
        layer = sparse_from_mla(capstone.layers[i].attn, 8, seed=i, **INDEXER)
        frozen = {k: v.clone() for k, v in layer.state_dict().items() if not k.startswith("indexer.")}
        kl_before, recall_before = indexer_kl_loss(layer, held_out).item(), topk_recall(layer, held_out, 8)
        losses = warm_up(layer, train, steps=40, batch_size=4, lr=3e-3)
        assert losses[-1] < losses[0]
        for k, v in layer.state_dict().items():
            if k in frozen:
                assert torch.equal(v, frozen[k]), f"{k} changed: the warm-up must train only the indexer"
        assert indexer_kl_loss(layer, held_out).item() < kl_before, f"layer {i}"
        assert topk_recall(layer, held_out, 8) > recall_before, f"layer {i}"


def test_recent_recall_counts_the_last_k_tokens():
    layer = sparse_from_mla(MultiHeadLatentAttention(16, 2, 8, 4, 4, 4, q_lora_rank=8), 4, 2, 4)
    x = torch.randn(2, 10, 16)
    assert recent_recall(layer, x, 10) == 1.0
    assert 0 < recent_recall(layer, x, 2) < recent_recall(layer, x, 5) < 1


def test_recall_curve_equals_the_recall_at_every_k():
    """recall_curve (the notebook's k slider) gives topk_recall for the indexer's order and recent_recall for the
    most-recent order, at every k; k >= T keeps everything."""
    torch.manual_seed(0)
    # 8 indexer heads: with 2, ReLU zeros tie many scores and top-k and argsort may break the ties differently
    layer = sparse_from_mla(MultiHeadLatentAttention(16, 2, 8, 4, 4, 4, q_lora_rank=8), 4, 8, 8)
    x = torch.randn(2, 10, 16)
    p = attention_distribution(layer, x)  # (2, 10, 10)
    with torch.no_grad():
        log_q = indexer_log_probs(layer, x)  # (2, 10, 10)
        visible = log_q.isfinite()
        assert all(len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(log_q.flatten(0, 1), visible.flatten(0, 1)))
        by_indexer = recall_curve(p, log_q.argsort(-1, descending=True))
    by_recency = recall_curve(p, recent_order(10, 10).expand_as(p))
    assert by_indexer.shape == (10,)
    for k in range(1, 11):
        assert abs(by_indexer[k - 1] - topk_recall(layer, x, k)) < 1e-6, k
        assert abs(by_recency[k - 1] - recent_recall(layer, x, k)) < 1e-6, k
    assert by_indexer[-1] == 1.0 and (by_recency.diff() >= -1e-6).all()
    assert recent_order(2, 4, start_pos=2).tolist() == [[2, 1, 0, 3], [3, 2, 1, 0]]


def test_saved_warm_up_is_consistent():
    saved = json.loads(SAVED.read_text())
    assert saved["checkpoint"]["path"] == "notebooks/results/tiny_deepseek_v3"
    for layer in saved["layers"]:
        for k in map(str, saved["topks"]):
            assert 0 < layer["recall"]["before"][k] <= 1 and 0 < layer["recall"]["after"][k] <= 1
        recall = [layer["recall"]["after"][str(k)] for k in saved["topks"]]
        assert recall == sorted(recall)  # a larger k keeps at least as much
    assert set(saved["val_loss"]) == {"dense", "trained", "random", "recent"}
