"""What expert parallelism moves: rows and bytes per token, destination ranks and nodes per token.

Two views. :func:`measure` reads what a forward of :class:`~helpers.parallel.layer.ExpertParallelMoE`
actually sent (its all-to-all splits). :func:`routing_traffic` counts the same quantities from the
chosen experts alone, so the V3 layout at full scale (256 experts, top-8, 64 ranks on 8 nodes, at
most 4 nodes per token, V3 §2.1.2 and §3.2) can be studied on paper with the very routing code the
layer uses (:func:`helpers.moe.select_experts`), without any process.

Our dispatch sends one row per (token, expert) pair whose expert lives on another rank. A dispatch
that deduplicates (DeepSeek's: a token crosses to each *node* once, then is forwarded inside it)
sends one row per distinct destination node; node-limited routing caps exactly that number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.moe import affinity, select_experts
from helpers.parallel.layout import ExpertLayout


def routing_traffic(indices: Tensor, layout: ExpertLayout, src_rank: int, ranks_per_node: int) -> dict[str, float]:
    """Per-token averages of what the tokens of ``src_rank`` must move, from their chosen experts.

    Args:
        indices: (T, k) chosen experts of the tokens that live on ``src_rank``.
        layout: the expert layout (plain: an expert's rank is its owner; copies: the copy it is sent to).
        src_rank: the rank the tokens live on.
        ranks_per_node: ranks on one node (rank ``r`` is on node ``r // ranks_per_node``).

    Returns:
        ``ranks``: distinct destination ranks per token (its own rank included);
        ``nodes``: distinct destination nodes per token (its own included);
        ``rows_off_rank``: pairs sent to another rank (rows our dispatch sends);
        ``rows_off_node``: pairs sent to another node;
        ``nodes_off_node``: distinct other nodes per token (rows a node-deduplicating dispatch sends across nodes).
    """
    n_tokens, k = indices.shape
    owner = layout.owner()[layout.assign_slots(indices)].view(n_tokens, k)  # (T, k) destination rank
    node = owner // ranks_per_node  # (T, k)
    my_node = src_rank // ranks_per_node

    def distinct(t: Tensor) -> Tensor:  # (T,) distinct values per row
        s = t.sort(dim=1).values
        return 1 + (s[:, 1:] != s[:, :-1]).sum(1)

    other_nodes = node.masked_fill(node == my_node, -1)
    n_other = distinct(other_nodes) - (other_nodes == -1).any(1).long()
    means = {"ranks": distinct(owner), "nodes": distinct(node), "rows_off_rank": (owner != src_rank).sum(1),
             "rows_off_node": (node != my_node).sum(1), "nodes_off_node": n_other}
    return {name: value.float().mean().item() for name, value in means.items()}


def nodes_per_token(indices: Tensor, layout: ExpertLayout, ranks_per_node: int) -> Tensor:
    """(T,) distinct nodes each token's experts live on."""
    node = layout.owner()[layout.assign_slots(indices)].view(indices.shape) // ranks_per_node
    s = node.sort(dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(1)


def random_routing(n_tokens: int, n_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                   seed: int = 0) -> Tensor:
    """(T, k) experts chosen by V3's router (sigmoid, top-2-sum group score) for random Gaussian logits."""
    g = torch.Generator().manual_seed(seed)
    scores = affinity(torch.randn(n_tokens, n_experts, generator=g), "sigmoid")
    return select_experts(scores, top_k, n_group, topk_group, "top2_sum")


def v3_at_scale(n_tokens: int = 4096, seed: int = 0, hidden_size: int = 7168,
                bytes_per_value: int = 1) -> list[dict]:
    """V3's training layout on paper: 256 experts on 64 ranks of 8 nodes, top-8, without and with <= 4 nodes.

    ``bytes_per_value``: 1 for an FP8 dispatch (V3 dispatches FP8 activations, combines in BF16), 2 for BF16.
    Returns one dict per routing with the :func:`routing_traffic` averages (tokens on rank 0) and
    ``bytes_off_node``: bytes per token a node-deduplicating dispatch sends across nodes.
    """
    layout = ExpertLayout.contiguous(256, 64)
    rows = []
    for name, n_group, topk_group in (("top-8 of 256", 1, 1), ("top-8, <= 4 of 8 nodes", 8, 4)):
        indices = random_routing(n_tokens, 256, 8, n_group, topk_group, seed)
        stats = routing_traffic(indices, layout, src_rank=0, ranks_per_node=8)
        stats["bytes_off_node"] = stats["nodes_off_node"] * hidden_size * bytes_per_value
        rows.append({"routing": name, **stats, "nodes_hist": torch.bincount(
            nodes_per_token(indices, layout, 8), minlength=9).tolist()})
    return rows


def measure(layer, ranks_per_node: int, bytes_per_value: int = 4) -> dict[str, float]:
    """Rows and bytes per token the last forward of an :class:`ExpertParallelMoE` sent and received.

    Counted from the all-to-all splits, without the rows a rank sends to itself (they never leave).
    """
    rank, n_tokens = layer.rank, max(len(layer.last_indices), 1)
    row_bytes = layer.hidden_size * bytes_per_value
    off_rank = [r != rank for r in range(len(layer.last_send))]
    off_node = [r // ranks_per_node != rank // ranks_per_node for r in range(len(layer.last_send))]
    sent = sum(n for n, off in zip(layer.last_send, off_rank) if off)
    received = sum(n for n, off in zip(layer.last_recv, off_rank) if off)
    sent_off_node = sum(n for n, off in zip(layer.last_send, off_node) if off)
    return {"sent_bytes_per_token": sent * row_bytes / n_tokens, "recv_bytes_per_token": received * row_bytes / n_tokens,
            "off_node_bytes_per_token": sent_off_node * row_bytes / n_tokens,
            **routing_traffic(layer.last_indices, layer.layout, rank, ranks_per_node)}
