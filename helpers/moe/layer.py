"""DeepSeekMoE, the finished layer: routing (V2 and V3), shared experts, sorted dispatch, balancing.

The layer computes, for every token ``u_t`` (DeepSeek-V3, arXiv 2412.19437, eq. 12-16)::

    h'_t    = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)     (12)
    g_{i,t} = g'_{i,t} / sum_j g'_{j,t}                                                  (13)
    g'_{i,t} = s_{i,t} if s_{i,t} + b_i in Topk({s_{j,t} + b_j}, K_r) else 0             (14, 16)
    s_{i,t} = Sigmoid(u_t^T e_i)                                                         (15)

(we return the FFN part without the residual ``u_t``, like ``transformers``). DeepSeek-V2
(arXiv 2405.04434, eq. 20-22) uses ``s_{i,t} = Softmax_i(u_t^T e_i)`` instead, no renormalisation,
and no bias; both scale the routed gating values by ``routed_scaling_factor``. Group-limited
routing (V2 §2.2.2, V3 §2.1.2) first keeps the ``topk_group`` best of ``n_group`` groups of experts.

Balancing: the auxiliary-loss-free bias ``b_i`` (V3 eq. 16, arXiv 2408.15664 eq. 3) only changes
which experts are chosen and is nudged by ``gamma`` after each step (2408.15664 Algorithm 1, V3
§2.1.2); the auxiliary losses are the expert-level loss (V2 eq. 23-25) over all tokens of a forward
call and V3's sequence-wise loss (V3 eq. 17-20), both on per-token normalised scores (V3 eq. 19).

Everything is pure functions plus one module, :class:`DeepSeekMoE`. Names follow the glossary
(``notebooks/GLOSSARY.md``); weights are stored like ``transformers``' fused experts so conversion is
a copy (``helpers.hf.moe_from_hf`` / ``moe_to_hf``).

"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.inputs import check_moe_input
from helpers.layers import SwiGLU
from helpers.moe.balancing import (
    expert_level_aux_loss,
    expert_load,
    max_violation,
    sequence_wise_aux_loss,
    update_bias,
)
from helpers.moe.experts import dispatch
from helpers.moe.routing import (
    GROUP_SCORES,
    SCORING_FUNCS,
    affinity,
    default_group_score,
    gating_weights,
    router_dtype,
    select_experts,
    validate_routing,
)
from helpers.rules import require_positive


@dataclass
class RoutingStats:
    """What the last forward routed: per-expert load (E,), MaxVio, gating values and experts (T, k)."""

    load: Tensor
    max_vio: Tensor
    weights: Tensor
    indices: Tensor


class DeepSeekMoE(nn.Module):
    """The DeepSeekMoE layer of DeepSeek-V2 and V3: shared + routed fine-grained experts (V3 eq. 12-16).

    Args:
        hidden_size: ``H``.
        moe_intermediate_size: ``I``, the width of one expert.
        n_routed_experts: ``N_r``.
        num_experts_per_tok: ``K_r``.
        n_shared_experts: ``N_s``; the shared experts are one SwiGLU of width ``N_s * I`` (0: none).
        scoring_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2).
        n_group, topk_group: group-limited routing (``n_group=1``: plain top-k).
        norm_topk_prob: renormalise the chosen gating values (V3: True, V2: False).
        routed_scaling_factor: scale on the routed gating values.
        gamma: bias update speed ``gamma`` for :meth:`update_bias` (0: the bias never moves).
        aux_loss_alpha: ``alpha_1`` of the expert-level loss (V2 eq. 23-25) over all tokens of the
            forward call (a batch: V3 §4.5.3's batch-wise loss; V2 itself counts one sequence) (0: off).
        seq_aux_loss_alpha: ``alpha`` of V3's sequence-wise loss (V3 eq. 17-20), per sequence of the
            input's second-to-last dimension (0: off). With softmax scores it is V2's per-sequence loss.
        group_score: ``"top2_sum"`` or ``"max"``; default follows ``scoring_func`` (V3 / V2).

    Parameters: ``gate_weight`` (E, H) (the centroids ``e_i``), buffer ``bias`` (E,) (``b_i``, no
    gradient), ``w_gate_up`` (E, 2I, H), ``w_down`` (E, H, I), ``shared_experts`` (a :class:`SwiGLU` or None).

    ``forward`` returns only the output; after it, ``self.last_stats`` (a :class:`RoutingStats`, computed when
    first read) and ``self.aux_loss`` (a scalar tensor, 0 when both alphas are 0) hold the statistics and the loss.

    Both auxiliary losses average the per-token *normalised* scores ``s' = s / sum_j s`` (V3 eq. 19),
    also with ``scoring_func="sigmoid"`` and ``aux_loss_alpha``: V2's formula on raw sigmoid scores
    could be lowered by pushing every score down without moving a token. For softmax ``s' = s``.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: int = 0, scoring_func: str = "sigmoid",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, gamma: float = 0.0, aux_loss_alpha: float = 0.0,
                 seq_aux_loss_alpha: float = 0.0, group_score: str | None = None) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size)
        validate_routing(n_routed_experts, num_experts_per_tok, n_group, topk_group)
        if not isinstance(n_shared_experts, int) or isinstance(n_shared_experts, bool) or n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be a non-negative integer, got {n_shared_experts!r}")
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        group_score = group_score or default_group_score(scoring_func)
        if group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be positive, got {routed_scaling_factor!r}")
        for name, value in (("gamma", gamma), ("aux_loss_alpha", aux_loss_alpha),
                            ("seq_aux_loss_alpha", seq_aux_loss_alpha)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.n_routed_experts, self.top_k, self.n_shared_experts = n_routed_experts, num_experts_per_tok, n_shared_experts
        self.scoring_func, self.group_score = scoring_func, group_score
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.gamma, self.aux_loss_alpha, self.seq_aux_loss_alpha = gamma, aux_loss_alpha, seq_aux_loss_alpha

        self.gate_weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))  # (E, H)
        self.register_buffer("bias", torch.zeros(n_routed_experts))  # (E,)
        self.w_gate_up = nn.Parameter(torch.empty(n_routed_experts, 2 * moe_intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(n_routed_experts, hidden_size, moe_intermediate_size))
        self.shared_experts = (SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts)
                               if n_shared_experts else None)
        self.register_buffer("load_since_update", torch.zeros(n_routed_experts), persistent=False)
        self._routed: tuple[Tensor, Tensor, Tensor | None] | None = None  # the last forward's (weights, indices, load)
        self._stats: RoutingStats | None = None
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), so each expert is a default SwiGLU."""
        for weight, fan_in in ((self.gate_weight, self.hidden_size), (self.w_gate_up, self.hidden_size),
                               (self.w_down, self.moe_intermediate_size)):
            nn.init.uniform_(weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"H={self.hidden_size}, I={self.moe_intermediate_size}, N_r={self.n_routed_experts}, "
                f"K_r={self.top_k}, N_s={self.n_shared_experts}, scoring_func={self.scoring_func!r}, "
                f"n_group={self.n_group}, topk_group={self.topk_group}, norm_topk_prob={self.norm_topk_prob}, "
                f"routed_scaling_factor={self.routed_scaling_factor}")

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (B, T, H) (any leading dims) -> the FFN output (B, T, H), without the residual.

        Side effects: ``self.last_stats``, ``self.aux_loss``, and (in training mode) the load counted
        towards the next :meth:`update_bias`. Bad input (shape, dtype, device, NaN or inf) raises before
        any of them changes (:func:`helpers.inputs.check_moe_input`).
        """
        check_moe_input(self, u)
        shape = u.shape
        x = u.reshape(-1, self.hidden_size)  # (T, H) with T = all tokens
        dtype = router_dtype(x.dtype)
        logits = F.linear(x.to(dtype), self.gate_weight.to(dtype))  # (T, E)
        scores = affinity(logits, self.scoring_func)  # (T, E)
        indices = select_experts((scores + self.bias.to(dtype)).detach(), self.top_k, self.n_group,
                                 self.topk_group, self.group_score)  # (T, k)
        weights = gating_weights(scores, indices, self.norm_topk_prob, self.routed_scaling_factor,
                                 trusted=True)  # (T, k)
        y = dispatch(x, weights, indices, self.w_gate_up, self.w_down)  # (T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        load = None
        if self.training:
            load = expert_load(indices, self.n_routed_experts, trusted=True)  # (E,)
            self.load_since_update += load
        self._routed, self._stats = (weights.detach(), indices, load), None
        self.aux_loss = self._aux_loss(scores, indices, shape)
        return y.reshape(shape)

    @property
    def last_stats(self) -> RoutingStats | None:
        """What the last forward routed (None before the first), computed when first read after it.

        Lazy because a decode step at inference reads no statistics: at a few tokens, the load and MaxVio ops
        cost about as much as the router on a CPU.
        """
        if self._stats is None and self._routed is not None:
            weights, indices, load = self._routed
            if load is None:
                load = expert_load(indices, self.n_routed_experts, trusted=True)  # (E,)
            self._stats = RoutingStats(load=load, max_vio=max_violation(load), weights=weights, indices=indices)
        return self._stats

    def _aux_loss(self, scores: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
        loss = scores.new_zeros(())
        if self.aux_loss_alpha:
            loss = loss + expert_level_aux_loss(scores, indices, self.n_routed_experts, self.aux_loss_alpha)
        if self.seq_aux_loss_alpha:
            n_seq = math.prod(shape[:-2]) if len(shape) > 2 else 1
            loss = loss + sequence_wise_aux_loss(scores.view(n_seq, -1, self.n_routed_experts),
                                                 indices.view(n_seq, -1, self.top_k),
                                                 self.n_routed_experts, self.seq_aux_loss_alpha)
        return loss

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move ``bias`` by ``gamma`` against the load counted since the last update (2408.15664 Algorithm 1).

        The load of every training-mode forward since the previous call is summed, so gradient
        accumulation over several micro-batches gives one update per optimiser step; the count
        then restarts. Call it after ``optimizer.step()``.
        """
        if not self.load_since_update.any():
            raise RuntimeError("no training-mode forward since the last update_bias; "
                               "run the layer in train() mode before updating the bias")
        self.bias.copy_(update_bias(self.bias, self.load_since_update, self.gamma))
        self.load_since_update.zero_()
