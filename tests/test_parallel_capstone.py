"""Traffic of the trained capstone's routing (helpers.parallel.capstone): counts by hand, the replayed router
equals the model's own choices, bad input, and the saved table."""

import json
import pathlib

import pytest
import torch

from helpers.model.hf import load_pretrained
from helpers.parallel.capstone import CHECKPOINT, capstone_traffic, moe_inputs, replay_routing, traffic_of
from helpers.parallel.layout import ExpertLayout

SAVED = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "results" / "traffic_capstone.json"


def test_traffic_counts_by_hand():
    layout = ExpertLayout.contiguous(4, 4)  # expert e on rank e; 2 ranks per node
    # 4 tokens, one per rank: rank 0 -> experts {0, 1} (home node), rank 1 -> {2, 3} (other node),
    # rank 2 -> {0, 2}, rank 3 -> {3, 2}
    indices = torch.tensor([[0, 1], [2, 3], [0, 2], [3, 2]])
    t = traffic_of(indices, layout, ranks_per_node=2, hidden_size=10, bytes_per_value=2)
    off_rank_pairs = 1 + 2 + 1 + 1  # rank 0 keeps expert 0, rank 2 keeps 2, rank 3 keeps 3
    assert t["sent_bytes_per_token"] == off_rank_pairs * 20 / 4
    received = torch.tensor([1, 1, 2, 1]) * 20.0  # rows arriving from other ranks, one token per rank
    assert t["recv_bytes_per_token"] == pytest.approx(received.mean().item())
    assert t["max_recv_bytes_per_token"] == 40.0
    off_node_pairs = 0 + 2 + 1 + 0
    assert t["off_node_bytes_per_token"] == off_node_pairs * 20 / 4
    assert t["ranks"] == 2.0 and t["nodes"] == pytest.approx((1 + 1 + 2 + 1) / 4)
    with pytest.raises(ValueError, match="divisible"):
        traffic_of(indices[:3], layout, 2, 10)


def test_replayed_router_is_the_models_own_choice_and_the_limit_holds():
    model = load_pretrained(CHECKPOINT)
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    for moe, u in zip(model.moe_layers, moe_inputs(model, windows)):
        limited = replay_routing(moe, u, limited=True)
        assert torch.equal(limited.sort(1).values, moe.last_stats.indices.sort(1).values)
        groups = limited // (moe.n_routed_experts // moe.n_group)  # (T, k) group of each chosen expert
        one = replay_routing(moe, u, limited=True, topk_group=1) // (moe.n_routed_experts // moe.n_group)
        assert (one == one[:, :1]).all()  # at most one group per token
        assert max(len(set(g)) for g in groups.tolist()) <= moe.topk_group
    result = capstone_traffic(model, windows, n_ranks=4, ranks_per_node=1)
    assert len(result["rows"]) == 5 * len(model.moe_layers)


def test_saved_traffic_table():
    saved = json.loads(SAVED.read_text())
    layout = saved["layout"]
    assert layout["n_nodes"] == layout["n_group"]  # groups = nodes
    for row in saved["rows"]:
        assert 1 <= row["nodes"] <= row["ranks"] <= layout["top_k"]
        if "<= 1 of" in row["routing"]:
            assert row["nodes"] == 1.0
        assert row["max_recv_bytes_per_token"] >= row["recv_bytes_per_token"]
