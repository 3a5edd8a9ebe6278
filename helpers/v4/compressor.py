"""V4's KV compressors (HCA, CSA) and CSA's lightning indexer (V4 report §2.3.1-2.3.2).

**HCA** (heavily compressed attention, §2.3.2): the tokens are cut into windows of ``m'`` (``compress_rates[
"heavily_compressed_attention"]``); each window is pooled into ONE entry by a softmax gate over the window's
tokens, per channel, with a learned bias for each place in the window::

    C^Comp_w = sum_{j in window w} softmax_j(Z_j + B_j) * C_j        (eq. 20-23; * and softmax per channel)

with ``C = H W^KV`` (``kv_proj``), ``Z = H W^Z`` (``gate_proj``), ``B`` (``position_bias``, ``(m', d)``). The
entry is then RMS-normalised (``kv_norm``) and its trailing RoPE slice rotated at the window's first position
``w m'``.

**CSA** (compressed sparse attention, §2.3.1): windows of ``m`` that *overlap*: every token projects to two
series, ``C^a`` (``[..., :d]``) and ``C^b`` (``[..., d:]``), and entry ``w`` pools window ``w - 1``'s ``C^a`` together
with window ``w``'s ``C^b``: ``2m`` tokens, stride ``m`` (eq. 9-12). Entry 0 has no previous window (its ``C^a``
half gets gate ``-inf``, weight 0). The **lightning indexer** (eq. 13-17) compresses the same windows at its own
width ``c^I`` and scores each query against the entries, ``I_{t,s} = sum_h w_{t,h} ReLU(q_{t,h} . K^I_s)``; each
query keeps its top-``k`` visible entries.

Names follow ``transformers`` (``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``, ``q_b_proj``,
``weights_proj``); :mod:`helpers.v4.hf.attention` maps them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.dsa.indexer import index_scores as v32_index_scores
from helpers.v4.cache import CompressorState, visible_entries
from helpers.v4.norms import V4RMSNorm
from helpers.v4.rope import rope_cos_sin, rope_phase, rotate_trailing, rotate_trailing_by


def pool_windows(kv: Tensor, gate: Tensor, overlap: bool, prev_kv: Tensor | None = None,
                 prev_gate: Tensor | None = None) -> Tensor:
    """Softmax-gated pooling of closed windows (eq. 20-22 for HCA, eq. 9-12 for CSA), before ``kv_norm``.

    Args:
        kv, gate: ``(B, W, m, c d)``, the windows' projected tokens ``C`` and gate logits ``Z + B`` (``c = 2`` with
            ``overlap``, else 1).
        overlap: CSA's layout: entry ``w`` pools ``C^a`` of window ``w - 1`` (``[..., :d]``) and ``C^b`` of window
            ``w`` (``[..., d:]``), ``2m`` tokens.
        prev_kv, prev_gate: ``(B, m, d)``, the ``C^a`` half of the window before the first (from an earlier call);
            ``None``: there is none, those ``m`` slots get weight 0.

    Returns:
        ``(B, W, d)``: one entry per window; the softmax runs over the window's tokens (axis 2), in fp32.
    """
    if overlap:
        b, w, m, two_d = kv.shape
        d = two_d // 2
        if prev_kv is None:
            prev_kv, prev_gate = kv.new_zeros(b, m, d), gate.new_full((b, m, d), float("-inf"))
        ca_kv = torch.cat([prev_kv[:, None], kv[:, :-1, :, :d]], dim=1)  # (B, W, m, d): C^a shifted by one window
        ca_gate = torch.cat([prev_gate[:, None], gate[:, :-1, :, :d]], dim=1)  # (B, W, m, d)
        kv = torch.cat([ca_kv, kv[..., d:]], dim=2)  # (B, W, 2m, d): [C^a of w-1 ; C^b of w]
        gate = torch.cat([ca_gate, gate[..., d:]], dim=2)  # (B, W, 2m, d)
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)  # (B, W, m or 2m, d): over the tokens
    return (kv * weights).sum(dim=2)  # (B, W, d)


class Compressor(nn.Module):
    """Pools every closed window of ``ratio`` tokens into one entry of width ``head_dim`` (HCA, or CSA's overlap).

    Args:
        hidden_size: ``d_model``; head_dim: ``d`` (``c^I`` for the indexer's compressor).
        ratio: ``m`` (CSA) or ``m'`` (HCA); overlap: CSA's two-series layout (:func:`pool_windows`).
        rope_dim: ``d_R``, the trailing slice rotated at each entry's first position; rope_theta: its base.
        eps: ``kv_norm``'s epsilon.
    """

    def __init__(self, hidden_size: int, head_dim: int, ratio: int, overlap: bool, rope_dim: int,
                 rope_theta: float, eps: float) -> None:
        super().__init__()
        width = (2 if overlap else 1) * head_dim
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.rope_dim, self.rope_theta = rope_dim, rope_theta
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)  # W^KV: C = H W^KV
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)  # W^Z: Z = H W^Z
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))  # B: one bias per place in the window
        self.kv_norm = V4RMSNorm(head_dim, eps)

    def forward(self, x: Tensor, state: CompressorState | None = None) -> Tensor:
        """Entries of every closed window: ``x (B, T, d_model) -> (B, N, d)``.

        Without ``state`` the tokens are positions ``0..T-1`` and an incomplete last window is dropped; with one,
        the new tokens continue the pending ones, the new entries are appended, and all ``N`` entries so far
        are returned.
        """
        b = x.shape[0]
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # (B, T, c d) each
        if state is None:
            usable = x.shape[1] // self.ratio * self.ratio
            kv, gate, first, prev = kv[:, :usable], gate[:, :usable], 0, (None, None)
        else:
            kv, gate, first = state.close_windows(kv, gate)
            prev = (state.overlap_kv, state.overlap_gate)
        n_windows, width = kv.shape[1] // self.ratio, kv.shape[-1]
        kv = kv.view(b, n_windows, self.ratio, width)  # (B, W, m, c d)
        gate = gate.view(b, n_windows, self.ratio, width) + self.position_bias  # (B, W, m, c d): Z + B
        if n_windows and self.overlap and state is not None:  # the next call's entry 0 reads this C^a
            state.overlap_kv, state.overlap_gate = kv[:, -1, :, : self.head_dim], gate[:, -1, :, : self.head_dim]
        entries = self.kv_norm(pool_windows(kv, gate, self.overlap, *prev)) if n_windows else \
            kv.new_zeros(b, 0, self.head_dim)  # (B, W, d)
        positions = first + self.ratio * torch.arange(n_windows, device=x.device)  # each window's first token
        entries = rotate_trailing(entries, *rope_cos_sin(positions, self.rope_dim, self.rope_theta))  # (B, W, d)
        return entries if state is None else state.entries.append(entries)[0]  # (B, N, d)

    def step(self, x: Tensor, state: CompressorState, kv: Tensor, gate: Tensor) -> Tensor:
        """:meth:`forward` for one new token ``x (B, 1, d_model)`` with a state, given its projections ``kv, gate
        (B, 1, c d)`` (``kv_proj(x)``, ``gate_proj(x)``: :meth:`V4Attention.step` makes them in one product).
        While the window stays open they are only stored; the closing token pools that ONE window (eq. 9-12 or
        20-23) with its RoPE from a table (:func:`rope_phase`). Returns all ``N`` entries so far ``(B, N, d)``."""
        if state.pending_kv is None:  # no call before: the general path sets the state up
            return self(x, state)
        kv = torch.cat([state.pending_kv, kv], dim=1)  # (B, <= m, c d)
        gate = torch.cat([state.pending_gate, gate], dim=1)
        if kv.shape[1] < self.ratio:
            state.pending_kv, state.pending_gate = kv, gate
            return state.entries.views()[0] if state.entries.length else x.new_zeros(x.shape[0], 0, self.head_dim)
        return state.entries.append(self._close_one(kv, gate + self.position_bias, state))[0]  # (B, N, d)

    def _close_one(self, kv: Tensor, gate: Tensor, state: CompressorState) -> Tensor:
        """The entry ``(B, 1, d)`` of the window ``kv, gate (B, m, c d)`` (``gate`` with ``B`` added) that the
        newest token closed; updates the state (nothing pending, CSA's overlap)."""
        first = state.entries.length * self.ratio  # the window's first position
        state.pending_kv, state.pending_gate = kv[:, :0], gate[:, :0]
        if self.overlap and state.overlap_kv is not None:  # [C^a of w-1 ; C^b of w]: 2m tokens
            d = self.head_dim
            pooled_kv = torch.cat([state.overlap_kv, kv[..., d:]], dim=1)  # (B, 2m, d)
            pooled_gate = torch.cat([state.overlap_gate, gate[..., d:]], dim=1)
            weights = pooled_gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)  # (B, 2m, d)
            entry = (pooled_kv * weights).sum(dim=1, keepdim=True)  # (B, 1, d)
        else:  # HCA, or CSA's first window (no C^a before it)
            prev = (state.overlap_kv, state.overlap_gate)
            entry = pool_windows(kv[:, None], gate[:, None], self.overlap, *prev)  # (B, 1, d)
        if self.overlap:
            state.overlap_kv, state.overlap_gate = kv[..., : self.head_dim], gate[..., : self.head_dim]
        phase = rope_phase(first, self.rope_dim, self.rope_theta, kv.device)  # (d_R / 2,) complex
        return rotate_trailing_by(self.kv_norm(entry), phase)  # (B, 1, d)


def index_scores(q: Tensor, keys: Tensor, weights: Tensor) -> Tensor:
    """``I_{t,s} = sum_h w_{t,h} n_I^{-1/2} ReLU(c_I^{-1/2} q_{t,h} . K^I_s)`` in fp32 (eq. 16, ``transformers``' scales):
    V3.2's lightning-indexer score (:func:`helpers.dsa.indexer.index_scores`) over the compressed entries.

    Args:
        q: ``(B, T, n_I, c_I)`` rotated indexer queries; keys: ``(B, N, c_I)`` the indexer's compressed entries;
        weights: ``(B, T, n_I)`` raw head weights (``weights_proj``).

    Returns:
        ``(B, T, N)`` fp32 scores.
    """
    n_i, c_i = q.shape[-2], q.shape[-1]
    return v32_index_scores(q, keys, weights.float() * n_i ** -0.5, c_i ** -0.5)  # (B, T, N)


def select_topk(scores: Tensor, positions: Tensor, ratio: int, topk: int) -> tuple[Tensor, Tensor]:
    """Each query's ``topk`` best *visible* entries (eq. 17): ``indices, valid``, both ``(B, T, min(topk, N))``.

    Invisible entries (:func:`visible_entries`) score ``-inf`` first; a query with fewer than ``topk`` visible
    entries gets some invisible ones too, marked ``valid = False``.
    """
    allowed = visible_entries(positions, scores.shape[-1], ratio)  # (T, N)
    indices = scores.masked_fill(~allowed, float("-inf")).topk(min(topk, scores.shape[-1]), dim=-1).indices
    return indices, allowed.expand_as(scores).gather(-1, indices)  # (B, T, k) each


class LightningIndexer(nn.Module):
    """CSA's lightning indexer (eq. 13-17): its own overlapping compressor at width ``c^I``, queries from
    ``q_residual`` (the normalised ``c^Q_t``), one weight per indexer head from ``h_t``.

    Args:
        hidden_size, q_lora_rank: input widths; n_heads: ``n^I_h``; head_dim: ``c^I`` (at least ``rope_dim``);
        ratio: ``m``; rope_dim, rope_theta: the compressed branch's RoPE; eps: ``kv_norm``'s epsilon.
    """

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int,
                 rope_dim: int, rope_theta: float, eps: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.rope_theta = n_heads, head_dim, rope_dim, rope_theta
        self.compressor = Compressor(hidden_size, head_dim, ratio, True, rope_dim, rope_theta, eps)  # K^IComp
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)  # W^IUQ: c^Q_t -> q^I_{t,h}
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)  # W^w: h_t -> w_{t,h}

    def forward(self, x: Tensor, q_residual: Tensor, positions: Tensor, state: CompressorState | None = None
                ) -> Tensor:
        """Scores ``(B, T, N)`` of the queries at ``positions`` against every indexer entry so far."""
        b, t, _ = x.shape
        keys = self.compressor(x, state)  # (B, N, c_I)
        q = self.q_b_proj(q_residual).view(b, t, self.n_heads, self.head_dim)  # (B, T, n_I, c_I)
        cos, sin = rope_cos_sin(positions, self.rope_dim, self.rope_theta)  # (T, d_R / 2)
        q = rotate_trailing(q, cos[:, None], sin[:, None])  # (B, T, n_I, c_I)
        return index_scores(q, keys, self.weights_proj(x))  # (B, T, N)

    def step(self, x: Tensor, q_residual: Tensor, phase: Tensor, state: CompressorState, kv: Tensor, gate: Tensor,
             weights: Tensor) -> Tensor:
        """:meth:`forward` for one new token with a state, as two matrix products over all the keys (eq. 16):
        ``x (B, 1, d_model)``, ``q_residual (B, 1, d_c')``, ``phase`` its RoPE (:func:`rope_phase`), and ``x``'s
        projections by the compressor (``kv, gate``, see :meth:`Compressor.step`) and ``weights_proj``
        (``weights (B, 1, n_I)``) -> scores ``(B, 1, N)`` fp32. Every entry is visible to the newest token, so
        nothing is masked."""
        b = x.shape[0]
        keys = self.compressor.step(x, state, kv, gate)  # (B, N, c_I)
        q = rotate_trailing_by(self.q_b_proj(q_residual).view(b, self.n_heads, self.head_dim), phase)  # (B, n_I, c_I)
        dots = torch.relu(torch.bmm(q.float(), keys.float().transpose(1, 2)))  # (B, n_I, N)
        weights = weights.float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)  # (B, 1, n_I)
        return torch.bmm(weights, dots)  # (B, 1, N)
