"""Multi-head Latent Attention (helpers/mla.py): RoPE, the latent cache, naive == absorbed, gradients, errors."""

import math
import pathlib

import pytest
import torch

from helpers.mla import (
    LatentCache,
    MultiHeadLatentAttention,
    absorbed_attention,
    apply_rope,
    naive_attention,
    rope_cos_sin,
)
from helpers.utils import seed_everything

NOTEBOOK_23 = "23_mla_weight_absorption.ipynb"


def tiny_mla(q_lora_rank=12, **kwargs):
    return MultiHeadLatentAttention(hidden_size=32, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=q_lora_rank, **kwargs)


def test_rope_cos_sin_shapes_and_values():
    cos, sin = rope_cos_sin(torch.arange(5), 8, base=100.0)
    assert cos.shape == sin.shape == (5, 4)
    angles = torch.arange(5.0)[:, None] / 100.0 ** (torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(5), 7)


def test_apply_rope_layouts():
    seed_everything(0)
    x = torch.randn(3, 5, 8)  # (B, T, d)
    cos, sin = rope_cos_sin(torch.arange(5), 8)
    # Interleaved pairs are complex numbers x0 + i x1 multiplied by e^{i theta} (DeepSeek-V2's formulation).
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))  # (T, d/2)
    want = torch.view_as_real(torch.view_as_complex(x.reshape(3, 5, 4, 2)) * rot).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin, interleave=True), want)
    # Halves: x * cos + rotate_half(x) * sin (Llama's formulation).
    c2, s2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], -1)
    torch.testing.assert_close(apply_rope(x, cos, sin, interleave=False), x * c2 + rotate_half * s2)
    # A heads axis after T: cos[:, None] broadcasts over it.
    xh = torch.randn(2, 5, 3, 8)  # (B, T, heads, d)
    got = apply_rope(xh, cos[:, None], sin[:, None])
    torch.testing.assert_close(got[:, :, 1], apply_rope(xh[:, :, 1], cos, sin))
    with pytest.raises(ValueError, match="twice"):
        apply_rope(torch.randn(5, 6), cos, sin)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_scores_depend_only_on_relative_position(interleave):
    seed_everything(1)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), 8)
        cn, sn = rope_cos_sin(torch.tensor([n]), 8)
        return (apply_rope(q[None], cm, sm, interleave) * apply_rope(k[None], cn, sn, interleave)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-4, rtol=1e-4)
    # Keeping the pair layout or de-interleaving into halves (transformers) gives the same score.
    cos, sin = rope_cos_sin(torch.tensor([5]), 8)
    qr, kr = apply_rope(q[None], cos, sin), apply_rope(k[None], cos, sin)
    halves = [torch.cat([t[..., 0::2], t[..., 1::2]], -1) for t in (qr, kr)]
    torch.testing.assert_close((qr * kr).sum(), (halves[0] * halves[1]).sum())


def test_latent_cache_holds_only_the_latent_and_rope_key():
    cache = LatentCache()
    for t in (4, 1, 1, 40):
        c_all, k_all = cache.append(torch.randn(2, t, 512), torch.randn(2, t, 64))
    assert cache.length == 46 and c_all.shape == (2, 46, 512) and k_all.shape == (2, 46, 64)
    assert cache.bytes_per_token() == (512 + 64) * 4  # (d_c + d_h^R) elements per token (V2 Table 1)
    assert cache.nbytes() == 2 * 46 * (512 + 64) * 4
    half = LatentCache()
    half.append(torch.zeros(1, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 3, 4, dtype=torch.bfloat16))
    assert half.bytes_per_token() == (16 + 4) * 2
    with pytest.raises(ValueError, match="B, T"):
        half.append(torch.zeros(3, 16), torch.zeros(3, 4))


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["no-q-compression", "q-compression"])
@pytest.mark.parametrize("interleave", [True, False])
def test_naive_equals_absorbed_and_cache_equals_recomputation(q_lora_rank, interleave):
    seed_everything(2)
    layer = tiny_mla(q_lora_rank, rope_interleave=interleave)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = layer(x)
        assert full.shape == x.shape
        torch.testing.assert_close(layer(x, absorb=True), full, atol=1e-5, rtol=1e-5)
        for absorb in (False, True):
            cache = LatentCache()
            chunks = [x[:, :5]] + [x[:, t:t + 1] for t in range(5, 7)] + [x[:, 7:]]  # prefill, decode, chunk
            got = torch.cat([layer(c, cache, absorb=absorb) for c in chunks], dim=1)
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
            assert cache.length == 9 and cache.c_kv.shape == (2, 9, 16) and cache.k_rope.shape == (2, 9, 4)


def test_absorb_attribute_selects_the_path():
    seed_everything(3)
    layer = tiny_mla()
    x = torch.randn(1, 4, 32)
    seen = []
    with torch.no_grad():
        for absorb_attr in (False, True):
            layer.absorb = absorb_attr
            seen.append(layer(x))
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)
    assert "absorb=True" in repr(layer)


def test_causal():
    seed_everything(4)
    layer = tiny_mla()
    x = torch.randn(1, 6, 32)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 3, 32)
    with torch.no_grad():
        for absorb in (False, True):
            torch.testing.assert_close(layer(x2, absorb=absorb)[:, :3], layer(x, absorb=absorb)[:, :3])


def test_attention_functions_match_a_direct_computation():
    """naive/absorbed attention == softmax attention over explicit keys [W^UK c; k^R] and values W^UV c."""
    seed_everything(5)
    b, t, s, h, dn, dr, dc, dv, start = 2, 3, 7, 4, 8, 4, 16, 6, 4
    q_nope, q_rope = torch.randn(b, t, h, dn), torch.randn(b, t, h, dr)
    c_kv, k_rope = torch.randn(b, s, dc), torch.randn(b, s, dr)
    w_uk, w_uv = torch.randn(h, dn, dc), torch.randn(h, dv, dc)
    scale = 1 / math.sqrt(dn + dr)
    k = torch.cat([torch.einsum("hdc,bsc->bhsd", w_uk, c_kv), k_rope[:, None].expand(b, h, s, dr)], -1)  # (b, h, s, dn+dr)
    v = torch.einsum("hdc,bsc->bhsd", w_uv, c_kv)  # (b, h, s, dv)
    q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)  # (b, h, t, dn+dr)
    allowed = torch.arange(s)[None, :] <= torch.arange(start, start + t)[:, None]  # (t, s)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(1, 2)
    for fn in (naive_attention, absorbed_attention):
        torch.testing.assert_close(fn(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale, start), want,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("absorb", [False, True])
def test_gradcheck_float64(absorb):
    seed_everything(6)
    layer = MultiHeadLatentAttention(8, 2, 4, 3, 2, 3, q_lora_rank=5, absorb=absorb).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    w = layer.wkv_b.weight
    assert torch.autograd.gradcheck(lambda w_: torch.func.functional_call(layer, {"wkv_b.weight": w_}, (x.detach(),)),
                                    (w.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("override,field", [
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(n_heads=-2), "n_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    (dict(v_head_dim=-1), "v_head_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_impossible_configs_raise(override, field):
    fields = dict(hidden_size=32, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    fields.update(override)
    with pytest.raises(ValueError, match=field):
        MultiHeadLatentAttention(**fields)


@pytest.mark.skipif(not (pathlib.Path(__file__).parent.parent / "notebooks" / NOTEBOOK_23).exists(),
                    reason="notebook 23 not written yet")
def test_notebook_23_absorbed_attention_equals_helpers():
    from nbload import load_notebook

    nb = load_notebook(NOTEBOOK_23)
    seed_everything(7)
    b, t, s, h, dn, dr, dc, dv = 2, 3, 9, 4, 8, 4, 16, 6
    args = dict(q_nope=torch.randn(b, t, h, dn), q_rope=torch.randn(b, t, h, dr), c_kv=torch.randn(b, s, dc),
                k_rope=torch.randn(b, s, dr), w_uk=torch.randn(h, dn, dc), w_uv=torch.randn(h, dv, dc),
                softmax_scale=0.3, start_pos=s - t)
    torch.testing.assert_close(nb.absorbed_attention(**args), absorbed_attention(**args), atol=1e-5, rtol=1e-5)
    args.update(q_nope=args["q_nope"][:, :1], q_rope=args["q_rope"][:, :1], start_pos=s - 1)
    torch.testing.assert_close(nb.absorbed_attention(**args), absorbed_attention(**args), atol=1e-5, rtol=1e-5)


def test_decode_benchmark_smoke():
    """The benchmark runs end to end on tiny sizes and measures bytes from the caches (no speed asserted)."""
    from helpers.mla.bench import SMALL_ATTENTION, VARIANTS, decode_benchmark, summary

    rows = decode_benchmark(SMALL_ATTENTION, contexts=(8, 16), repeats=1, warmup=0, verbose=False)
    assert [(r["context"], r["variant"]) for r in rows] == [(c, v) for c in (8, 16) for v in VARIANTS]
    per_token = {r["variant"]: r["bytes_per_token"] for r in rows}
    n_h, d_v = SMALL_ATTENTION["n_heads"], SMALL_ATTENTION["v_head_dim"]
    assert per_token["MHA"] == 2 * n_h * d_v * 4 and per_token["GQA"] == 2 * (n_h // 4) * d_v * 4
    assert per_token["MLA absorbed"] == (SMALL_ATTENTION["kv_lora_rank"] + SMALL_ATTENTION["qk_rope_head_dim"]) * 4
    assert "goal: MLA bytes/token" in summary(rows, SMALL_ATTENTION)


def test_diagrams_draw_what_they_claim():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.mla import causal_mask
    from helpers.mla.diagrams import draw_causal_mask, draw_mla_dataflow, plot_singular_values

    ax = draw_causal_mask(3, 7, 4)
    drawn = torch.as_tensor(ax.images[0].get_array().data)
    assert torch.equal(drawn.bool(), causal_mask(3, 7, 4))  # the picture is the real mask
    assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "5", "6"]  # rows at absolute positions
    plt.close("all")
    naive, absorbed = draw_mla_dataflow(), draw_mla_dataflow(absorb=True)
    labels = [[t.get_text() for t in a.get_legend().get_texts()] for a in (naive, absorbed)]
    assert "moved by absorption" not in " ".join(labels[0]) and "moved by absorption" in " ".join(labels[1])
    texts = " ".join(t.get_text() for t in absorbed.texts)
    assert "W^UK_i^T q^C" in texts and "never formed" in texts
    plt.close("all")
    ax = plot_singular_values({"a": torch.tensor([4.0, 2.0, 0.0]), "b": torch.tensor([1.0, 1.0, 1.0])}, d_c=2)
    assert len(ax.get_lines()) == 3 and ax.get_yscale() == "log"  # two spectra and the d_c line
    plt.close("all")
