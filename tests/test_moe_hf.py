"""Our DeepSeekMoE equals transformers' DeepseekV3MoE / DeepseekV2Moe, both conversion directions."""

import pytest
import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from helpers.configs import tiny_config
from helpers.moe import DeepSeekMoE
from helpers.moe.hf import moe_from_hf, moe_to_hf

# (version, overrides); tiny_config's defaults: 8 experts, top-2, 1 shared, n_group 4, topk_group 2
CONFIGS = {
    "v3 groups, norm on, scale 2.5": ("v3", {}),
    "v3 groups, norm off, no shared": ("v3", dict(norm_topk_prob=False, n_shared_experts=0)),
    "v3 8 groups top-3, two shared, top-4": ("v3", dict(n_routed_experts=16, n_group=8, topk_group=3,
                                                         num_experts_per_tok=4, n_shared_experts=2)),
    "v3 one group, scale 1": ("v3", dict(n_group=1, topk_group=1, routed_scaling_factor=1.0)),
    "v2 group-limited, scale 16": ("v2", dict(routed_scaling_factor=16.0)),
    "v2 greedy, two shared, no shared groups": ("v2", dict(topk_method="greedy", n_shared_experts=2)),
    "v2 greedy, no shared": ("v2", dict(topk_method="greedy", n_shared_experts=0, routed_scaling_factor=0.5)),
}


def random_hf_moe(version, **overrides):
    """A transformers MoE block with random weights large enough that routing is far from uniform."""
    config = tiny_config(version, **overrides)
    module = (DeepseekV3MoE if version == "v3" else DeepseekV2Moe)(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)
        if version == "v3":
            module.gate.e_score_correction_bias.normal_(std=0.3)  # non-zero: changes the choice
    return module


def sorted_routing(weights, indices):
    """Routing as sets: expert ids sorted per token, weights permuted alongside."""
    indices, order = indices.sort(dim=-1)
    return weights.gather(-1, order), indices


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    version, overrides = CONFIGS[request.param]
    hf = random_hf_moe(version, **overrides)
    return hf, moe_from_hf(hf), torch.randn(3, 9, hf.config.hidden_size)


def test_from_hf_matches_output_and_routed_sets(pair):
    hf, ours, x = pair
    got = ours(x)
    torch.testing.assert_close(got, hf(x), atol=1e-5, rtol=1e-5)
    _, hf_weights, hf_indices = hf.gate(x)
    want_w, want_i = sorted_routing(hf_weights, hf_indices)
    got_w, got_i = sorted_routing(ours.last_stats.weights, ours.last_stats.indices)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)


def test_to_hf_round_trip(pair):
    hf, ours, x = pair
    back = moe_to_hf(ours)
    assert type(back) is type(hf)
    torch.testing.assert_close(back(x), hf(x), atol=1e-5, rtol=1e-5)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_to_hf_from_a_fresh_layer():
    torch.manual_seed(1)
    ours = DeepSeekMoE(64, 32, 8, 3, n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    ours.bias.normal_(std=0.1)
    hf = moe_to_hf(ours)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(hf(x), ours(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(hf.gate.e_score_correction_bias, ours.bias)


def test_grouped_mm_path_matches():
    """transformers' grouped_mm experts path works on this CPU torch and computes the same layer."""
    torch.manual_seed(2)
    ours = DeepSeekMoE(64, 32, 8, 2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    config = tiny_config("v3", n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    hf = moe_to_hf(ours, config)
    assert hf.experts.config._experts_implementation == "grouped_mm"
    x = torch.randn(2, 6, 64)
    torch.testing.assert_close(hf(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(scoring_func="softmax", norm_topk_prob=True), "norm_topk_prob"),
    (dict(scoring_func="sigmoid", group_score="max"), "group_score"),
])
def test_to_hf_refuses_what_transformers_cannot_express(kwargs, field):
    ours = DeepSeekMoE(64, 32, 8, 2, **kwargs)
    with pytest.raises(ValueError, match=field):
        moe_to_hf(ours)


def test_to_hf_refuses_a_mismatched_config():
    ours = DeepSeekMoE(64, 32, 8, 2, n_shared_experts=1, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        moe_to_hf(ours, tiny_config("v3"))  # tiny config has routed_scaling_factor 2.5


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="DeepseekV3MoE"):
        moe_from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("version", ["v3", "v32", "v2"])
def test_from_config_reads_transformers_field_names(version):
    config = tiny_config(version, routed_scaling_factor=2.0, n_shared_experts=0)
    layer = DeepSeekMoE.from_config(config)
    assert (layer.hidden_size, layer.moe_intermediate_size, layer.n_routed_experts, layer.top_k) == (
        config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok)
    assert layer.n_shared_experts == 0 and layer.shared_experts is None and layer.routed_scaling_factor == 2.0
    if version == "v2":
        assert (layer.scoring_func, layer.group_score, layer.norm_topk_prob) == ("softmax", "max", False)
    else:
        assert (layer.scoring_func, layer.group_score, layer.norm_topk_prob) == ("sigmoid", "top2_sum",
                                                                                config.norm_topk_prob)
    assert (layer.n_group, layer.topk_group) == (config.n_group, config.topk_group)
    assert layer.backend == "auto" and layer.balancing.gamma == 0


def test_from_config_maps_v2_greedy_to_one_group_and_takes_the_backend_and_balancing():
    from helpers.moe import Balancing

    layer = DeepSeekMoE.from_config(tiny_config("v2", topk_method="greedy"))
    assert (layer.n_group, layer.topk_group) == (1, 1)
    config = tiny_config("v3")
    config.moe_backend = "sorted"
    assert DeepSeekMoE.from_config(config).backend == "sorted"
    assert DeepSeekMoE.from_config(config, backend="reference").backend == "reference"  # the argument wins
    layer = DeepSeekMoE.from_config(config, balancing=Balancing(gamma=0.01, seq_aux_loss_alpha=1e-4))
    assert (layer.gamma, layer.aux_loss_alpha, layer.seq_aux_loss_alpha) == (0.01, 0.0, 1e-4)


def _bf16_pair():
    torch.manual_seed(0)
    hf = random_hf_moe("v3", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    hf.config._experts_implementation = "eager"
    ours = moe_from_hf(hf)
    return hf.to(torch.bfloat16), ours.to(torch.bfloat16), torch.randn(2, 64, hf.config.hidden_size)


# bf16 keeps 8 mantissa bits: one rounding is up to 2**-8 ~ 4e-3 relative to the value rounded. The output sums
# terms as large as the largest output (these random weights give outputs up to ~50, where one bf16 step is 0.25)
# and the two layers round in a different order (gating values times rows, index_add, the shared experts), so an
# element can be off by a step or two of the *largest* value even where it is small itself: we measured ~5e-3 of
# the largest output. The tolerance is 2**-6 ~ 1.6e-2 of it (four steps). A router computed in bf16 instead of
# fp32 picks other experts for tokens whose scores nearly tie: off by ~0.5 of the largest output (measured),
# caught below.
def assert_close_bf16(got, want):
    torch.testing.assert_close(got, want, atol=2**-6 * want.abs().max().item(), rtol=0)


def test_layer_equals_transformers_eager_experts_in_bf16():
    hf, ours, x = _bf16_pair()
    with torch.no_grad():
        got, want = ours(x.bfloat16()), hf(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close_bf16(got, want)


def test_the_bf16_tolerance_would_catch_a_router_in_bf16(monkeypatch):
    import helpers.moe.layer as moe_layer
    import helpers.moe.routing as moe_routing

    hf, ours, x = _bf16_pair()
    for module in (moe_layer, moe_routing):
        monkeypatch.setattr(module, "compute_dtype", lambda dtype: dtype)  # no upcast: the router runs in bf16
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_close_bf16(ours(x.bfloat16()), hf(x.bfloat16()))


def test_layer_equals_transformers_eager_experts_in_fp32():
    hf, ours, x = _bf16_pair()
    hf, ours = hf.float(), ours.float()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)
