"""Load-balance statistics and the three balancing methods of DeepSeekMoE.

``expert_load`` and ``max_violation`` (MaxVio) measure the balance; ``update_bias`` is the
auxiliary-loss-free bias update (arXiv 2408.15664, V3 §2.1.2); ``expert_level_aux_loss`` is V2's
expert-level loss and ``sequence_wise_aux_loss`` V3's complementary sequence-wise loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_load(indices: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert, ``load_i = sum_t 1(i in chosen(t))``, as a float (E,) tensor."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


def max_violation(load: Tensor) -> Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (arXiv 2408.15664 eq. 4); 0 is perfect balance."""
    mean = load.float().mean()
    return (load.max() - mean) / mean


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, gamma: float) -> Tensor:
    """Auxiliary-loss-free update ``b_i <- b_i + gamma * sign(mean load - load_i)`` (2408.15664 eq. 3-4).

    Overloaded experts get a lower bias, idle ones a higher bias (V3 §2.1.2). Returns a new tensor.
    """
    return bias + gamma * torch.sign(load.float().mean() - load.float()).to(bias.dtype)


def expert_level_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """DeepSeek-V2's expert-level balance loss (V2 eq. 23-25; DeepSeekMoE eq. 12-14).

    ``L = alpha * sum_i f_i P_i``, ``f_i = N_r / (K_r T) * sum_t 1(t chose i)``,
    ``P_i = 1/T * sum_t s_{i,t}``. Gradients flow through ``P`` only. Equals ``alpha`` at perfect balance
    with uniform affinities.

    Args:
        scores: (..., E) softmax affinities of all tokens (leading dims are flattened).
        indices: (..., k) chosen experts.
        n_experts: ``N_r``.
        alpha: ``alpha_1``.

    Returns:
        A scalar tensor.
    """
    scores = scores.reshape(-1, n_experts)  # (T, E)
    n_tokens, top_k = scores.shape[0], indices.shape[-1]
    f = expert_load(indices, n_experts).to(scores.dtype) * n_experts / (top_k * n_tokens)  # (E,)
    p = scores.mean(dim=0)  # (E,)
    return alpha * (f * p).sum()


def sequence_wise_aux_loss(scores: Tensor, indices: Tensor, n_experts: int, alpha: float) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (V3 eq. 17-20), averaged over sequences.

    Per sequence of ``T`` tokens: ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}`` (eq. 19),
    ``f_i = N_r / (K_r T) * sum_t 1(t chose i)`` (eq. 18), ``P_i = 1/T * sum_t s'_{i,t}`` (eq. 20),
    ``L_Bal = alpha * sum_i f_i P_i`` (eq. 17).

    Args:
        scores: (B, T, E) affinities (sigmoid in V3; normalised per token here), or (T, E) for one sequence.
        indices: (B, T, k) or (T, k) chosen experts.
        n_experts: ``N_r``.
        alpha: the balance factor.

    Returns:
        A scalar tensor: the mean of ``L_Bal`` over the ``B`` sequences.
    """
    if scores.dim() == 2:
        scores, indices = scores.unsqueeze(0), indices.unsqueeze(0)
    _, n_tokens, _ = scores.shape
    top_k = indices.shape[-1]
    chosen = F.one_hot(indices, n_experts).sum(dim=-2).to(scores.dtype)  # (B, T, E) 0/1
    f = chosen.sum(dim=1) * n_experts / (top_k * n_tokens)  # (B, E)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return alpha * (f * p).sum(dim=-1).mean()
