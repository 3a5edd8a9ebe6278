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
(``notebooks/GLOSSARY.md``) and ``transformers``' config fields (:meth:`DeepSeekMoE.from_config`); weights
are stored like ``transformers``' fused experts so conversion is a copy (``helpers.hf.moe_from_hf`` /
``moe_to_hf``).

The routed sum of eq. 12 is computed by a named backend (``layer.backend``). The readable one,
:func:`reference_experts`, is here: a loop over the experts, as in the papers. The fast ones are registered
in :mod:`helpers.moe.backends`; ``"auto"`` (the default) picks one of them by the work's size.

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.inputs import check_finite, check_hidden
from helpers.layers import SwiGLU
from helpers.moe.backends import register_backend, require_backend, run_backend
from helpers.moe.balancing import (
    Balancing,
    _expert_load,
    expert_level_aux_loss,
    max_violation,
    sequence_wise_aux_loss,
    update_bias,
)
from helpers.moe.routing import (
    GROUP_SCORES,
    SCORING_FUNCS,
    _gating_weights,
    affinity,
    default_group_score,
    select_experts,
)
from helpers.precision import compute_dtype
from helpers.rules import (
    require_bool,
    require_choice,
    require_count,
    require_number,
    require_positive,
    validate_routing,
)


@register_backend("reference")
def reference_experts(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """The routed sum of V3 eq. 12, ``y_t = sum_i g_{i,t} FFN_i(u_t)``, written as plainly as it reads.

    For each expert ``e``: the rows routed to it (the tokens ``t`` and the slots ``j`` with
    ``indices[t, j] == e``), ``g * FFN_e(rows)`` with ``FFN_e(x) = W_down (SiLU(W_gate x) * (W_up x))``,
    added back to those tokens with ``index_add``. An expert no token chose adds nothing. This is the
    ``"reference"`` backend every other backend is tested against; autograd differentiates it.

    Args:
        u: (T, H) tokens.
        weights: (T, k) gating values ``g``.
        indices: (T, k) chosen experts.
        w_gate_up: (E, 2I, H) fused gate and up projections (gate rows first).
        w_down: (E, H, I) down projections.

    Returns:
        (T, H), in ``u``'s dtype.
    """
    y = torch.zeros_like(u)  # (T, H)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(indices == e)  # (n_e,) each: the rows routed to expert e
        gate, up = F.linear(u[token], w_gate_up[e]).chunk(2, dim=-1)  # (n_e, I) each
        out = F.linear(F.silu(gate) * up, w_down[e])  # (n_e, H), FFN_e
        y.index_add_(0, token, (weights[token, slot, None] * out).to(y.dtype))  # y_t += g_{e,t} FFN_e(u_t)
    return y


def check_moe_settings(hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                       num_experts_per_tok: int, n_shared_experts: int, scoring_func: str, n_group: int,
                       topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float, group_score: str,
                       backend: str) -> None:
    """``ValueError``/``TypeError`` naming the first setting a :class:`DeepSeekMoE` cannot be built with (once, at build)."""
    require_positive(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size)
    require_count(n_shared_experts=n_shared_experts)
    validate_routing(n_routed_experts, num_experts_per_tok, n_group, topk_group)
    require_choice("scoring_func", scoring_func, SCORING_FUNCS)
    require_choice("group_score", group_score, GROUP_SCORES)
    require_bool(norm_topk_prob=norm_topk_prob)
    require_number("routed_scaling_factor", routed_scaling_factor, positive=True)
    require_backend(backend)


def moe_settings(config: Any) -> dict[str, Any]:
    """The one mapping from a ``transformers`` config to :class:`DeepSeekMoE`'s settings (same field names).

    ``DeepseekV3Config`` / ``DeepseekV32Config``: sigmoid scores, groups scored by their top-2 sum,
    ``norm_topk_prob``, ``n_group`` and ``topk_group`` as configured. ``DeepseekV2Config``: softmax scores,
    groups scored by their maximum; ``topk_method="greedy"`` ignores the groups, ``"group_limited_greedy"``
    uses them; V2's router never renormalises (``norm_topk_prob=False`` whatever the config says).
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU experts), got {config.hidden_act!r}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias must be False: our experts have no biases")
    settings = dict(hidden_size=config.hidden_size, moe_intermediate_size=config.moe_intermediate_size,
                    n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                    n_shared_experts=config.n_shared_experts or 0,
                    routed_scaling_factor=config.routed_scaling_factor)
    if model_type in ("deepseek_v3", "deepseek_v32"):
        return {**settings, "scoring_func": "sigmoid", "group_score": "top2_sum", "n_group": config.n_group or 1,
                "topk_group": config.topk_group or 1, "norm_topk_prob": config.norm_topk_prob}
    if model_type != "deepseek_v2":
        raise ValueError(f"config must be a DeepseekV3Config, DeepseekV32Config or DeepseekV2Config, got {model_type!r}")
    v2 = {**settings, "scoring_func": "softmax", "group_score": "max", "norm_topk_prob": False}
    if config.topk_method == "greedy":
        return {**v2, "n_group": 1, "topk_group": 1}
    if config.topk_method == "group_limited_greedy":
        return {**v2, "n_group": config.n_group, "topk_group": config.topk_group}
    raise ValueError(f"topk_method must be 'greedy' or 'group_limited_greedy', got {config.topk_method!r}")


def check_moe_forward(layer: Any, u: Any) -> None:
    """A MoE layer's entry check: ``u (..., T, H)`` float like ``gate_weight`` (rank, width, dtype, device).

    The scan for NaN and inf runs in training mode only: there top-k over NaN scores would pick arbitrary
    experts and count them in the load statistics that steer the bias. At eval and decode it is skipped.
    """
    check_hidden("u", u, layer.hidden_size, layer.gate_weight, min_rank=2,
                 layout=f"[batch, tokens, hidden_size={layer.hidden_size}] (or [tokens, hidden_size])",
                 owner="the MoE layer")
    if layer.training:
        check_finite("u", u, "top-k over NaN scores picks arbitrary experts and would count them in the load "
                             "statistics that steer the bias")


@dataclass
class RoutingStats:
    """What the last forward routed: per-expert load (E,), MaxVio, gating values and experts (T, k)."""

    load: Tensor
    max_vio: Tensor
    weights: Tensor
    indices: Tensor


class DeepSeekMoE(nn.Module):
    """The DeepSeekMoE layer of DeepSeek-V2 and V3: shared + routed fine-grained experts (V3 eq. 12-16).

    Build it from a ``transformers`` config with :meth:`from_config`, or with the settings themselves:

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
        gamma, aux_loss_alpha, seq_aux_loss_alpha: the training-only settings (:class:`Balancing`): the bias
            update speed ``gamma`` for :meth:`update_bias`, ``alpha_1`` of the expert-level loss (V2 eq. 23-25)
            over all tokens of the forward call, ``alpha`` of V3's sequence-wise loss (V3 eq. 17-20) per
            sequence of the input's second-to-last dimension (0: off). With softmax scores the sequence-wise
            loss is V2's per-sequence loss.
        group_score: ``"top2_sum"`` or ``"max"``; default follows ``scoring_func`` (V3 / V2).
        balancing: the three training settings as one :class:`Balancing` (instead of the three numbers).
        backend: how the routed experts are computed: a name in :data:`helpers.moe.backends.BACKENDS`
            (``"auto"``: the fast one for the work's size; ``"reference"``: :func:`reference_experts`).

    Parameters: ``gate_weight`` (E, H) (the centroids ``e_i``), buffer ``bias`` (E,) (``b_i``, no
    gradient), ``w_gate_up`` (E, 2I, H), ``w_down`` (E, H, I), ``shared_experts`` (a :class:`SwiGLU` or None).
    ``settings`` holds the build settings by ``transformers``' field names (``DeepSeekMoE(**layer.settings)``
    builds the same layer).

    ``forward`` returns only the output; after it, ``self.last_stats`` (a :class:`RoutingStats`, computed when
    first read) and ``self.aux_loss`` (a scalar tensor, 0 when both alphas are 0) hold the statistics and the loss.

    Dtypes: the router (logits, scores, top-k, gating values) computes in at least fp32
    (:func:`helpers.precision.compute_dtype`); the experts run in the layer's dtype (e.g. bf16).

    Both auxiliary losses average the per-token *normalised* scores ``s' = s / sum_j s`` (V3 eq. 19),
    also with ``scoring_func="sigmoid"`` and ``aux_loss_alpha``: V2's formula on raw sigmoid scores
    could be lowered by pushing every score down without moving a token. For softmax ``s' = s``.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 num_experts_per_tok: int, n_shared_experts: int = 0, scoring_func: str = "sigmoid",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, gamma: float = 0.0, aux_loss_alpha: float = 0.0,
                 seq_aux_loss_alpha: float = 0.0, group_score: str | None = None, *,
                 balancing: Balancing | None = None, backend: str = "auto") -> None:
        super().__init__()
        group_score = group_score or default_group_score(scoring_func)
        check_moe_settings(hidden_size, moe_intermediate_size, n_routed_experts, num_experts_per_tok,
                           n_shared_experts, scoring_func, n_group, topk_group, norm_topk_prob,
                           routed_scaling_factor, group_score, backend)
        if balancing is not None and (gamma or aux_loss_alpha or seq_aux_loss_alpha):
            raise ValueError("pass the training settings either as balancing=Balancing(...) or as gamma, "
                             "aux_loss_alpha, seq_aux_loss_alpha, not both")
        self.balancing = balancing or Balancing(gamma, aux_loss_alpha, seq_aux_loss_alpha)
        self.settings = dict(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                             n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
                             n_shared_experts=n_shared_experts, scoring_func=scoring_func, n_group=n_group,
                             topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                             routed_scaling_factor=float(routed_scaling_factor), group_score=group_score)
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.n_routed_experts, self.top_k, self.n_shared_experts = n_routed_experts, num_experts_per_tok, n_shared_experts
        self.scoring_func, self.group_score = scoring_func, group_score
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.backend = backend

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

    @classmethod
    def from_config(cls, config: Any, balancing: Balancing | None = None, backend: str | None = None) -> DeepSeekMoE:
        """The layer a ``transformers`` ``DeepseekV3Config``, ``DeepseekV32Config`` or ``DeepseekV2Config`` describes.

        Args:
            config: the config; its MoE fields keep their names (:func:`moe_settings` maps V2's ``topk_method``).
            balancing: the training-only settings (default: none, :class:`Balancing`).
            backend: the experts' backend; default ``config.moe_backend`` if the config has one, else ``"auto"``.
        """
        backend = backend or getattr(config, "moe_backend", None) or "auto"
        return cls(**moe_settings(config), balancing=balancing, backend=backend)

    @property
    def backend(self) -> str:
        """The name of the backend that computes the routed experts (:data:`helpers.moe.backends.BACKENDS`)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        require_backend(name)
        self._backend = name

    @property
    def gamma(self) -> float:
        """The bias update speed (``self.balancing.gamma``)."""
        return self.balancing.gamma

    @property
    def aux_loss_alpha(self) -> float:
        """``alpha_1`` of the expert-level loss (``self.balancing.aux_loss_alpha``)."""
        return self.balancing.aux_loss_alpha

    @property
    def seq_aux_loss_alpha(self) -> float:
        """``alpha`` of the sequence-wise loss (``self.balancing.seq_aux_loss_alpha``)."""
        return self.balancing.seq_aux_loss_alpha

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
                f"routed_scaling_factor={self.routed_scaling_factor}, backend={self.backend!r}")

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (B, T, H) (any leading dims) -> the FFN output (B, T, H), without the residual.

        Side effects: ``self.last_stats``, ``self.aux_loss``, and (in training mode) the load counted
        towards the next :meth:`update_bias`. Bad input (shape, dtype, device; NaN or inf in training mode)
        raises before any of them changes (:func:`check_moe_forward`).
        """
        check_moe_forward(self, u)
        shape = u.shape
        x = u.reshape(-1, self.hidden_size)  # (T, H) with T = all tokens
        dtype = compute_dtype(x.dtype)
        logits = F.linear(x.to(dtype), self.gate_weight.to(dtype))  # (T, E)
        scores = affinity(logits, self.scoring_func)  # (T, E)
        indices = select_experts((scores + self.bias.to(dtype)).detach(), self.top_k, self.n_group,
                                 self.topk_group, self.group_score)  # (T, k)
        weights = _gating_weights(scores, indices, self.norm_topk_prob, self.routed_scaling_factor)  # (T, k)
        y = run_backend(self.backend, x, weights, indices, self.w_gate_up, self.w_down)  # (T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        load = None
        if self.training:
            load = _expert_load(indices, self.n_routed_experts)  # (E,)
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
                load = _expert_load(indices, self.n_routed_experts)  # (E,)
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
        self.bias.copy_(update_bias(self.bias, self.load_since_update, self.balancing.gamma))
        self.load_since_update.zero_()
