"""Traffic of the trained capstone model's routing (notebooks 31-32) under expert parallelism.

The capstone (``notebooks/results/tiny_deepseek_v3``) has two DeepSeekMoE layers of 8 routed experts, top-2,
trained with group-limited routing: ``n_group=4`` groups of 2 experts, each token may use ``topk_group=2`` of
them (V3 §2.1.2). We lay its experts out as expert parallelism would, **8 ranks on 4 nodes** (2 ranks per node,
one expert per rank), so that a routing group is exactly one node's experts (groups = nodes), and the tokens of
the validation windows live on the ranks in contiguous shares (whole windows per rank, as data parallelism
places them).

For every MoE layer we replay the router on the inputs it received (captured by a forward hook while the model
runs the validation windows): the scores ``s + b`` of the trained router, routed

- **with** the limit (``n_group``, ``topk_group`` of the config): exactly the model's own choices (checked
  against ``last_stats.indices``);
- **without** it: the *same* scores routed with plain top-k (``n_group=1``); the model was not trained so, this
  only asks where its own scores would have sent the tokens;
- a stricter what-if, the same scores limited to **one** node per token (``topk_group=1``): with top-2 and
  ``topk_group=2`` a token can never need more than 2 nodes anyway, so the trained limit cannot bind on node
  counts here; this row shows the mechanism where it does (the model was not trained with it either);

and compare with random routing of the same shape (V3's router on Gaussian logits,
:func:`helpers.parallel.traffic.random_routing`). Counting uses :func:`helpers.parallel.traffic.routing_traffic`
(the same pairs the layer's all-to-all sends: one row per (token, expert) pair whose expert is on another rank).

``python -m helpers.parallel.capstone --out notebooks/results/traffic_capstone.json`` writes the table
(under a minute, one thread); notebook 14 reads it.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.moe import DeepSeekMoE, affinity, select_experts
from helpers.parallel.layout import ExpertLayout
from helpers.parallel.traffic import random_routing, routing_traffic

CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "results" / "tiny_deepseek_v3"


def validation_windows(directory: str | pathlib.Path = CHECKPOINT, seq_len: int = 128, n: int = 16) -> Tensor:
    """``(n, seq_len)`` fixed validation windows (:func:`helpers.model.data.val_windows`), encoded with the
    checkpoint's own tokenizer: the held-out files the model never trained on."""
    from tokenizers import Tokenizer

    from helpers.model.data import encode, load_corpus, val_windows

    tokenizer = Tokenizer.from_file(str(pathlib.Path(directory) / "tokenizer.json"))
    return val_windows(encode(tokenizer, load_corpus().val.values()), seq_len, n)


@torch.no_grad()
def moe_inputs(model, windows: Tensor) -> list[Tensor]:
    """The input ``u (B*T, H)`` each MoE layer of ``model`` receives on ``windows (B, T)``, in depth order."""
    captured: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
             for m in model.moe_layers]
    try:
        model(windows)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def replay_routing(moe: DeepSeekMoE, u: Tensor, limited: bool, topk_group: int | None = None) -> Tensor:
    """The experts ``(T, k)`` the trained router picks for ``u (T, H)``: its scores plus its bias (V3 eq. 15-16),
    with its own group limit (``limited``; ``topk_group`` overrides the number of groups allowed) or with plain
    top-k over all experts."""
    scores = affinity(F.linear(u.float(), moe.gate_weight.float()), moe.scoring_func) + moe.bias  # (T, E)
    n_group, topk_group = (moe.n_group, topk_group or moe.topk_group) if limited else (1, 1)
    return select_experts(scores, moe.top_k, n_group, topk_group, moe.group_score)


def traffic_of(indices: Tensor, layout: ExpertLayout, ranks_per_node: int, hidden_size: int,
               bytes_per_value: int = 4) -> dict[str, float]:
    """Traffic of the dispatch when the tokens ``indices (T, k)`` are split over the ranks in contiguous shares.

    Returns per-token averages over all tokens (``ranks``, ``nodes``, ``rows_off_rank``, ``rows_off_node``,
    ``nodes_off_node`` as in :func:`routing_traffic`), the dispatch bytes a rank sends per token of its own
    (``sent_bytes_per_token``, mean over ranks), the bytes a rank receives per token of its own (mean and max over
    ranks: the max is the busiest rank), and ``off_node_bytes_per_token``. The combine sends the same rows back.
    """
    n_ranks = layout.n_ranks
    if len(indices) % n_ranks:
        raise ValueError(f"indices hold {len(indices)} tokens, not divisible by the {n_ranks} ranks: "
                         "give a number of tokens that every rank can hold an equal share of")
    share = len(indices) // n_ranks
    owner = layout.owner()[layout.assign_slots(indices)].view(indices.shape)  # (T, k) destination rank
    src = torch.arange(n_ranks).repeat_interleave(share)[:, None].expand_as(owner)  # (T, k) source rank
    row_bytes = hidden_size * bytes_per_value
    off = owner != src
    received = torch.bincount(owner[off], minlength=n_ranks).float() * row_bytes / share  # (R,)
    per_rank = [routing_traffic(indices[r * share:(r + 1) * share], layout, r, ranks_per_node) for r in range(n_ranks)]
    stats = {name: sum(p[name] for p in per_rank) / n_ranks for name in per_rank[0]}
    node_off = owner // ranks_per_node != src // ranks_per_node
    return {**stats, "sent_bytes_per_token": off.sum().item() * row_bytes / len(indices),
            "recv_bytes_per_token": received.mean().item(), "max_recv_bytes_per_token": received.max().item(),
            "off_node_bytes_per_token": node_off.sum().item() * row_bytes / len(indices)}


def capstone_traffic(model, windows: Tensor, n_ranks: int = 8, ranks_per_node: int = 2, seed: int = 0,
                     bytes_per_value: int = 4) -> dict:
    """The whole measurement (module docstring): one row per (MoE layer, routing), and the layout used."""
    config = model.config
    layout = ExpertLayout.contiguous(config.n_routed_experts, n_ranks)
    n_nodes = n_ranks // ranks_per_node
    rows = []
    for depth, (moe, u) in enumerate(zip(model.moe_layers, moe_inputs(model, windows))):
        own = moe.last_stats.indices  # (T, k) what the model itself chose in that forward
        limited = replay_routing(moe, u, limited=True)
        if not torch.equal(limited.sort(1).values, own.sort(1).values):
            raise RuntimeError("replayed routing differs from the model's own choices")
        layer = next(i for i, b in enumerate(model.layers) if b.ffn is moe)
        choices = {
            f"trained, <= {moe.topk_group} of {moe.n_group} nodes (as trained)": limited,
            "trained scores, plain top-k": replay_routing(moe, u, limited=False),
            f"trained scores, <= 1 of {moe.n_group} nodes (what-if)": replay_routing(moe, u, True, topk_group=1),
            f"random, <= {moe.topk_group} of {moe.n_group} nodes": random_routing(
                len(u), moe.n_routed_experts, moe.top_k, moe.n_group, moe.topk_group, seed + depth),
            "random, plain top-k": random_routing(len(u), moe.n_routed_experts, moe.top_k, 1, 1, seed + depth),
        }
        for name, indices in choices.items():
            stats = traffic_of(indices, layout, ranks_per_node, config.hidden_size, bytes_per_value)
            rows.append({"layer": layer, "routing": name, **stats})
    return {"layout": {"n_routed_experts": config.n_routed_experts, "top_k": config.num_experts_per_tok,
                       "n_ranks": n_ranks, "ranks_per_node": ranks_per_node, "n_nodes": n_nodes,
                       "n_group": config.n_group, "topk_group": config.topk_group,
                       "slots": [list(s) for s in layout.slots]},
            "tokens": int(windows.numel()), "windows": list(windows.shape), "hidden_size": config.hidden_size,
            "bytes_per_value": bytes_per_value, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.parallel.capstone", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--windows", type=int, default=16, help="validation windows (default 16, as training)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 (default): these tensors are too small to share")
    parser.add_argument("--out", default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from helpers.model.hf import load_pretrained, pretrained_metadata

    model = load_pretrained(args.checkpoint)
    result = capstone_traffic(model, validation_windows(args.checkpoint, args.seq_len, args.windows),
                              args.ranks, args.ranks_per_node, args.seed)
    result["checkpoint"] = {"path": "notebooks/results/tiny_deepseek_v3", **pretrained_metadata(args.checkpoint)}
    print(table(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"saved to {args.out}")


def table(result: dict) -> str:
    """The saved rows as a text table."""
    lines = [f"{'layer':>5s}  {'routing':42s} {'sent B/tok':>10s} {'recv B/tok':>10s} {'max recv':>9s} "
             f"{'off-node B/tok':>14s} {'ranks/tok':>9s} {'nodes/tok':>9s} {'other nodes':>11s}"]
    for r in result["rows"]:
        lines.append(f"{r['layer']:5d}  {r['routing']:42s} {r['sent_bytes_per_token']:10.0f} "
                     f"{r['recv_bytes_per_token']:10.0f} {r['max_recv_bytes_per_token']:9.0f} "
                     f"{r['off_node_bytes_per_token']:14.0f} {r['ranks']:9.2f} {r['nodes']:9.2f} "
                     f"{r['nodes_off_node']:11.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
