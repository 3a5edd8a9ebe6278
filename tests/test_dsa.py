"""DSA pieces on their own: sparse equals dense when k covers the context, the caches, the bad-input errors,
the warm-up loss trains only the indexer, the cost formulas, and the benchmark end to end."""

import matplotlib
import pytest
import torch
from transformers import DeepseekV32Config

from helpers.dsa import (
    LightningIndexer,
    SparseLatentAttention,
    SparseLatentCache,
    gather_tokens,
    sparse_absorbed_attention,
)
from helpers.dsa import bench as bench_dsa
from helpers.dsa.cost import cost_table, decode_cost
from helpers.dsa.warmup import indexer_kl_loss, topk_recall
from helpers.mla import MultiHeadLatentAttention, absorbed_attention
from helpers.utils import seed_everything

SIZES = dict(hidden_size=48, n_heads=3, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=7,
             q_lora_rank=24, index_n_heads=4, index_head_dim=8)


def layer_with(topk):
    seed_everything(0)
    return SparseLatentAttention(**SIZES, index_topk=topk)


def decode(layer, x, prefill, **kw):
    cache = SparseLatentCache()
    outs = [layer(x[:, :prefill], cache, **kw)] + [layer(x[:, t:t + 1], cache, **kw) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("topk", [9, 50])
def test_sparse_equals_dense_when_k_covers_the_context(topk):
    layer = layer_with(topk)
    x = torch.randn(2, 9, SIZES["hidden_size"])
    with torch.no_grad():
        dense = layer(x, sparse=False)
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
        got, cache = decode(layer, x, 4)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        # the dense path is exactly the MLA layer it extends
        mla = MultiHeadLatentAttention(**{k: v for k, v in SIZES.items() if not k.startswith("index")}, absorb=True)
        mla.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("indexer.")})
        torch.testing.assert_close(mla(x), dense, atol=1e-6, rtol=1e-6)
    assert cache.length == cache.indexer.length == 9
    assert cache.indexer.k.shape == (2, 9, SIZES["index_head_dim"])
    per_token = (SIZES["kv_lora_rank"] + SIZES["qk_rope_head_dim"] + SIZES["index_head_dim"]) * 4
    assert cache.nbytes() == 2 * 9 * per_token


def test_sparse_differs_from_dense_when_k_is_small_and_decode_equals_prefill():
    layer = layer_with(3)
    x = torch.randn(2, 10, SIZES["hidden_size"])
    with torch.no_grad():
        full, idx, valid = layer(x, return_indices=True)
        assert (full - layer(x, sparse=False)).abs().max() > 1e-3
        torch.testing.assert_close(decode(layer, x, 5)[0], full, atol=1e-5, rtol=1e-5)
    # causal: no query selects a future token it may use; the first queries have fewer than k valid slots
    assert idx.shape == (2, 10, 3)
    assert (idx[valid] <= torch.arange(10)[None, :, None].expand_as(idx)[valid]).all()
    assert valid[:, 0].sum(-1).eq(1).all() and valid[:, 3:].all()


def test_sparse_attention_is_absorbed_attention_on_the_gathered_tokens():
    g = torch.Generator().manual_seed(3)
    b, t, s, h, d_n, d_r, d_v, d_c, k = 2, 3, 8, 2, 5, 4, 6, 7, 4
    q_nope, q_rope = torch.randn(b, t, h, d_n, generator=g), torch.randn(b, t, h, d_r, generator=g)
    c_kv, k_rope = torch.randn(b, s, d_c, generator=g), torch.randn(b, s, d_r, generator=g)
    w_uk, w_uv = torch.randn(h, d_n, d_c, generator=g), torch.randn(h, d_v, d_c, generator=g)
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    got = sparse_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, 0.3, idx, torch.ones(b, t, k, dtype=torch.bool))
    for bi in range(b):
        for ti in range(t):
            sel = idx[bi, ti]
            want = absorbed_attention(q_nope[bi:bi + 1, ti:ti + 1], q_rope[bi:bi + 1, ti:ti + 1], c_kv[bi:bi + 1, sel],
                                      k_rope[bi:bi + 1, sel], w_uk, w_uv, 0.3, start_pos=k - 1)
            torch.testing.assert_close(got[bi, ti], want[0, 0])
    assert gather_tokens(c_kv, idx).shape == (b, t, k, d_c)


@pytest.mark.parametrize("change, field", [
    (dict(index_topk=0), "index_topk"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(index_n_heads=-1), "index_n_heads"),
])
def test_bad_settings_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        SparseLatentAttention(**{**SIZES, "index_topk": 4, **change})


def test_bad_calls_say_what_is_wrong():
    layer = layer_with(4)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="SparseLatentCache"):
        from helpers.mla import LatentCache
        layer(torch.randn(1, 3, SIZES["hidden_size"]), LatentCache())
    with pytest.raises(ValueError, match="index_head_dim"):
        LightningIndexer(16, 8, 2, 4, 6)


def test_warmup_gradients_reach_only_the_indexer_and_training_raises_recall():
    layer = layer_with(4)
    x = torch.randn(2, 16, SIZES["hidden_size"])
    loss = indexer_kl_loss(layer, x)
    loss.backward()
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert loss.item() > 0
    before = topk_recall(layer, x)
    opt = torch.optim.Adam(layer.indexer.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        indexer_kl_loss(layer, x).backward()
        opt.step()
    assert indexer_kl_loss(layer, x).item() < loss.item()
    assert topk_recall(layer, x) > before


def test_cost_at_v32_sizes():
    config = DeepseekV32Config()
    c = decode_cost(config, 131072)
    # dense: 2 n_h S (d_c + d_r) + 2 n_h S d_c; sparse: the same with S = k = 2048
    assert c["dense_flops"] == 2 * 128 * 131072 * (512 + 64) + 2 * 128 * 131072 * 512
    assert c["sparse_flops"] == c["dense_flops"] * 2048 / 131072
    assert c["indexer_bytes"] == 131072 * (128 + 4) and c["dense_bytes"] == 131072 * 576 * 2
    assert c["dsa_flops"] < c["dense_flops"] / 10
    assert decode_cost(config, 1024)["sparse_flops"] == decode_cost(config, 1024)["dense_flops"]  # k >= S
    assert "131072" in cost_table(config)


def test_crossover_interpolates_and_handles_the_edges():
    dense = {1024: 10.0, 2048: 20.0, 4096: 40.0}
    assert bench_dsa.crossover({"MLA dense": dense, "DSA": {1024: 20.0, 2048: 20.0, 4096: 20.0}}) == 2048
    assert bench_dsa.crossover({"MLA dense": dense, "DSA": {c: 2 * m for c, m in dense.items()}}) is None
    assert bench_dsa.crossover({"MLA dense": dense, "DSA": {c: m / 2 for c, m in dense.items()}}) == 1024


def test_dsa_bench_runs_end_to_end_and_its_saved_file_draws(tmp_path, capsys):
    matplotlib.use("Agg")
    path = tmp_path / "dsa.json"
    bench_dsa.main(["--small", "--topk", "8", "--contexts", "8", "32", "--repeats", "1", "--warmup", "0",
                    "--threads", "1", "--save", str(path)])
    assert "crossover" in capsys.readouterr().out
    saved = bench_dsa.load_saved(path)
    assert saved["contexts"] == [8, 32] and set(saved["medians_ms"]) == set(bench_dsa.VARIANTS)
    assert bench_dsa.plot_decode(saved).get_title()
