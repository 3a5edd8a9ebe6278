"""What notebooks 10, 12 and 13 build step by step equals ``helpers.moe`` and ``transformers``."""

import math

import pytest
import torch
from nbload import load_notebook

from helpers import moe
from helpers.configs import deepseek_v3, mixtral_8x7b, tiny_config
from helpers.hf import moe_from_hf
from helpers.moe import checks as moe_checks


@pytest.fixture(scope="module")
def nb10():
    return load_notebook("10_moe_from_dense_to_experts.ipynb")


@pytest.fixture(scope="module")
def nb12():
    return load_notebook("12_deepseekmoe_fine_grained_shared_routing.ipynb")




def same_sets(a, b):
    torch.testing.assert_close(moe_checks.sort_routing(a), moe_checks.sort_routing(b), atol=1e-5, rtol=0)


def random_init(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1]))
    return module


# ---------------------------------------------------------------------------------- notebook 10

def test_nb10_swiglu_router_and_loop_equal_helpers(nb10):
    torch.manual_seed(0)
    ffn = nb10.SwiGLU(16, 24)
    ref = moe.SwiGLU(16, 24)
    ref.load_state_dict(ffn.state_dict())
    u = torch.randn(11, 16)
    torch.testing.assert_close(ffn(u), ref(u))
    logits = torch.randn(11, 8)
    for k in (1, 2, 3):
        same_sets(nb10.route_topk(logits, k), moe.route(logits, scoring_func="softmax", top_k=k, norm_topk_prob=True))
    experts = moe_checks.make_experts(8, 16, 24, seed=0)
    gate_weight = torch.randn(8, 16)
    with torch.no_grad():
        loop = nb10.moe_loop(u, gate_weight, experts, 2)
        torch.testing.assert_close(loop, nb10.moe_every_expert_then_mask(u, gate_weight, experts, 2), atol=1e-5, rtol=0)
        weights, indices = moe.route(u @ gate_weight.T, scoring_func="softmax", top_k=2, norm_topk_prob=True)
        torch.testing.assert_close(loop, moe.dispatch(u, weights, indices, *moe_checks.stack_experts(experts)),
                                   atol=1e-5, rtol=0)


def test_nb10_loop_equals_transformers_mixtral_block(nb10):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    h, i, e, k = 16, 24, 8, 2
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                                                num_experts_per_tok=k, experts_implementation="eager")).eval()
    random_init(block)
    experts = []
    for w_gate_up, w_down in zip(block.experts.gate_up_proj, block.experts.down_proj):
        expert = moe.SwiGLU(h, i)
        expert.load_state_dict({"w_gate.weight": w_gate_up[:i], "w_up.weight": w_gate_up[i:], "w_down.weight": w_down})
        experts.append(expert)
    u = torch.randn(2, 7, h)
    with torch.no_grad():
        ours = nb10.moe_loop(u.view(-1, h), block.gate.weight, experts, k)
        torch.testing.assert_close(ours, block(u).view(-1, h), atol=1e-5, rtol=0)


def test_nb10_cost_formula_matches_real_layers(nb10):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    with torch.device("meta"):
        v3 = DeepseekV3MoE(deepseek_v3())
        mixtral = MixtralSparseMoeBlock(mixtral_8x7b())
    assert sum(p.numel() for p in v3.parameters()) == nb10.ffn_costs(7168, 2048, 256, 8, n_shared=1)["total"]
    assert sum(p.numel() for p in mixtral.parameters()) == nb10.ffn_costs(4096, 14336, 8, 2)["total"]
    layer = moe.DeepSeekMoE(32, 16, 8, 2, n_shared_experts=2)
    assert sum(p.numel() for p in layer.parameters()) == nb10.ffn_costs(32, 16, 8, 2, n_shared=2)["total"]


# ---------------------------------------------------------------------------------- notebook 12

@pytest.mark.parametrize("n_group, topk_group, top_k", [(4, 2, 2), (4, 1, 2), (1, 1, 3), (8, 3, 4)])
def test_nb12_routers_equal_helpers(nb12, n_group, topk_group, top_k):
    torch.manual_seed(n_group * 10 + top_k)
    logits, bias = 2 * torch.randn(20, 16), 0.3 * torch.randn(16)
    same_sets(nb12.route_v3(logits, bias, top_k, n_group, topk_group, 2.5),
              moe.route(logits, scoring_func="sigmoid", top_k=top_k, n_group=n_group, topk_group=topk_group,
                        norm_topk_prob=True, routed_scaling_factor=2.5, bias=bias))
    same_sets(nb12.route_v2(logits, top_k, n_group, topk_group, 16.0),
              moe.route(logits, scoring_func="softmax", top_k=top_k, n_group=n_group, topk_group=topk_group,
                        norm_topk_prob=False, routed_scaling_factor=16.0))


def test_nb12_layer_equals_helpers_and_transformers(nb12):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(1)
    config = tiny_config("v3")
    hf = random_init(DeepseekV3MoE(config)).eval()
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts))
    layer = moe_from_hf(hf).eval()
    experts = []
    for w_gate_up, w_down in zip(layer.w_gate_up, layer.w_down):
        expert = moe.SwiGLU(layer.hidden_size, layer.moe_intermediate_size)
        w_gate, w_up = w_gate_up.chunk(2)
        expert.load_state_dict({"w_gate.weight": w_gate, "w_up.weight": w_up, "w_down.weight": w_down})
        experts.append(expert)
    routing = dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                   routed_scaling_factor=config.routed_scaling_factor)
    x = torch.randn(3, 9, config.hidden_size)
    flat = x.view(-1, config.hidden_size)
    with torch.no_grad():
        _, w, idx = hf.gate(flat)
        same_sets(nb12.route_v3(flat @ layer.gate_weight.T, layer.bias, **routing), (w, idx))
        ours = nb12.moe_forward(flat, layer.gate_weight, layer.bias, experts, layer.shared_experts, **routing)
        torch.testing.assert_close(ours, layer(x).view(-1, config.hidden_size), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, hf(x).view(-1, config.hidden_size), atol=1e-5, rtol=0)

        config_v2 = tiny_config("v2", routed_scaling_factor=16.0)
        hf_v2 = random_init(DeepseekV2Moe(config_v2)).eval()
        _, w, idx = hf_v2.gate(flat)
        same_sets(nb12.route_v2(flat @ hf_v2.gate.weight.T, config_v2.num_experts_per_tok, config_v2.n_group,
                                config_v2.topk_group, 16.0), (w, idx))


# ---------------------------------------------------------------------------------- notebook 13



