"""Our V4 attention equals transformers' DeepseekV4Attention for every layer type, in one pass and cached.

Every parameter is random (transformers' ``_init_weights`` zeros the sinks and position biases: a conversion
that skipped them would hide behind a zero). Batch 2; prompts shorter than one window and prompts that are no
multiple of either compression rate; 6 indexer heads (with 2, exact-zero score ties make top-k arbitrary).
"""

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention

from helpers.v4.attention import AUTO, CSA, HCA, LAYER_TYPES, SWA, V4_ATTENTION_BACKENDS, V4Attention
from helpers.v4.hf.attention import attention_from_hf, attention_to_hf, hf_attention_forward

RATES = {CSA: 4, HCA: 5}
BACKENDS = [*V4_ATTENTION_BACKENDS, AUTO]  # the registered attentions, and the layer's size-picked fast path


def v4_config(kind: str, **overrides) -> DeepseekV4Config:
    """A one-layer V4 config of type ``kind`` (the transformers mask reads the cache's first layer)."""
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, sliding_window=6, o_groups=2,
                  o_lora_rank=8, index_n_heads=6, index_head_dim=12, index_topk=3, compress_rates=dict(RATES),
                  layer_types=[kind], mlp_layer_types=["moe"], n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, scoring_func="sigmoid")
    fields.update(overrides)
    config = DeepseekV4Config(**fields)
    config._attn_implementation = "eager"
    return config


def random_hf(kind: str, seed: int = 0, **overrides) -> DeepseekV4Attention:
    """A transformers V4 attention with every parameter random (norm weights in [0.5, 1.5])."""
    hf = DeepseekV4Attention(v4_config(kind, **overrides), 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(("sinks", "position_bias")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return hf.eval()


def test_every_parameter_is_randomised_and_nonzero():
    hf = random_hf(CSA)
    for name, p in hf.named_parameters():
        assert p.abs().min() > 0 or p.numel() > 50, name
        assert p.std() > 0, name


@pytest.mark.parametrize("kind", LAYER_TYPES)
@pytest.mark.parametrize("length", [3, 23])  # shorter than one window; no multiple of 4, 5 or 6
def test_one_pass_equals_transformers(kind, length):
    hf = random_hf(kind)
    ours = attention_from_hf(hf)
    x = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_attention_forward(hf, x)
        for backend in BACKENDS:
            ours.backend = backend
            torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)


SCHEDULES = {  # chunk lengths: prefill, then chunks or single-token decode steps
    "prefill 7, chunk 1, chunk 5, 10 decode steps": [7, 1, 5] + [1] * 10,
    "prefill 3 (shorter than a window), 14 decode steps": [3] + [1] * 14,
    "token by token from the start": [1] * 13,
}


@pytest.mark.parametrize("kind", LAYER_TYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_cached_steps_equal_transformers_cached_path(kind, schedule):
    hf = random_hf(kind, seed=2)
    ours = attention_from_hf(hf)
    chunks = SCHEDULES[schedule]
    x = torch.randn(2, sum(chunks), 32, generator=torch.Generator().manual_seed(3))
    theirs_cache, outputs = DynamicCache(config=hf.config), {name: ours.new_cache() for name in BACKENDS}
    start = 0
    with torch.no_grad():
        for step in chunks:
            piece = x[:, start:start + step]
            want = hf_attention_forward(hf, piece, theirs_cache)
            for backend, cache in outputs.items():
                ours.backend = backend
                torch.testing.assert_close(ours(piece, cache), want, rtol=1e-5, atol=1e-5)
            start += step
    assert all(cache.length == x.shape[1] for cache in outputs.values())
    if kind != SWA:  # every closed window was compressed once, none more
        assert outputs["masked"].compressor.n_entries == x.shape[1] // RATES[kind]


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_cached_prefill_equals_one_pass(kind):
    ours = attention_from_hf(random_hf(kind, seed=4))
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache()
        steps = torch.cat([ours(x[:, :9], cache), *[ours(x[:, i:i + 1], cache) for i in range(9, 17)]], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_to_hf_round_trip(kind):
    ours = attention_from_hf(random_hf(kind, seed=6))
    fresh = DeepseekV4Attention(v4_config(kind), 0).eval()
    attention_to_hf(ours, fresh)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(hf_attention_forward(fresh, x), ours(x), rtol=1e-5, atol=1e-5)
    names = {n for n, _ in ours.named_parameters()}
    assert "sinks" in names and (kind == SWA or "compressor.position_bias" in names)
    assert (kind == CSA) == ("indexer.weights_proj.weight" in names)


def test_the_sinks_matter():
    """Random sinks change the output: a conversion that left them at zero would fail the comparisons above."""
    hf = random_hf(HCA, seed=8)
    ours = attention_from_hf(hf)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ours(x)
        ours.sinks.zero_()
        assert (ours(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("field, value, match", [
    ("index_topk", 0, "index_topk"),
    ("compress_rates", {CSA: 0, HCA: 5}, "compress_rates"),
    ("o_groups", 3, "o_groups"),
    ("index_head_dim", 6, "index_head_dim"),
])
def test_bad_config_names_the_field(field, value, match):
    config = v4_config(CSA)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        V4Attention.from_config(config, 0)


def test_unknown_layer_type_and_backend_are_refused():
    config = v4_config(SWA)
    config.layer_types = ["sliding_atention"]
    with pytest.raises(ValueError, match=r"layer_types\[0\].*did you mean 'sliding_attention'"):
        V4Attention.from_config(config, 0)
    with pytest.raises(ValueError, match="layer_idx"):
        V4Attention.from_config(v4_config(SWA), 1)
    with pytest.raises(ValueError, match="backend"):
        V4Attention.from_config(v4_config(SWA), 0, backend="flash")


@pytest.mark.parametrize("kind", [CSA, HCA])
def test_auto_decode_step_with_batch_one_equals_transformers(kind, monkeypatch):
    """The fast decode step (batch 1 reads its chosen entries with index_select) over many more entries than top-k."""
    hf = random_hf(kind, seed=10)
    ours = attention_from_hf(hf)
    ours.backend = AUTO
    steps = []
    monkeypatch.setattr(ours, "step", lambda x, cache: steps.append(1) or V4Attention.step(ours, x, cache))
    x = torch.randn(1, 42, 32, generator=torch.Generator().manual_seed(11))
    theirs, cache = DynamicCache(config=hf.config), ours.new_cache()
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, :30], cache), hf_attention_forward(hf, x[:, :30], theirs),
                                   rtol=1e-5, atol=1e-5)
        for t in range(30, 42):
            torch.testing.assert_close(ours(x[:, t:t + 1], cache), hf_attention_forward(hf, x[:, t:t + 1], theirs),
                                       rtol=1e-5, atol=1e-5)
    assert len(steps) == 12 and cache.compressor.n_entries == 42 // RATES[kind]


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_decode_steps_from_an_empty_cache_follow_weight_changes(kind):
    """Decode steps from the first token (windows closed by the step's one-window path, CSA's first entry with no
    overlap before it) equal transformers; a weight changed in place between steps is read (the step's stacked
    input matrix is rebuilt), and steps with gradients on give the same numbers."""
    hf = random_hf(kind, seed=13)
    ours = attention_from_hf(hf)
    ours.backend = AUTO
    x = torch.randn(1, 14, 32, generator=torch.Generator().manual_seed(14))
    theirs, cache = DynamicCache(config=hf.config), ours.new_cache()
    for t in range(14):
        if t == 9:  # every matrix the step stacks, changed in both models
            with torch.no_grad():
                for module in (ours, hf):
                    for name, p in module.named_parameters():
                        if name.endswith(("kv_proj.weight", "gate_proj.weight", "q_a_proj.weight", "weights_proj.weight")):
                            p.add_(0.05)  # not a scale: the norms after them would undo it
        with torch.set_grad_enabled(t >= 11):
            got = ours(x[:, t:t + 1], cache)
        with torch.no_grad():
            torch.testing.assert_close(got, hf_attention_forward(hf, x[:, t:t + 1], theirs), rtol=1e-5, atol=1e-5)


def test_complex_rotation_equals_the_pairwise_one():
    from helpers.v4.rope import rope_cos_sin, rope_phase, rotate_trailing, rotate_trailing_by

    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(12))
    cos, sin = rope_cos_sin(torch.tensor([300]), 8, 160000.0)
    phase = rope_phase(300, 8, 160000.0, x.device)
    torch.testing.assert_close(rotate_trailing_by(x, phase), rotate_trailing(x, cos, sin))
    torch.testing.assert_close(rotate_trailing_by(rotate_trailing_by(x, phase), phase.conj()), x)
    assert torch.equal(rotate_trailing_by(x, phase)[..., :8], x[..., :8])  # the leading channels are not rotated


def test_unknown_layer_backend_lists_auto():
    with pytest.raises(ValueError, match="'auto'"):
        V4Attention.from_config(v4_config(CSA), 0, backend="fast")
