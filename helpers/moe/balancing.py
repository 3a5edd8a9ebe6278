"""Load-balance statistics and the three balancing methods of DeepSeekMoE.

:class:`Balancing` holds a layer's training-only settings (``gamma`` and the two loss weights) together.

``expert_load`` and ``max_violation`` (MaxVio) measure the balance; ``update_bias`` is the
auxiliary-loss-free bias update (arXiv 2408.15664 Algorithm 1, V3 §2.1.2); ``expert_level_aux_loss``
(V2 eq. 23-25) and ``sequence_wise_aux_loss`` (V3 eq. 17-20) are the auxiliary losses.

The two losses are one formula, ``alpha * sum_i f_i P_i``; they differ in what ``T`` counts and in
the scores. Both papers count the tokens of one *sequence* (V2 §2.2.3, V3 §2.1.2);
``expert_level_aux_loss`` pools every token it is given (over a batch: the "batch-wise auxiliary
loss" of V3 §4.5.3), ``sequence_wise_aux_loss`` averages over sequences. ``P_i`` must average a
distribution over the experts: V2's softmax scores are one; V3's sigmoid scores are normalised per
token first, ``s' = s / sum_j s`` (V3 eq. 19). On raw sigmoid scores the loss could be lowered by
pushing *every* score down, without moving a single token, so both functions always normalise
(for softmax scores this changes neither the value nor the gradient with respect to the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from helpers.inputs import check_expert_ids, require_tensor
from helpers.rules import require_number


@dataclass(frozen=True)
class Balancing:
    """The training-only settings of a DeepSeekMoE layer, together (checked once, when made: finite, >= 0).

    Args:
        gamma: bias update speed ``gamma`` (V3 §2.1.2, 2408.15664 Algorithm 1; 0: the bias never moves).
        aux_loss_alpha: ``alpha_1`` of the expert-level loss (V2 eq. 23-25) over all tokens of a forward call
            (a batch: V3 §4.5.3's batch-wise loss; V2 itself counts one sequence) (0: off).
        seq_aux_loss_alpha: ``alpha`` of V3's sequence-wise loss (V3 eq. 17-20), per sequence (0: off).
    """

    gamma: float = 0.0
    aux_loss_alpha: float = 0.0
    seq_aux_loss_alpha: float = 0.0

    def __post_init__(self) -> None:
        for name in ("gamma", "aux_loss_alpha", "seq_aux_loss_alpha"):
            require_number(name, getattr(self, name))


def expert_load(indices: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert, ``load_i = sum_t 1(i in chosen(t))``, as a float (E,) tensor.

    ``indices`` (..., k) are integer expert ids in ``[0, n_experts)`` (checked: an id out of range raises).
    """
    check_expert_ids("indices", indices, n_experts, rank=None)
    return _expert_load(indices, n_experts)


def _expert_load(indices: Tensor, n_experts: int) -> Tensor:
    """:func:`expert_load` unchecked: the layer's own call on the ids its router chose."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()  # (E,)


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (arXiv 2408.15664 eq. 4); 0 is perfect balance.

    ``load`` (E,); no token at all (every load 0) counts as balanced: 0, not 0/0.
    """
    require_tensor("load", load, "[experts]")
    if load.dim() != 1 or not load.numel():
        raise ValueError(f"load must be one count per expert [experts], got shape {tuple(load.shape)}: "
                         "pass expert_load(indices, n_experts)")
    mean = load.float().mean()
    return (load.max() - mean) / mean.clamp(min=torch.finfo(mean.dtype).tiny)  # no tokens: 0 / tiny = 0


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, gamma: float) -> Tensor:
    """Auxiliary-loss-free update ``b_i <- b_i + gamma * sign(mean load - load_i)`` (2408.15664 Algorithm 1).

    Overloaded experts get a lower bias, idle ones a higher bias (V3 §2.1.2, where the speed is
    called ``gamma``; the paper's Algorithm 1 calls it ``u``). Returns a new tensor.
    """
    require_tensor("bias", bias, "[experts]")
    require_tensor("load", load, "[experts]")
    if bias.dim() != 1 or load.shape != bias.shape:
        raise ValueError(f"bias and load must both be [experts] of the same length, got bias {tuple(bias.shape)} "
                         f"and load {tuple(load.shape)}: pass expert_load(indices, n_experts) for the layer's bias")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0 (the bias update speed), got {gamma!r}")
    return bias + gamma * torch.sign(load.float().mean() - load.float()).to(bias.dtype)


def normalized_scores(scores: Tensor) -> Tensor:
    """``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` (V3 eq. 19): each token's affinities as a distribution."""
    return scores / scores.sum(dim=-1, keepdim=True)


def expert_level_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """The expert-level balance loss ``alpha * sum_i f_i P_i`` over all given tokens (V2 eq. 23-25).

    ``f_i = N_r / (K_r T) * sum_t 1(t chose i)`` (1 for every expert at perfect balance) and
    ``P_i = 1/T * sum_t s'_{i,t}`` with ``s'`` the per-token normalised scores (V3 eq. 19; for V2's
    softmax scores ``s' = s``, and the loss is exactly V2's). ``T`` is every token passed in: one
    sequence gives the papers' definition, a flattened batch the batch-wise loss of V3 §4.5.3.
    Gradients flow through ``P`` only. Equals ``alpha`` at perfect balance with uniform affinities.

    Args:
        scores: (..., E) affinities of all tokens, softmax or sigmoid (leading dims are flattened).
        indices: (..., k) chosen experts.
        n_experts: ``N_r``.
        alpha: ``alpha_1``.

    Returns:
        A scalar tensor.
    """
    _check_loss_inputs(scores, indices, n_experts)
    scores = normalized_scores(scores.reshape(-1, n_experts))  # (T, E)
    n_tokens, top_k = scores.shape[0], indices.shape[-1]
    if n_tokens == 0:
        return scores.sum() * 0.0  # no token, no imbalance (keeps the graph)
    f = expert_load(indices, n_experts).to(scores.dtype) * n_experts / (top_k * n_tokens)  # (E,)
    p = scores.mean(dim=0)  # (E,)
    return alpha * (f * p).sum()


def sequence_wise_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (V3 eq. 17-20), averaged over sequences.

    Per sequence of ``T`` tokens: ``f_i = N_r / (K_r T) * sum_t 1(t chose i)`` (eq. 18),
    ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` (eq. 19), ``P_i = 1/T * sum_t s'_{i,t}`` (eq. 20),
    ``L_Bal = alpha * sum_i f_i P_i`` (eq. 17). With softmax scores this is V2's expert-level loss
    (eq. 23-25) taken per sequence, as V2 defines it.

    Args:
        scores: (B, T, E) affinities (sigmoid in V3; normalised per token here), or (T, E) for one sequence.
        indices: (B, T, k) or (T, k) chosen experts.
        n_experts: ``N_r``.
        alpha: the balance factor.

    Returns:
        A scalar tensor: the mean of ``L_Bal`` over the ``B`` sequences.
    """
    _check_loss_inputs(scores, indices, n_experts)
    if scores.dim() not in (2, 3) or indices.dim() != scores.dim():
        raise ValueError(f"scores and indices must be [batch, tokens, ...] or [tokens, ...] alike, got scores "
                         f"{tuple(scores.shape)} and indices {tuple(indices.shape)}")
    if scores.dim() == 2:
        scores, indices = scores.unsqueeze(0), indices.unsqueeze(0)
    _, n_tokens, _ = scores.shape
    top_k = indices.shape[-1]
    if n_tokens == 0:
        return scores.sum() * 0.0  # no token, no imbalance (keeps the graph)
    chosen = F.one_hot(indices, n_experts).sum(dim=-2).to(scores.dtype)  # (B, T, E) 0/1
    f = chosen.sum(dim=1) * n_experts / (top_k * n_tokens)  # (B, E)
    p = normalized_scores(scores).mean(dim=1)  # (B, E)
    return alpha * (f * p).sum(dim=-1).mean()


def _check_loss_inputs(scores: Tensor, indices: Tensor, n_experts: int) -> None:
    """Scores (..., E) float and indices (..., k) expert ids over the same tokens."""
    require_tensor("scores", scores, "[..., tokens, experts]")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be floating-point affinities, got {scores.dtype}: pass the router's scores")
    if scores.dim() == 0 or scores.shape[-1] != n_experts:
        raise ValueError(f"scores must end in n_experts={n_experts}, got shape {tuple(scores.shape)}: pass the "
                         "affinities of every expert, or the matching n_experts")
    check_expert_ids("indices", indices, n_experts, rank=None)
    if indices.dim() == 0 or indices.shape[:-1] != scores.shape[:-1]:
        raise ValueError(f"indices {tuple(indices.shape)} must cover the same tokens as scores "
                         f"{tuple(scores.shape)} (all dims but the last equal): pass the experts chosen for these scores")
