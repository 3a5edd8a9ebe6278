"""What notebooks 10 and 12 build step by step equals ``helpers.moe`` and ``transformers``; notebooks 10-12
keep nudges (not answers) in their exercises, answer keys for their open questions, and pictures drawn
from what they compute."""

import math

import pytest
import torch
from nbload import load_notebook

from helpers import moe
from helpers.configs import deepseek_v2, deepseek_v2_lite, deepseek_v3, mixtral_8x7b, tiny_config
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





# ------------------------------------------------------------------- notebooks 10-12: text and pictures

MOE_CORE = ("10_moe_from_dense_to_experts.ipynb", "11_moe_efficient_dispatch.ipynb",
            "12_deepseekmoe_fine_grained_shared_routing.ipynb")


def _cells(name):
    import nbformat
    from nbload import NOTEBOOKS

    return nbformat.read(NOTEBOOKS / name, as_version=4).cells


@pytest.mark.parametrize("name", MOE_CORE)
def test_exercise_hints_are_nudges_and_open_questions_have_answers(name):
    cells = _cells(name)
    for cell in cells:
        if cell.cell_type != "code" or "# BEGIN SOLUTION" not in cell.source:
            continue
        region = cell.source.split("# BEGIN SOLUTION")[1].split("# END SOLUTION")[0].splitlines()
        hints = [line.strip() for line in region if line.strip().startswith("# HINT:")]
        solution = [line.split("#")[0].strip() for line in region if line.strip() and not line.strip().startswith("#")]
        assert hints, "every exercise keeps a first nudge"
        for hint in hints:
            assert " = " not in hint and not any(code[:20] in hint for code in solution if len(code) > 12), hint
        assert any("show_hint()" in h for h in hints), "the nudge says where the full hint is"
    markdown = [c.source for c in cells if c.cell_type == "markdown"]
    asks = sum(("**Predict**" in m) + m.count("Why") + m.count("why?") for m in markdown)
    answers = sum(m.count("<!-- BEGIN ANSWER -->") for m in markdown)
    assert answers >= 2 and asks >= 1
    assert all(m.count("<!-- BEGIN ANSWER -->") == m.count("<!-- END ANSWER -->") for m in markdown)


def test_notebook_prose_states_the_facts_of_the_released_configs():
    text = {name: "\n".join(c.source for c in _cells(name) if c.cell_type == "markdown") for name in MOE_CORE}
    assert "analogy" in text[MOE_CORE[1]] and "all-to-all" in text[MOE_CORE[1]]
    assert "Optional: the speed story" in text[MOE_CORE[1]]
    assert "Counting matrix products is not counting FLOPs" in text[MOE_CORE[1]]
    assert "released configs" in text[MOE_CORE[2]] and "DeepSeekMoE (eq. 4) and DeepSeek-V2 keep" in text[MOE_CORE[0]]
    v2, v2_lite, v3 = deepseek_v2(), deepseek_v2_lite(), deepseek_v3()
    assert (v2.routed_scaling_factor, v2.norm_topk_prob) == (16.0, False)
    assert (v2_lite.routed_scaling_factor, v2_lite.norm_topk_prob) == (1.0, False)
    assert (v3.routed_scaling_factor, v3.norm_topk_prob) == (2.5, True)


def test_moe_diagrams_draw_what_the_notebooks_compute():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.moe import diagrams

    indices = torch.tensor([[0, 2], [2, 3], [3, 0], [2, 0], [0, 3], [3, 2]])
    ax = diagrams.draw_sorted_dispatch(indices, 4)
    texts = [t.get_text() for t in ax.texts]
    order, token, bounds = moe.sort_by_expert(indices, 4)
    sorted_boxes = [t for t in texts if t.startswith("p") and ": x[" in t]
    assert sorted_boxes == [f"p{p}: x[{t}]" for p, t in zip(order.tolist(), token.tolist())]
    assert "expert 0: 4 rows" in texts and "no rows: expert 1" in ax.get_xticklabels()[2].get_text()
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()

    weights, idx = moe.route(torch.randn(5, 8), scoring_func="softmax", top_k=3, norm_topk_prob=True)
    gates = diagrams.gates_from_routing(weights, idx, 8)
    assert gates.shape == (5, 8) and ((gates != 0).sum(-1) == 3).all()
    torch.testing.assert_close(gates.gather(1, idx), weights)
    fig = diagrams.draw_gating_matrix(torch.rand(5, 8), gates, n_group=2, kept_groups=torch.eye(5, 2, dtype=torch.bool))
    assert all(a.get_title() for a in fig.axes[:2])

    ax = diagrams.draw_expert_layouts(64, 256, 16, 2, 4, 1)
    labels = [t.get_text() for t in ax.texts]
    assert labels[0] == "activated 98,304 of 98,304 params"
    assert labels[1] == labels[2] == "activated 98,304 of 786,432 params"  # same activated and total
    plt.close("all")
