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
