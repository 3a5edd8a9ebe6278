"""Manifold-constrained hyper-connections (mHC): ``n_hc`` residual streams mixed by a doubly stochastic matrix.

DeepSeek-V4 (report §2.2; Xie et al. 2026, "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880)
widens the residual stream of every block into ``n_hc`` streams ``X_l`` of shape ``(n_hc, d)`` per token
and replaces ``x_{l+1} = x_l + F(x_l)`` with::

    X_{l+1} = B_l X_l + C_l F_l(A_l X_l)                  (V4 report §2.2; the mHC paper's H^res, H^post, H^pre)

- ``A_l`` (1, n_hc), the *pre* map: collapses the streams into the block's input, ``sigmoid(.) + eps``;
- ``C_l`` (n_hc, 1), the *post* map: spreads the block's output over the streams, ``2 sigmoid(.)``;
- ``B_l`` (n_hc, n_hc), the *residual* map: mixes the streams, projected onto the doubly stochastic matrices
  (the Birkhoff polytope: rows and columns sum to 1) by Sinkhorn-Knopp. A product of doubly stochastic
  matrices is doubly stochastic, so however many layers are stacked the residual path neither amplifies nor
  attenuates the streams' mean: that is the "manifold constraint", and what unconstrained hyper-connections lack.

All three are *dynamic*: computed per token from the RMS-normalised flattened streams ``x = vec(X_l)`` (n_hc d)
by one linear map ``fn``, a learned per-entry ``base`` and a per-map ``scale`` (the mHC paper's dynamic maps)::

    [a; c; b] = scale * (fn x) + base,   A = sigmoid(a) + eps,   C = 2 sigmoid(c),   B = Sinkhorn(b)

``transformers`` names them ``pre``, ``post`` and ``comb``, and its ``comb`` is ``B_l`` transposed: the new
streams are ``post * F + comb^T X`` (:class:`HyperConnection` does the same, so a converted module is a copy).
The maps are computed in float32 whatever the streams' dtype, like ``transformers`` (``_keep_in_fp32_modules``).

=====================  ====================================================================================
name                   what
=====================  ====================================================================================
:func:`sinkhorn`       Sinkhorn-Knopp from logits: a softmax over each row, then columns and rows in turn
:func:`expand_streams` ``(B, T, d) -> (B, T, n_hc, d)``: ``n_hc`` copies of the embedding (before block 0)
:class:`HyperConnection`  one mHC around one sub-layer (attention or MoE): :meth:`~HyperConnection.maps`,
                       :meth:`~HyperConnection.collapse`, ``forward(streams, sublayer)``
:class:`HyperHead`     the last collapse of the streams into one hidden state, before the final norm
=====================  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.rules import require_count, require_number, require_positive


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Sinkhorn-Knopp (Sinkhorn and Knopp 1967) onto the doubly stochastic matrices, as mHC and V4 (§2.2) use it.

    ``M = softmax(logits, rows) + eps`` is positive with rows summing to 1 (the softmax is the first row
    normalisation); then the columns are normalised, and ``iters - 1`` more times the rows, then the columns.
    Each normalisation divides by the sum plus ``eps``. After the last step the columns sum to 1 (up to
    ``eps``) and the rows nearly so; the rows converge as ``iters`` grows.

    Args:
        logits: (..., n, n) real matrices.
        iters: ``t_max`` (``hc_sinkhorn_iters``), at least 1.
        eps: ``hc_eps``, the floor added after the softmax and to every sum.

    Returns:
        (..., n, n) nearly doubly stochastic matrices, in ``logits``' dtype.
    """
    m = logits.softmax(dim=-1) + eps  # (..., n, n): rows sum to 1
    m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns sum to 1
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns
    return m


def expand_streams(x: Tensor, hc_mult: int) -> Tensor:
    """``x`` (B, T, d) -> (B, T, n_hc, d): the embedding copied into every stream (V4 report §2.2).

    A fresh tensor (not a view), as ``DeepseekV4Model`` makes it, so writing one stream changes no other.
    """
    return x.unsqueeze(-2).expand(*x.shape[:-1], hc_mult, x.shape[-1]).contiguous()


def _rms_norm(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without a weight, over the last dim (the flattened streams): ``x / sqrt(mean(x^2) + eps)``."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def _check_hc_settings(hidden_size: int, hc_mult: int, eps: float, norm_eps: float, sinkhorn_iters: int = 1) -> None:
    require_positive(hidden_size=hidden_size, hc_mult=hc_mult, hc_sinkhorn_iters=sinkhorn_iters)
    require_number("hc_eps", eps)
    require_number("rms_norm_eps", norm_eps)


class HyperConnection(nn.Module):
    """One manifold-constrained hyper-connection around a sub-layer ``F_l`` (V4 report §2.2).

    Args:
        hidden_size: ``d``, the width of one stream (and of ``F_l``'s input and output).
        hc_mult: ``n_hc``, the number of residual streams (4 in V4).
        sinkhorn_iters: ``t_max`` (``hc_sinkhorn_iters``, 20 in V4).
        eps: ``hc_eps``: added to ``A``, after the softmax and to every Sinkhorn sum.
        norm_eps: ``rms_norm_eps`` of the weightless RMSNorm on the flattened streams.

    Parameters (``transformers``' names and layouts): ``fn`` ((2 + n_hc) n_hc, n_hc d), the rows for ``A``, then
    ``C``, then ``B`` (row-major); ``base`` ((2 + n_hc) n_hc,), split the same way; ``scale`` (3,), one factor
    for each of ``A``, ``C``, ``B``. Initialised like ``transformers``' ``_init_weights`` (``fn`` normal with std
    0.02, ``base`` zeros, ``scale`` ones): at ``base = 0``, ``A`` and ``C`` start near 1/2 and 1 and ``B`` near
    the uniform matrix, not the identity.
    """

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        _check_hc_settings(hidden_size, hc_mult, eps, norm_eps, sinkhorn_iters)
        self.hidden_size, self.hc_mult, self.sinkhorn_iters = hidden_size, hc_mult, sinkhorn_iters
        self.eps, self.norm_eps = float(eps), float(norm_eps)
        n = hc_mult
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden_size))  # ((2+n)n, n d)
        self.base = nn.Parameter(torch.empty((2 + n) * n))  # ((2+n)n,)
        self.scale = nn.Parameter(torch.empty(3))  # (3,): pre, post, comb
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Any) -> HyperConnection:
        """The mHC a ``DeepseekV4Config`` describes (``hidden_size``, ``hc_mult``, ``hc_sinkhorn_iters``,
        ``hc_eps``, ``rms_norm_eps``)."""
        return cls(config.hidden_size, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps)

    def reset_parameters(self) -> None:
        """``fn`` ~ N(0, 0.02), ``base`` = 0, ``scale`` = 1 (as ``DeepseekV4PreTrainedModel._init_weights``)."""
        nn.init.normal_(self.fn, std=0.02)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def extra_repr(self) -> str:
        return f"d={self.hidden_size}, n_hc={self.hc_mult}, t_max={self.sinkhorn_iters}, eps={self.eps}"

    def maps(self, streams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The three dynamic maps of one token's streams (V4 report §2.2), in float32.

        Args:
            streams: (B, T, n_hc, d).

        Returns:
            ``pre`` (B, T, n_hc) = ``A_l``, ``post`` (B, T, n_hc) = ``C_l``, ``comb`` (B, T, n_hc, n_hc) =
            ``B_l^T`` (``transformers``' layout: ``comb[j, k]`` is how much of stream ``j`` goes to stream ``k``).
        """
        n = self.hc_mult
        x = _rms_norm(streams.flatten(-2).float(), self.norm_eps)  # (B, T, n d): vec(X_l), normalised
        mixes = F.linear(x, self.fn.float())  # (B, T, (2+n) n)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(s_pre * pre_w + pre_b) + self.eps  # (B, T, n): A_l
        post = 2 * torch.sigmoid(s_post * post_w + post_b)  # (B, T, n): C_l
        comb_logits = (s_comb * comb_w + comb_b).unflatten(-1, (n, n))  # (B, T, n, n)
        return pre, post, sinkhorn(comb_logits, self.sinkhorn_iters, self.eps)

    @staticmethod
    def collapse(streams: Tensor, pre: Tensor) -> Tensor:
        """``A_l X_l``: the weighted sum of the streams, (B, T, n_hc, d) -> (B, T, d), in ``streams``' dtype."""
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)

    def forward(self, streams: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """``X_{l+1} = B_l X_l + C_l F_l(A_l X_l)`` (V4 report §2.2).

        Args:
            streams: ``X_l`` (B, T, n_hc, d).
            sublayer: ``F_l``, a callable (B, T, d) -> (B, T, d) (the block's norm and attention, or norm and MoE).

        Returns:
            ``X_{l+1}`` (B, T, n_hc, d), in ``streams``' dtype.
        """
        pre, post, comb = self.maps(streams)  # (B,T,n), (B,T,n), (B,T,n,n)
        out = sublayer(self.collapse(streams, pre))  # (B, T, d)
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)  # (B, T, n, d): B_l X_l
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """The last collapse of the ``n_hc`` streams into one hidden state (before the final RMSNorm and the head).

    The pre map of an mHC alone: ``h = sum_j a_j X_j`` with ``a = sigmoid(scale (fn x) + base) + eps`` and ``x``
    the RMS-normalised flattened streams (V4 report §2.2). Parameters as ``transformers``' ``DeepseekV4HyperHead``:
    ``hc_fn`` (n_hc, n_hc d), ``hc_base`` (n_hc,), ``hc_scale`` (1,).

    Args:
        hidden_size: ``d``. hc_mult: ``n_hc``. eps: ``hc_eps``. norm_eps: ``rms_norm_eps``.
    """

    def __init__(self, hidden_size: int, hc_mult: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        _check_hc_settings(hidden_size, hc_mult, eps, norm_eps)
        self.hidden_size, self.hc_mult, self.eps, self.norm_eps = hidden_size, hc_mult, float(eps), float(norm_eps)
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))  # (n, n d)
        self.hc_base = nn.Parameter(torch.empty(hc_mult))  # (n,)
        self.hc_scale = nn.Parameter(torch.empty(1))  # (1,)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Any) -> HyperHead:
        """The head a ``DeepseekV4Config`` describes (``hidden_size``, ``hc_mult``, ``hc_eps``, ``rms_norm_eps``)."""
        return cls(config.hidden_size, config.hc_mult, config.hc_eps, config.rms_norm_eps)

    def reset_parameters(self) -> None:
        """``hc_fn`` ~ N(0, 0.02), ``hc_base`` = 0, ``hc_scale`` = 1 (as ``transformers``' ``_init_weights``)."""
        nn.init.normal_(self.hc_fn, std=0.02)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def extra_repr(self) -> str:
        return f"d={self.hidden_size}, n_hc={self.hc_mult}, eps={self.eps}"

    def forward(self, streams: Tensor) -> Tensor:
        """``streams`` (B, T, n_hc, d) -> (B, T, d), in ``streams``' dtype."""
        x = _rms_norm(streams.flatten(-2).float(), self.norm_eps)  # (B, T, n d)
        pre = torch.sigmoid(F.linear(x, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return HyperConnection.collapse(streams, pre)  # (B, T, d)


def stack_gain(n_layers: int, hc_mult: int, constrained: bool, *, spread: float = 1.0, seed: int = 0) -> Tensor:
    """The signal gain of the residual path through a deep stack: ``max row sum of |prod_l B_l|`` per depth.

    The mHC paper measures how much the composite residual map ``prod_l B_l`` can amplify a signal (its largest absolute
    row sum, the infinity norm). Each ``B_l`` here is random: unconstrained, ``B_l = I + spread * N(0, 1) / n_hc``
    (HC's free matrix near the identity it starts from); constrained, ``B_l = sinkhorn(spread * N(0, 1))`` with
    ``t_max = 20`` (mHC). Seeded; float64.

    Returns:
        (n_layers,) the gain after 1, 2, ..., ``n_layers`` layers.
    """
    require_count(seed=seed)
    require_positive(n_layers=n_layers, hc_mult=hc_mult)
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(hc_mult, dtype=torch.float64)
    prod, gains = eye.clone(), []
    for _ in range(n_layers):
        noise = spread * torch.randn(hc_mult, hc_mult, generator=gen, dtype=torch.float64)  # (n, n)
        b = sinkhorn(noise, 20, 1e-6) if constrained else eye + noise / hc_mult
        prod = b @ prod
        gains.append(prod.abs().sum(dim=-1).max())
    return torch.stack(gains)
