"""DeepSeek-V4's MoE: sqrt-softplus affinities, hash routing in the first layers, a clamped SwiGLU.

V4 keeps DeepSeekMoE (V3 eq. 12-16, :mod:`helpers.moe`) with three changes (V4 report §2.1):

- the affinity is ``s_{i,t} = sqrt(softplus(u_t^T e_i))`` instead of V3's sigmoid (``"sqrtsoftplus"`` in
  :data:`helpers.moe.routing.SCORING_FUNCS`); the choice is still top-k on ``s + b`` (the auxiliary-loss-free
  bias ``b``, no groups), the gating values the chosen ``s`` normalised to sum to 1, times
  ``routed_scaling_factor``;
- in the first ``num_hash_layers`` MoE layers (``mlp_layer_types[l] == "hash_moe"``) the experts are not chosen
  by the router but looked up in a fixed table, ``tid2eid[token id]`` (vocab, k): no learned choice to balance
  while the hidden states still carry little beyond the token id, and the load is balanced by construction if
  the table is. The router's scores still weigh the looked-up experts;
- every expert (routed and shared) is a SwiGLU whose gate is clamped from above and whose up projection is
  clamped on both sides at ``swiglu_limit``: ``W_down(SiLU(min(W_g u, L)) * clamp(W_u u, -L, L))``.

There are no dense layers and one shared expert of width ``moe_intermediate_size``.

=========================  =========================================================================================
name                       what
=========================  =========================================================================================
:func:`clamped_swiglu`     ``SiLU(min(gate, L)) * clamp(up, -L, L)``
:func:`v4_experts`         the routed sum ``sum_i g_{i,t} FFN_i(u_t)`` as a plain loop over the experts (the reference)
:func:`hash_table`         a balanced ``tid2eid`` (every expert gets the same number of (token, slot) pairs)
:func:`check_hash_table`   the rules a ``tid2eid`` must satisfy (``ValueError`` naming ``tid2eid``)
:class:`ClampedSwiGLU`     the shared expert
:class:`V4MoE`             the layer; :meth:`V4MoE.from_config` (``config``, ``layer_idx``) is the one config mapping
=========================  =========================================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.layers import SwiGLU
from helpers.moe.routing import _gating_weights, affinity, select_experts
from helpers.precision import compute_dtype
from helpers.rules import require_choice, require_count, require_number, require_positive, validate_routing

V4_SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")
"""The scores ``transformers``' V4 router can run (its ``"softmax"`` has no activation behind it)."""


def clamped_swiglu(gate: Tensor, up: Tensor, limit: float) -> Tensor:
    """``SiLU(min(gate, L)) * clamp(up, -L, L)`` (V4 report §2.1): the gate clamped from above only, ``up`` both sides."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def v4_experts(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor, limit: float) -> Tensor:
    """The routed sum ``y_t = sum_i g_{i,t} FFN_i(u_t)`` with V4's clamped SwiGLU, written as plainly as it reads.

    For each expert ``e``: the (token, slot) pairs routed to it, ``g * FFN_e(rows)``, added back to those tokens
    (the loop of :func:`helpers.moe.reference_experts` with :func:`clamped_swiglu` in place of SwiGLU).

    Args:
        u: (T, H) tokens. weights: (T, k) gating values. indices: (T, k) experts.
        w_gate_up: (E, 2I, H), gate rows first. w_down: (E, H, I). limit: ``swiglu_limit``.

    Returns:
        (T, H), in ``u``'s dtype.
    """
    y = torch.zeros_like(u)  # (T, H)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(indices == e)  # (n_e,) each
        gate, up = F.linear(u[token], w_gate_up[e]).chunk(2, dim=-1)  # (n_e, I) each
        out = F.linear(clamped_swiglu(gate, up, limit), w_down[e])  # (n_e, H)
        y.index_add_(0, token, (weights[token, slot, None] * out).to(y.dtype))
    return y


def hash_table(vocab_size: int, n_routed_experts: int, top_k: int) -> Tensor:
    """A balanced ``tid2eid`` (vocab, k): token ``t`` goes to experts ``(t k + j) mod E``, ``j < k``.

    The (token, slot) pairs go round the experts in turn, so every expert serves ``vocab k / E`` of them (within
    one) and a token's ``k`` experts are distinct. A stand-in for the released table, which comes with the weights.
    """
    tokens = torch.arange(vocab_size).unsqueeze(1)  # (V, 1)
    return (tokens * top_k + torch.arange(top_k)) % n_routed_experts  # (V, k)


def check_hash_table(tid2eid: Any, vocab_size: int, n_routed_experts: int, top_k: int) -> None:
    """``ValueError``/``TypeError`` naming ``tid2eid`` unless it is (vocab, k) integer expert ids in ``[0, E)``."""
    if not isinstance(tid2eid, Tensor) or tid2eid.dtype.is_floating_point or tid2eid.dtype == torch.bool:
        got = tid2eid.dtype if isinstance(tid2eid, Tensor) else type(tid2eid).__name__
        raise TypeError(f"tid2eid must be an integer tensor [vocab_size, num_experts_per_tok] of expert ids, got {got}")
    if tuple(tid2eid.shape) != (vocab_size, top_k):
        raise ValueError(f"tid2eid must have shape [vocab_size={vocab_size}, num_experts_per_tok={top_k}], got "
                         f"{tuple(tid2eid.shape)}: one row of k experts per token id")
    low, high = int(tid2eid.min()), int(tid2eid.max())
    if low < 0 or high >= n_routed_experts:
        bad = low if low < 0 else high
        token = int((tid2eid == bad).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"tid2eid points outside the experts: token id {token} maps to expert {bad}, but the layer "
                         f"has n_routed_experts={n_routed_experts} (ids 0..{n_routed_experts - 1}); build the table "
                         "for this expert count")


class ClampedSwiGLU(SwiGLU):
    """A :class:`helpers.SwiGLU` with V4's clamp (:func:`clamped_swiglu`): the shared expert.

    Args:
        hidden_size: ``H``. intermediate_size: ``I``. limit: ``swiglu_limit``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, limit: float) -> None:
        super().__init__(hidden_size, intermediate_size)
        self.limit = float(limit)

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (..., H) -> (..., H)."""
        return self.w_down(clamped_swiglu(self.w_gate(u), self.w_up(u), self.limit))


class V4MoE(nn.Module):
    """DeepSeek-V4's MoE layer (report §2.1): shared + routed clamped-SwiGLU experts, top-k or hash routing.

    Build it from a ``DeepseekV4Config`` with :meth:`from_config` (``config``, ``layer_idx``), or with the settings:

    Args:
        hidden_size: ``H``. moe_intermediate_size: ``I``, the width of one expert (and of the shared expert).
        n_routed_experts: ``N_r``. num_experts_per_tok: ``K_r``.
        routed_scaling_factor: the scale on the normalised gating values (1.5 in V4-Flash, 2.5 in V4-Pro).
        swiglu_limit: ``L`` of :func:`clamped_swiglu`.
        scoring_func: ``"sqrtsoftplus"`` (V4) or ``"sigmoid"`` (V3's).
        hash_vocab_size: ``None`` for a top-k layer; the vocabulary size for a hash layer (its table's rows).

    Parameters and buffers: ``gate_weight`` (E, H) (the centroids ``e_i``), ``w_gate_up`` (E, 2I, H), ``w_down``
    (E, H, I), ``shared_experts`` (a :class:`ClampedSwiGLU`); a top-k layer's ``bias`` (E,) (``b``, which only
    chooses), a hash layer's ``tid2eid`` (vocab, k) (long; replace it with :meth:`set_hash_table`, which checks it).
    The router computes in at least float32; the experts in the layer's dtype.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, num_experts_per_tok: int,
                 routed_scaling_factor: float = 1.0, swiglu_limit: float = 10.0, scoring_func: str = "sqrtsoftplus",
                 hash_vocab_size: int | None = None) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                         hash_vocab_size=hash_vocab_size)
        validate_routing(n_routed_experts, num_experts_per_tok)
        require_number("routed_scaling_factor", routed_scaling_factor, positive=True)
        require_number("swiglu_limit", swiglu_limit, positive=True)
        require_choice("scoring_func", scoring_func, V4_SCORING_FUNCS)
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.n_routed_experts, self.top_k = n_routed_experts, num_experts_per_tok
        self.routed_scaling_factor, self.swiglu_limit = float(routed_scaling_factor), float(swiglu_limit)
        self.scoring_func, self.is_hash = scoring_func, hash_vocab_size is not None

        self.gate_weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))  # (E, H)
        self.w_gate_up = nn.Parameter(torch.empty(n_routed_experts, 2 * moe_intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(n_routed_experts, hidden_size, moe_intermediate_size))
        self.shared_experts = ClampedSwiGLU(hidden_size, moe_intermediate_size, swiglu_limit)
        if self.is_hash:
            self.register_buffer("tid2eid", hash_table(hash_vocab_size, n_routed_experts, num_experts_per_tok))
        else:
            self.register_buffer("bias", torch.zeros(n_routed_experts))  # (E,)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Any, layer_idx: int) -> V4MoE:
        """Layer ``layer_idx``'s MoE in a ``DeepseekV4Config``: a hash layer where ``mlp_layer_types`` says
        ``"hash_moe"`` (its table has ``vocab_size`` rows), else top-k.

        V4 has one shared expert of width ``moe_intermediate_size`` and always renormalises the gating values, so
        ``n_shared_experts`` must be 1 and ``norm_topk_prob`` True (``transformers`` ignores both fields).
        """
        require_count(layer_idx=layer_idx)
        types = config.mlp_layer_types
        if layer_idx >= len(types):
            raise ValueError(f"layer_idx must be below num_hidden_layers={len(types)} (config.mlp_layer_types has "
                             f"{len(types)} entries), got {layer_idx}")
        if config.n_shared_experts != 1:
            raise ValueError(f"n_shared_experts must be 1 for DeepSeek-V4 (one shared expert of width "
                             f"moe_intermediate_size), got {config.n_shared_experts}")
        if not config.norm_topk_prob:
            raise ValueError("norm_topk_prob must be True for DeepSeek-V4: its router always renormalises")
        if config.hidden_act != "silu" or config.mlp_bias:
            raise ValueError("hidden_act must be 'silu' and mlp_bias False: V4's experts are bias-free SwiGLUs")
        return cls(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
                   config.num_experts_per_tok, config.routed_scaling_factor, config.swiglu_limit, config.scoring_func,
                   hash_vocab_size=config.vocab_size if types[layer_idx] == "hash_moe" else None)

    def reset_parameters(self) -> None:
        """Every weight like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)); the bias zero; the hash table balanced."""
        for weight, fan_in in ((self.gate_weight, self.hidden_size), (self.w_gate_up, self.hidden_size),
                               (self.w_down, self.moe_intermediate_size)):
            nn.init.uniform_(weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if not self.is_hash:
            self.bias.zero_()

    @torch.no_grad()
    def set_hash_table(self, tid2eid: Tensor) -> None:
        """Replace a hash layer's ``tid2eid`` (vocab, k) after checking it (:func:`check_hash_table`)."""
        if not self.is_hash:
            raise ValueError("set_hash_table needs a hash layer (mlp_layer_types[layer_idx] == 'hash_moe'); this "
                             "layer routes by top-k")
        check_hash_table(tid2eid, self.tid2eid.shape[0], self.n_routed_experts, self.top_k)
        self.tid2eid.copy_(tid2eid)

    def extra_repr(self) -> str:
        kind = f"hash (vocab {self.tid2eid.shape[0]})" if self.is_hash else "top-k"
        return (f"H={self.hidden_size}, I={self.moe_intermediate_size}, N_r={self.n_routed_experts}, K_r={self.top_k}, "
                f"routing={kind}, scoring_func={self.scoring_func!r}, scale={self.routed_scaling_factor}, "
                f"swiglu_limit={self.swiglu_limit}")

    def route(self, u: Tensor, input_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gating values and experts of the tokens ``u`` (T, H): ``(weights (T, k), indices (T, k))``.

        Top-k layer: ``Topk(s + b)``; hash layer: ``tid2eid[input_ids]`` (``input_ids`` (T,)). Either way the
        weights are the chosen ``s`` over their sum, times ``routed_scaling_factor``.
        """
        dtype = compute_dtype(u.dtype)
        scores = affinity(F.linear(u.to(dtype), self.gate_weight.to(dtype)), self.scoring_func)  # (T, E)
        if self.is_hash:
            indices = self.tid2eid[input_ids]  # (T, k): the table's row of each token id
        else:
            indices = select_experts((scores + self.bias.to(dtype)).detach(), self.top_k)  # (T, k)
        return _gating_weights(scores, indices, True, self.routed_scaling_factor), indices

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> Tensor:
        """``x`` (B, T, H) -> the FFN output (B, T, H), without the residual.

        Args:
            x: the block's normalised input.
            input_ids: (B, T) token ids; required by a hash layer (``ValueError`` without them), unused otherwise.
        """
        if self.is_hash:
            if input_ids is None:
                raise ValueError("input_ids are required by a hash MoE layer (mlp_layer_types == 'hash_moe'): it "
                                 "looks each token's experts up in tid2eid; pass the model's input_ids")
            if tuple(input_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"input_ids must have the shape of x without its last dim, {tuple(x.shape[:-1])}, "
                                 f"got {tuple(input_ids.shape)}")
            input_ids = input_ids.reshape(-1)  # (T,)
        u = x.reshape(-1, self.hidden_size)  # (T, H), all tokens
        weights, indices = self.route(u, input_ids)  # (T, k) each
        y = v4_experts(u, weights, indices, self.w_gate_up, self.w_down, self.swiglu_limit)  # (T, H)
        return (y + self.shared_experts(u)).reshape(x.shape)
