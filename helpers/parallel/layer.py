"""DeepSeekMoE with its routed experts spread over processes: route -> dispatch -> experts -> combine.

Each of the ``N`` ranks holds the router (``e_i`` and the bias ``b_i``), the shared experts, and
only the routed experts its :class:`~helpers.parallel.layout.ExpertLayout` gives it. A forward on
rank ``r`` computes, for its own tokens, the same V3 eq. 12 as :class:`helpers.moe.DeepSeekMoE`::

    h'_t = sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)

but the routed sum is computed where the experts live: the router (``helpers.moe.route``) picks
``K_r`` experts per token here; the dispatcher sends each (token, expert) row to the expert's rank;
that rank runs its experts on what it received (``helpers.moe.run_experts``, the sorted dispatch);
the combine sends the results back, and here they are weighted by ``g_{i,t}`` and summed per token.
No process group appears in this file: the dispatcher (:mod:`helpers.parallel.comm`) owns them.

Gradients: the routed experts' gradients land on the rank that holds them; the router's and the
shared experts' are this rank's share (sum them over the ranks, as data parallelism does).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.layers import SwiGLU
from helpers.moe import (
    DeepSeekMoE,
    RoutingStats,
    expert_load,
    max_violation,
    route,
    run_experts,
    update_bias,
)
from helpers.moe.layer import check_moe_forward
from helpers.parallel.comm import AllToAllDispatcher
from helpers.parallel.layout import ExpertLayout
from helpers.precision import compute_dtype


class ExpertParallelMoE(nn.Module):
    """The routed experts of one rank plus a copy of the router and shared experts.

    Build it from a single-process layer with :meth:`from_moe` (every rank passes the same layer,
    e.g. built from the same seed). Parameters: ``gate_weight`` (E, H), buffer ``bias`` (E,),
    ``w_gate_up`` (S, 2I, H) and ``w_down`` (S, H, I) for the ``S`` slots of this rank,
    ``shared_experts``.

    After a forward: ``last_timeline`` lists ``(phase, start, end)`` in ``time.perf_counter`` seconds
    (route, dispatch, experts, combine, sum: weighting and shared experts), ``last_send`` / ``last_recv`` the rows sent to and
    received from each rank, ``last_load`` (E,) this rank's tokens per expert, ``last_indices`` (T, k).
    """

    def __init__(self, moe: DeepSeekMoE, layout: ExpertLayout, rank: int, dispatcher=None) -> None:
        super().__init__()
        if layout.n_experts != moe.n_routed_experts:
            raise ValueError(f"layout has {layout.n_experts} experts but n_routed_experts is {moe.n_routed_experts}")
        if not 0 <= rank < layout.n_ranks:
            raise ValueError(f"rank must be in [0, {layout.n_ranks}), got {rank}")
        self.config = dict(moe.settings)  # the single-process layer's settings, by transformers' field names
        for name, value in self.config.items():
            setattr(self, name, value)
        self.top_k = self.num_experts_per_tok
        self.layout, self.rank = layout, rank
        self.dispatcher = dispatcher or AllToAllDispatcher(layout, rank)
        self.dispatcher.agree({**self.config, "layout": layout.slots})
        mine = torch.tensor(layout.slots[rank])  # (S,) the logical experts of this rank's slots
        self.gate_weight = nn.Parameter(moe.gate_weight.detach().clone())
        self.register_buffer("bias", moe.bias.detach().clone())
        self.w_gate_up = nn.Parameter(moe.w_gate_up.detach()[mine].clone())
        self.w_down = nn.Parameter(moe.w_down.detach()[mine].clone())
        self.shared_experts = None
        if moe.shared_experts is not None:
            self.shared_experts = SwiGLU(moe.hidden_size, moe.shared_experts.w_gate.out_features)
            self.shared_experts.load_state_dict(moe.shared_experts.state_dict())
        self.balancing = moe.balancing
        self.aux_loss = torch.zeros(())  # the auxiliary losses are not sharded (helpers.parallel.training)
        self.register_buffer("load_since_update", torch.zeros(moe.n_routed_experts), persistent=False)
        self.last_timeline: list[tuple[str, float, float]] = []

    @classmethod
    def from_moe(cls, moe: DeepSeekMoE, layout: ExpertLayout | None = None, rank: int = 0,
                 group=None) -> ExpertParallelMoE:
        """This rank's part of ``moe``; ``layout`` defaults to the contiguous one over ``group``'s ranks."""
        if layout is None:
            import torch.distributed as dist
            world = dist.get_world_size(group) if dist.is_initialized() else 1
            layout = ExpertLayout.contiguous(moe.n_routed_experts, world)
        return cls(moe, layout, rank, AllToAllDispatcher(layout, rank, group))

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (..., H) this rank's tokens -> the FFN output (..., H), without the residual.

        The input is checked like :class:`helpers.moe.DeepSeekMoE`'s before any collective runs (a rank that
        refuses its input raises; the others then fail through the launcher's dead-rank detection).
        """
        check_moe_forward(self, u)
        shape, clock = u.shape, [time.perf_counter()]
        timeline = self.last_timeline = []

        def mark(phase: str) -> None:
            clock.append(time.perf_counter())
            timeline.append((phase, clock[-2], clock[-1]))

        x = u.reshape(-1, self.hidden_size)  # (T, H)
        dtype = compute_dtype(x.dtype)
        logits = F.linear(x.to(dtype), self.gate_weight.to(dtype))  # (T, E)
        weights, indices = route(logits, scoring_func=self.scoring_func, top_k=self.top_k, n_group=self.n_group,
                                 topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                                 routed_scaling_factor=self.routed_scaling_factor, bias=self.bias,
                                 group_score=self.group_score)  # (T, k) each
        mark("route")
        rows, local, state = self.dispatcher.dispatch(x, indices)  # (n_recv, H), (n_recv,)
        mark("dispatch")
        out = run_experts(rows, local, self.w_gate_up, self.w_down)  # (n_recv, H), FFN_e(row)
        mark("experts")
        back = self.dispatcher.combine(out, state)  # (T*k, H), sorted pair order
        mark("combine")
        g = weights.reshape(-1)[state.order].to(x.dtype)  # (T*k,) gating values of the sorted pairs
        y = x.new_zeros(x.shape).index_add(0, state.token, back * g[:, None])  # sum_i g_{i,t} FFN_i(u_t)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        mark("sum")
        self.last_send, self.last_recv = state.send, state.recv
        self.last_load, self.last_indices = expert_load(indices, self.n_routed_experts), indices
        if self.training:
            self.load_since_update += self.last_load
        self.last_stats = RoutingStats(load=self.last_load, max_vio=max_violation(self.last_load),
                                       weights=weights.detach(), indices=indices)  # this rank's tokens only
        return y.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """The bias update of :meth:`helpers.moe.DeepSeekMoE.update_bias` on the load of *all* ranks.

        Every rank sums the loads counted since the last update over the ranks and moves its copy of
        the bias by the same step, so the copies stay equal. Call it on every rank (a collective).
        """
        load = self.dispatcher.sum_over_ranks(self.load_since_update)
        if not load.any():
            raise RuntimeError("no training-mode forward since the last update_bias; "
                               "run the layer in train() mode before updating the bias")
        self.bias.copy_(update_bias(self.bias, load, self.balancing.gamma))
        self.load_since_update.zero_()
