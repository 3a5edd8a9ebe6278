"""The replication planner, the traffic counts and the layout (no processes needed)."""

import pytest
import torch

from helpers.parallel import ExpertLayout
from helpers.parallel.planner import expert_nodes, imbalance, plan_replication, rank_loads
from helpers.parallel.traffic import nodes_per_token, random_routing, routing_traffic, v3_at_scale

SKEWED = torch.tensor([900.0, 40, 35, 500, 30, 20, 25, 300, 10, 15, 12, 8, 60, 45, 5, 3])


@pytest.mark.parametrize("n_redundant", [0, 4, 8])
def test_every_expert_placed_and_load_conserved(n_redundant):
    layout = plan_replication(SKEWED, n_ranks=4, n_redundant=n_redundant, ranks_per_node=2)
    assert set(layout.slot_experts().tolist()) == set(range(16))
    assert layout.n_slots == 16 + n_redundant
    torch.testing.assert_close(rank_loads(layout, SKEWED).sum(), SKEWED.double().sum())
    assert all(len(set(rank)) == len(rank) for rank in layout.slots)


def test_replication_evens_a_skewed_load():
    plain = imbalance(rank_loads(ExpertLayout.contiguous(16, 4), SKEWED))
    packed = imbalance(rank_loads(plan_replication(SKEWED, 4), SKEWED))
    replicated = imbalance(rank_loads(plan_replication(SKEWED, 4, n_redundant=4), SKEWED))
    assert replicated <= packed <= plain
    assert replicated < 0.8 * plain


def test_a_hot_expert_gets_copies_on_different_ranks():
    layout = plan_replication(SKEWED, 4, n_redundant=4)
    assert layout.replica_counts()[0] >= 2
    assert sum(0 in rank for rank in layout.slots) == layout.replica_counts()[0]


def test_ranks_onto_nodes_balances_the_nodes():
    layout = plan_replication(SKEWED, 4, n_redundant=4, ranks_per_node=2)
    per_rank = rank_loads(layout, SKEWED)
    nodes = per_rank.view(2, 2).sum(1)
    assert imbalance(nodes) <= imbalance(per_rank) + 1e-9


@pytest.mark.parametrize(("kwargs", "field"), [(dict(n_ranks=3, n_redundant=0), "n_redundant"),
                                                (dict(n_ranks=4, n_redundant=-4), "n_redundant"),
                                                (dict(n_ranks=4, ranks_per_node=3), "ranks_per_node")])
def test_impossible_plans_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        plan_replication(SKEWED, **kwargs)


def test_routing_traffic_counts_by_hand():
    layout = ExpertLayout.contiguous(8, 4)  # rank r holds experts 2r, 2r+1; nodes of 2 ranks
    indices = torch.tensor([[0, 1], [0, 7], [2, 5]])  # from rank 0: own rank; own + node 1; rank 1 + rank 2
    stats = routing_traffic(indices, layout, src_rank=0, ranks_per_node=2)
    assert stats["ranks"] == pytest.approx(5 / 3)
    assert stats["nodes"] == pytest.approx(5 / 3)
    assert stats["rows_off_rank"] == pytest.approx(3 / 3)
    assert stats["rows_off_node"] == pytest.approx(2 / 3)
    assert stats["nodes_off_node"] == pytest.approx(2 / 3)


def test_node_limited_routing_caps_the_nodes_per_token():
    layout = ExpertLayout.contiguous(64, 16)
    limited = random_routing(500, 64, 6, n_group=4, topk_group=2, seed=1)
    free = random_routing(500, 64, 6, seed=1)
    assert nodes_per_token(limited, layout, ranks_per_node=4).max() <= 2
    assert nodes_per_token(free, layout, ranks_per_node=4).max() > 2


def test_v3_at_scale_at_most_four_nodes():
    free, limited = v3_at_scale(n_tokens=512)
    assert sum(limited["nodes_hist"][5:]) == 0 and sum(free["nodes_hist"][5:]) > 0
    assert limited["bytes_off_node"] < free["bytes_off_node"]
    assert sum(free["nodes_hist"]) == 512


def test_layout_validation():
    with pytest.raises(ValueError, match="slots of rank 1"):
        ExpertLayout(4, ((0, 1), (2, 2)))
    with pytest.raises(ValueError, match="slots of rank 0"):
        ExpertLayout(4, ((0, 9), (2, 3)))


def test_one_rank_needs_no_process_group():
    """With one rank the dispatcher moves nothing: the layer is DeepSeekMoE in one process, gradients included."""
    from helpers.moe import DeepSeekMoE
    from helpers.parallel import ExpertParallelMoE

    torch.manual_seed(0)
    moe = DeepSeekMoE(16, 8, 6, 2, n_shared_experts=1, n_group=3, topk_group=2)
    ep = ExpertParallelMoE.from_moe(moe)
    x = torch.randn(2, 5, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = moe(x1), ep(x2)
    torch.testing.assert_close(y2, y1, atol=1e-6, rtol=0)
    upstream = torch.randn_like(y1)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=0)
    for name in ("gate_weight", "w_gate_up", "w_down"):
        torch.testing.assert_close(getattr(ep, name).grad, getattr(moe, name).grad, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the hierarchical (node-aware) plan

@pytest.mark.parametrize(("n_ranks", "ranks_per_node", "n_group", "n_redundant"), [(4, 2, 2, 4), (4, 2, 4, 4),
                                                                                    (8, 4, 4, 8), (8, 2, 8, 0)])
def test_hierarchical_plan_keeps_every_copy_on_its_groups_node(n_ranks, ranks_per_node, n_group, n_redundant):
    layout = plan_replication(SKEWED, n_ranks, n_redundant, ranks_per_node, n_group=n_group)
    assert layout.n_slots == 16 + n_redundant and set(layout.slot_experts().tolist()) == set(range(16))
    nodes = expert_nodes(layout, ranks_per_node)
    assert all(len(n) == 1 for n in nodes), nodes
    size = 16 // n_group
    for g in range(n_group):  # a whole group on one node
        assert len({nodes[e][0] for e in range(g * size, (g + 1) * size)}) == 1
    torch.testing.assert_close(rank_loads(layout, SKEWED).sum(), SKEWED.double().sum())


def test_global_plan_may_split_an_expert_over_nodes_and_break_the_node_limit():
    load = torch.tensor([10.0, 400, 380, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    spread = plan_replication(load, 4, n_redundant=4, ranks_per_node=2)
    assert any(len(n) > 1 for n in expert_nodes(spread, 2))
    kept = plan_replication(load, 4, n_redundant=4, ranks_per_node=2, n_group=2)
    indices = random_routing(300, 16, 4, n_group=2, topk_group=1, seed=3)  # every token on one group = node
    assert nodes_per_token(indices, kept, 2).max() == 1
    assert nodes_per_token(indices, spread, 2).max() == 2


def test_hierarchical_plan_balances_the_nodes_when_each_holds_several_groups():
    layout = plan_replication(SKEWED, 4, n_redundant=4, ranks_per_node=2, n_group=4)
    per_node = rank_loads(layout, SKEWED).view(2, 2).sum(1)
    group_loads = SKEWED.view(4, 4).sum(1)  # 1475, 375, 45, 113; two groups per node
    best = group_loads.max() + group_loads.min()  # the heaviest group shares its node with the lightest
    assert per_node.max().item() == pytest.approx(best.item())


@pytest.mark.parametrize(("kwargs", "field"), [(dict(n_group=3), "n_group"), (dict(n_group=2, ranks_per_node=1), "n_group"),
                                                (dict(n_group=4, ranks_per_node=1), "n_redundant")])
def test_impossible_hierarchical_plans_name_the_field(kwargs, field):
    args = dict(n_ranks=4, n_redundant=4, ranks_per_node=2) | kwargs
    with pytest.raises(ValueError, match=field):
        plan_replication(SKEWED, **args)
