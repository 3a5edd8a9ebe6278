"""The expert-parallel layer against the single-process layer: outputs and every gradient.

:func:`compare_worker` runs on every rank (under :func:`~helpers.parallel.launch.launch` or
``torchrun``): each rank builds the same :class:`helpers.moe.DeepSeekMoE` from the seed and the same
inputs, runs it on *all* tokens in one process (the reference), runs its own slice of the tokens
through :class:`~helpers.parallel.layer.ExpertParallelMoE`, back-propagates the same upstream
gradient, and compares. Router and shared-expert gradients are summed over the ranks (what data
parallelism's all-reduce does); each expert's gradient is summed over its copies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.moe import Balancing, DeepSeekMoE
from helpers.parallel.layer import ExpertParallelMoE
from helpers.parallel.layout import ExpertLayout

DEFAULT = dict(hidden_size=24, moe_intermediate_size=8, n_routed_experts=12, num_experts_per_tok=3,
               n_shared_experts=1, n_group=1, topk_group=1, tokens=20, seed=0)
INT_FIELDS = tuple(DEFAULT)
MOE_FIELDS = tuple(k for k in DEFAULT if k not in ("tokens", "seed"))
"""The fields of :data:`DEFAULT` that are the layer's own settings (``DeepSeekMoE``'s keyword names)."""
TOLERANCE = 1e-5


def build_reference(config: dict, starve: tuple[int, ...] = (), bias: tuple[float, ...] | None = None) -> DeepSeekMoE:
    """The single-process layer every rank builds identically from ``config["seed"]``.

    ``starve``: experts given a bias of -100 so no token picks them (an expert, or a whole rank, with no tokens);
    ``bias``: (E,) a bias to skew the load (default: small random values).
    """
    torch.manual_seed(config["seed"])
    moe = DeepSeekMoE(**{k: config[k] for k in MOE_FIELDS}, scoring_func=config.get("scoring_func", "sigmoid"),
                      routed_scaling_factor=2.5)
    with torch.no_grad():
        moe.bias.uniform_(-0.05, 0.05)
        if bias is not None:
            moe.bias.copy_(torch.tensor(bias))
        moe.bias[list(starve)] = -100.0
    return moe


def split_tokens(total: int, tokens: list[int] | None, world: int) -> list[int]:
    """Tokens per rank: ``tokens`` as given, else ``total`` per rank."""
    return list(tokens) if tokens is not None else [total] * world


def compare_worker(rank: int, world: int, config: dict, layout_slots=None, starve: tuple[int, ...] = (),
                   tokens: list[int] | None = None, bias: tuple[float, ...] | None = None) -> dict:
    """Run both layers on this rank; return the largest differences over all ranks and what was moved.

    Returns:
        ``{"out": max|out diff|, "grad": max|grad diff| (input, router, shared, experts), "recv": rows this
        rank received, "send": rows sent per rank, "load": (E,) tokens per expert over all ranks,
        "indices": (T_rank, k) the experts this rank's tokens chose, "timeline": the forward's phases}``; ``out`` and ``grad`` are maxima over all ranks.
    """
    moe = build_reference(config, starve, bias)
    per_rank = split_tokens(config["tokens"], tokens, world)
    g = torch.Generator().manual_seed(config["seed"] + 1)
    x = torch.randn(sum(per_rank), config["hidden_size"], generator=g)  # (T_all, H) every rank's tokens
    upstream = torch.randn(x.shape, generator=g)  # dL/dy, the same everywhere
    x_ref = x.clone().requires_grad_()
    y_ref = moe(x_ref)
    (y_ref * upstream).sum().backward()
    y_ref = y_ref.detach()

    layout = (ExpertLayout(config["n_routed_experts"], layout_slots) if layout_slots is not None
              else ExpertLayout.contiguous(config["n_routed_experts"], world))
    ep = ExpertParallelMoE.from_moe(moe, layout, rank)
    lo = sum(per_rank[:rank])
    hi = lo + per_rank[rank]
    x_mine = x[lo:hi].clone().requires_grad_()
    y = ep(x_mine)
    (y * upstream[lo:hi]).sum().backward()

    out_diff = (y.detach() - y_ref[lo:hi]).abs().max() if hi > lo else torch.zeros(())
    diffs = [(x_mine.grad - x_ref.grad[lo:hi]).abs().max() if hi > lo else torch.zeros(())]
    shared = [(p, q) for p, q in zip(ep.shared_experts.parameters(), moe.shared_experts.parameters())] \
        if ep.shared_experts is not None else []
    for mine, ref in [(ep.gate_weight, moe.gate_weight), *shared]:  # replicated: sum the ranks' shares
        total = mine.grad.clone()
        dist.all_reduce(total)
        diffs.append((total - ref.grad).abs().max())
    mine_ids = torch.tensor(layout.slots[rank])
    for mine, ref in ((ep.w_gate_up, moe.w_gate_up), (ep.w_down, moe.w_down)):  # sum each expert's copies
        total = torch.zeros_like(ref).index_add_(0, mine_ids, mine.grad)
        dist.all_reduce(total)
        diffs.append((total - ref.grad).abs().max())
    worst = torch.stack([out_diff, torch.stack(diffs).max()])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    load = ep.last_load.clone()
    dist.all_reduce(load)
    return {"out": worst[0].item(), "grad": worst[1].item(), "recv": sum(ep.last_recv), "send": ep.last_send,
            "load": load, "indices": ep.last_indices, "timeline": ep.last_timeline}


def summary_line(world: int, out: float, grad: float) -> str:
    """The one line ``python -m helpers.parallel check`` ends with."""
    return f"expert-parallel check: {world} processes, max|out diff| = {out:.2e}, max|grad diff| = {grad:.2e}"


def parse_sets(items: list[str]) -> dict:
    """``["FIELD=INT", ...]`` -> a config: :data:`DEFAULT` with those fields replaced (``ValueError`` names a bad one)."""
    config = dict(DEFAULT)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in INT_FIELDS:
            raise ValueError(f"--set takes FIELD=INT with FIELD one of {', '.join(INT_FIELDS)}; got {item!r}")
        try:
            config[name] = int(value)
        except ValueError:
            raise ValueError(f"--set {name} needs an integer, got {value!r}") from None
    return config


def validate(config: dict, world: int) -> None:
    """Raise the layers' own ``ValueError`` before any process starts (bad field, or E not divisible by N)."""
    DeepSeekMoE(**{k: config[k] for k in MOE_FIELDS})
    ExpertLayout.contiguous(config["n_routed_experts"], world)
    if config["tokens"] < 0:
        raise ValueError(f"tokens must be >= 0, got {config['tokens']}")


def bias_update_worker(rank: int, world: int, config: dict, gamma: float = 0.01) -> float:
    """One training forward and bias update on both layers: the largest bias difference over the ranks."""
    moe = build_reference(config)
    moe.balancing = Balancing(gamma=gamma)
    per_rank = split_tokens(config["tokens"], None, world)
    x = torch.randn(sum(per_rank), config["hidden_size"], generator=torch.Generator().manual_seed(config["seed"] + 1))
    ep = ExpertParallelMoE.from_moe(moe, ExpertLayout.contiguous(config["n_routed_experts"], world), rank)
    moe.train()(x)
    moe.update_bias()
    ep.train()(x[rank * per_rank[0]:(rank + 1) * per_rank[0]])
    ep.update_bias()
    diff = (ep.bias - moe.bias).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()
