"""DeepSeek-V4's attention layer: shared-KV multi-query attention over a sliding window plus compressed entries
(V4 report §2.3; ``transformers``' ``DeepseekV4Attention``).

Per token ``t`` at position ``p_t`` (§2.3.3):

1. query: ``c^Q_t = RMSNorm(W^DQ h_t)`` (``q_a_proj``, ``q_a_norm``; also the indexer's input ``q_residual``),
   ``q_{t,i} = RMSNorm(W^UQ_i c^Q_t)`` per head without weight (``q_b_proj``), RoPE on the trailing ``d_R``
   channels;
2. ONE key per token, which is also its value: ``kv_t = RMSNorm(W^KV h_t)`` (``kv_proj``, ``kv_norm``), RoPE on the
   trailing ``d_R`` channels;
3. attention of every head over the sliding window (``n_win`` tokens, itself included) and, in CSA/HCA layers,
   the compressed entries it may see (HCA: all closed windows; CSA: the indexer's top-k of them), with a learned
   **attention sink** ``z_i`` per head in the softmax denominator:
   ``p_{t,i,s} = exp(l_{t,i,s}) / (exp(z_i) + sum_s' exp(l_{t,i,s'}))`` -- a head may attend to nothing;
4. the values carried RoPE (``K = V``): the output's trailing ``d_R`` channels are rotated back by ``-p_t``, so a
   value rotated at ``p_s`` contributes at relative angle ``p_s - p_t``;
5. grouped output projection: the ``n_h`` heads are cut into ``g`` groups (``o_groups``), each group projected to
   ``d_g`` (``o_lora_rank``) by its own matrix (``o_a_proj``), then the ``g d_g`` vector to ``d_model`` (``o_b_proj``).

The attention itself (step 3) is looked up by name in :data:`V4_ATTENTION_BACKENDS`: ``"masked"`` (the default,
the plain reading and ``transformers``' way: every compressed entry is scored, the unchosen ones masked) and
``"gather"`` (each query gathers only its chosen entries: the cost of the compressed part is ``O(k)``, not
``O(N)``). Both take the same arguments and return the same numbers.

A layer's ``backend`` may also be :data:`AUTO`, the speed setting :class:`helpers.v4.model.DeepSeekV4` uses: a
one-token call with a cache takes :meth:`V4Attention.step` (no masks, RoPE from a table, the indexer as two
matrix products, only the chosen entries read), and a longer call takes ``"gather"`` in CSA layers with more
entries than ``index_topk`` and ``"masked"`` otherwise (HCA reads every entry anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.rules import closest_name, require_choice, require_number, require_positive
from helpers.v4.cache import V4Cache, visible_entries, window_mask
from helpers.v4.compressor import Compressor, LightningIndexer, select_topk
from helpers.v4.norms import V4RMSNorm, unweighted_rms_norm
from helpers.v4.rope import rope_cos_sin, rope_phase, rotate_trailing, rotate_trailing_by

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SWA, CSA, HCA)
AUTO = "auto"
"""A layer setting, not an entry of :data:`V4_ATTENTION_BACKENDS`: :meth:`V4Attention.step` for one token with a
cache, else ``"gather"`` or ``"masked"`` by size (see the module docstring)."""

V4_ATTENTION_BACKENDS: dict[str, Callable[..., Tensor]] = {}
"""Name -> shared-KV attention with sinks over a window and selected compressed entries (same signature)."""


def register_v4_attention(name: str) -> Callable[[Callable], Callable]:
    """Decorator: file ``fn`` in :data:`V4_ATTENTION_BACKENDS` under ``name``."""
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        V4_ATTENTION_BACKENDS[name] = fn
        return fn
    return register


def _softmax_with_sink(logits: Tensor, sinks: Tensor) -> Tensor:
    """Softmax over the last axis of ``logits (B, T, H, S)`` with ``sinks (H,)`` in the denominator (fp32)."""
    sink = sinks.float()[None, None, :, None].expand(*logits.shape[:-1], 1)  # (B, T, H, 1)
    p = torch.cat([logits.float(), sink], dim=-1).softmax(dim=-1)  # (B, T, H, S + 1)
    return p[..., :-1].to(logits.dtype)  # (B, T, H, S): the sink's share is dropped


@register_v4_attention("masked")
def masked_attention(q: Tensor, window_kv: Tensor, window_allowed: Tensor, entries: Tensor, indices: Tensor,
                     valid: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """Every head attends over the whole window and ALL compressed entries; the ones not chosen are masked.

    Args:
        q: ``(B, T, H, d)`` rotated queries.
        window_kv: ``(B, S, d)`` the window's ``K = V`` entries; window_allowed: ``(T, S)`` bool.
        entries: ``(B, N, d)`` compressed entries (``N = 0`` in a sliding-only layer).
        indices, valid: ``(B, T, k)`` the entries each query reads and whether each slot counts.
        sinks: ``(H,)`` per-head sink logits; scale: ``d^{-1/2}``.

    Returns:
        ``o (B, T, H, d)``, before the inverse rotation.
    """
    b, t = q.shape[:2]
    chosen = torch.zeros(b, t, entries.shape[1] + 1, dtype=torch.bool, device=q.device)  # (B, T, N + 1)
    chosen.scatter_(-1, torch.where(valid, indices, entries.shape[1]), True)  # invalid slots land on the extra column
    allowed = torch.cat([window_allowed.expand(b, -1, -1), chosen[..., :-1]], dim=-1)  # (B, T, S + N)
    kv = torch.cat([window_kv, entries], dim=1)  # (B, S + N, d): K = V
    logits = torch.einsum("bthd,bsd->bths", q, kv) * scale  # (B, T, H, S + N)
    p = _softmax_with_sink(logits.masked_fill(~allowed[:, :, None, :], float("-inf")), sinks)
    return torch.einsum("bths,bsd->bthd", p, kv)  # (B, T, H, d)


@register_v4_attention("gather")
def gathered_attention(q: Tensor, window_kv: Tensor, window_allowed: Tensor, entries: Tensor, indices: Tensor,
                       valid: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """The same attention as :func:`masked_attention`, reading only the ``k`` chosen entries of each query.

    One gather per query serves all heads (one shared KV head). Arguments and result as in
    :func:`masked_attention`.
    """
    b = q.shape[0]
    chosen = entries[torch.arange(b, device=q.device)[:, None, None], indices]  # (B, T, k, d)
    logits_w = torch.einsum("bthd,bsd->bths", q, window_kv) * scale  # (B, T, H, S)
    logits_c = torch.einsum("bthd,btkd->bthk", q, chosen) * scale  # (B, T, H, k)
    logits_w = logits_w.masked_fill(~window_allowed[None, :, None, :], float("-inf"))
    logits_c = logits_c.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = _softmax_with_sink(torch.cat([logits_w, logits_c], dim=-1), sinks)  # (B, T, H, S + k)
    s = window_kv.shape[1]
    return (torch.einsum("bths,bsd->bthd", p[..., :s], window_kv)
            + torch.einsum("bthk,btkd->bthd", p[..., s:], chosen))  # (B, T, H, d)


def v4_attention_backend(name: str) -> Callable[..., Tensor]:
    """The registered backend called ``name``; ``ValueError`` with the closest name for an unknown one."""
    if name not in V4_ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {sorted(V4_ATTENTION_BACKENDS)}, got {name!r}"
                         f"{closest_name(str(name), V4_ATTENTION_BACKENDS)}")
    return V4_ATTENTION_BACKENDS[name]


def check_layer_backend(name: str) -> str:
    """A layer's ``backend`` setting: a registered backend or :data:`AUTO`; ``ValueError`` naming the choices."""
    if name != AUTO and name not in V4_ATTENTION_BACKENDS:
        choices = [*sorted(V4_ATTENTION_BACKENDS), AUTO]
        raise ValueError(f"backend must be one of {choices}, got {name!r}{closest_name(str(name), choices)}")
    return name


class GroupedLinear(nn.Module):
    """``g`` independent projections, one per group of heads (§2.3.3, grouped output projection).

    ``weight`` is ``(g d_g, n_h d / g)`` (``transformers``' ``o_a_proj.weight``): rows ``j d_g .. (j+1) d_g`` are
    group ``j``'s matrix.
    """

    def __init__(self, in_per_group: int, out_per_group: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group))
        nn.init.normal_(self.weight, std=in_per_group ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., g, n_h d / g) -> (..., g, d_g)``: one batched product over the groups."""
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # (g, d_g, n_h d / g)
        lead = x.shape[:-2]
        y = torch.bmm(x.reshape(-1, self.groups, x.shape[-1]).transpose(0, 1), w.transpose(1, 2))  # (g, *, d_g)
        return y.transpose(0, 1).reshape(*lead, self.groups, -1)  # (..., g, d_g)


def check_v4_attention_settings(config: Any, layer_idx: int) -> str:
    """Build-time rules of a V4 attention layer; returns its layer type. ``ValueError`` naming the field."""
    layer_types = list(config.layer_types)
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layer_types):
        raise ValueError(f"layer_idx must be an index into config.layer_types (0..{len(layer_types) - 1}), "
                         f"got {layer_idx!r}")
    kind = layer_types[layer_idx]
    require_choice(f"layer_types[{layer_idx}]", kind, LAYER_TYPES)
    require_positive(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                     head_dim=config.head_dim, q_lora_rank=config.q_lora_rank, sliding_window=config.sliding_window,
                     o_groups=config.o_groups, o_lora_rank=config.o_lora_rank)
    require_number("rms_norm_eps", config.rms_norm_eps, positive=True)
    if config.num_key_value_heads != 1:
        raise ValueError(f"num_key_value_heads must be 1 (V4 shares one K = V head), got {config.num_key_value_heads}")
    if config.num_attention_heads % config.o_groups:
        raise ValueError(f"o_groups ({config.o_groups}) must divide num_attention_heads ({config.num_attention_heads}):"
                         " the grouped output projection gives each group the same number of heads")
    rope_dim = config.qk_rope_head_dim
    if rope_dim % 2 or not 0 < rope_dim <= config.head_dim:
        raise ValueError(f"head_dim * partial_rotary_factor (qk_rope_head_dim = {rope_dim}) must be even and in "
                         f"1..head_dim ({config.head_dim}): RoPE rotates pairs of a head's trailing channels")
    for label in ("main", "compress"):
        rope_type = config.rope_parameters[label].get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters[{label!r}]['rope_type'] is {rope_type!r}: only default RoPE is "
                             "implemented; use rope_type='default'")
    if kind != SWA:
        rate = config.compress_rates.get(kind)
        require_positive(**{f"compress_rates[{kind!r}]": rate})
    if kind == CSA:
        require_positive(index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim)
        if config.index_topk is None or not isinstance(config.index_topk, int) or config.index_topk < 1:
            raise ValueError(f"index_topk must be an integer >= 1 (compressed entries each query keeps), got "
                             f"{config.index_topk!r}")
        if config.index_head_dim < rope_dim:
            raise ValueError(f"index_head_dim ({config.index_head_dim}) must be at least the RoPE width "
                             f"qk_rope_head_dim ({rope_dim}): the indexer rotates its trailing {rope_dim} channels")
    return kind


class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer: sliding window only, CSA or HCA (V4 report §2.3, eq. 9-23).

    Build it with :meth:`from_config` (a ``transformers`` ``DeepseekV4Config`` and the layer's index). Parameter
    names are ``transformers``': ``q_a_proj``, ``q_a_norm``, ``q_b_proj``, ``kv_proj``, ``kv_norm``, ``o_a_proj``,
    ``o_b_proj``, ``sinks``, and ``compressor`` (CSA, HCA) and ``indexer`` (CSA).

    Precision: the norms, the RoPE rotations, the gate softmax, the indexer scores and the attention softmax
    compute in fp32; the matrix products run in the weights' dtype.
    """

    def __init__(self, kind: str, hidden_size: int, n_heads: int, head_dim: int, q_lora_rank: int, rope_dim: int,
                 rope_theta: float, sliding_window: int, o_groups: int, o_lora_rank: int, eps: float,
                 ratio: int | None = None, index_n_heads: int | None = None, index_head_dim: int | None = None,
                 index_topk: int | None = None, backend: str = "masked") -> None:
        super().__init__()
        self.kind, self.n_heads, self.head_dim, self.rope_dim = kind, n_heads, head_dim, rope_dim
        self.rope_theta, self.sliding_window, self.o_groups, self.eps = rope_theta, sliding_window, o_groups, eps
        self.ratio, self.index_topk = ratio, index_topk
        self.backend = backend
        self.scale = head_dim ** -0.5
        self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)  # W^DQ
        self.q_a_norm = V4RMSNorm(q_lora_rank, eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)  # W^UQ
        self.kv_proj = nn.Linear(hidden_size, head_dim, bias=False)  # W^KV: one K = V head
        self.kv_norm = V4RMSNorm(head_dim, eps)
        self.o_a_proj = GroupedLinear(n_heads * head_dim // o_groups, o_lora_rank, o_groups)
        self.o_b_proj = nn.Linear(o_groups * o_lora_rank, hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n_heads))  # z_i
        self._stacked: tuple[list, Tensor] | None = None  # the step's stacked input matrices (_input_weight)
        self.compressor = None if kind == SWA else Compressor(hidden_size, head_dim, ratio, kind == CSA, rope_dim,
                                                              rope_theta, eps)
        self.indexer = None if kind != CSA else LightningIndexer(hidden_size, q_lora_rank, index_n_heads,
                                                                 index_head_dim, ratio, rope_dim, rope_theta, eps)

    @classmethod
    def from_config(cls, config: Any, layer_idx: int, backend: str | None = None) -> V4Attention:
        """Layer ``layer_idx`` of a ``DeepseekV4Config`` (its type is ``config.layer_types[layer_idx]``), fresh weights.

        The sliding-only layers use ``rope_theta`` ("main" RoPE), the others ``compress_rope_theta``, as
        ``transformers`` does. ``backend``: ``"masked"`` (default), ``"gather"`` or ``"auto"`` (:data:`AUTO`).
        """
        kind = check_v4_attention_settings(config, layer_idx)
        theta = config.rope_parameters["main" if kind == SWA else "compress"]["rope_theta"]
        extra = {} if kind == SWA else dict(ratio=config.compress_rates[kind])
        if kind == CSA:
            extra.update(index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
                         index_topk=config.index_topk)
        return cls(kind, config.hidden_size, config.num_attention_heads, config.head_dim, config.q_lora_rank,
                   config.qk_rope_head_dim, float(theta), config.sliding_window, config.o_groups, config.o_lora_rank,
                   config.rms_norm_eps, backend=backend or "masked", **extra)

    @property
    def backend(self) -> str:
        """The attention's name in :data:`V4_ATTENTION_BACKENDS`, or :data:`AUTO`; set it to switch (checked)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_layer_backend(name)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, n_heads={self.n_heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, "
                f"sliding_window={self.sliding_window}, ratio={self.ratio}, index_topk={self.index_topk}, "
                f"backend={self.backend!r}")

    def new_cache(self) -> V4Cache:
        """An empty cache for this layer: the window, plus the compressor (CSA, HCA) and indexer (CSA) states."""
        return V4Cache(self.sliding_window, self.ratio, indexer=self.indexer is not None)

    def queries(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """``q (B, T, H, d)`` (normalised per head, rotated) and ``q_residual = c^Q (B, T, q_lora_rank)``."""
        b, t, _ = x.shape
        q_residual = self.q_a_norm(self.q_a_proj(x))  # (B, T, d_c'): c^Q_t
        q = unweighted_rms_norm(self.q_b_proj(q_residual).view(b, t, self.n_heads, self.head_dim), self.eps)
        return rotate_trailing(q, cos[:, None], sin[:, None]), q_residual  # (B, T, H, d)

    def selection(self, x: Tensor, q_residual: Tensor, positions: Tensor, cache: V4Cache | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """The compressed entries ``(B, N, d)`` and what each query reads: ``indices, valid (B, T, k)``.

        Sliding: no entries. HCA: every entry, valid where visible. CSA: the indexer's top-k visible entries.
        """
        b, t, _ = x.shape
        if self.compressor is None:
            empty = torch.zeros(b, t, 0, dtype=torch.long, device=x.device)
            return x.new_zeros(b, 0, self.head_dim), empty, empty.bool()
        entries = self.compressor(x, None if cache is None else cache.compressor)  # (B, N, d)
        if self.indexer is None:
            n = entries.shape[1]
            indices = torch.arange(n, device=x.device).expand(b, t, n)  # (B, T, N): all of them
            return entries, indices, visible_entries(positions, n, self.ratio).expand(b, t, n)
        scores = self.indexer(x, q_residual, positions, None if cache is None else cache.indexer)  # (B, T, N)
        return entries, *select_topk(scores, positions, self.ratio, self.index_topk)

    def forward(self, x: Tensor, cache: V4Cache | None = None) -> Tensor:
        """Attend: ``x (B, T, d_model) -> (B, T, d_model)``.

        Without a cache the tokens sit at positions ``0..T-1`` and an incomplete last window is not compressed;
        with one, at ``cache.length..``, and the cache is updated (window, pending tokens, overlap, entries).
        """
        b, t, _ = x.shape
        if self._backend == AUTO and t == 1 and cache is not None:
            return self.step(x, cache)
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + t, device=x.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.rope_dim, self.rope_theta)  # (T, d_R / 2)
        # 1) Queries, and the one K = V head.
        q, q_residual = self.queries(x, cos, sin)  # (B, T, H, d), (B, T, d_c')
        kv = rotate_trailing(self.kv_norm(self.kv_proj(x)), cos, sin)  # (B, T, d)
        # 2) The sliding window: the kept past tokens and the new ones.
        window_kv, key_start = (kv, 0) if cache is None else cache.window.append(kv)  # (B, S, d)
        allowed = window_mask(positions, key_start, window_kv.shape[1], self.sliding_window)  # (T, S)
        # 3) The compressed entries and which of them each query reads.
        entries, indices, valid = self.selection(x, q_residual, positions, cache)
        # 4) Attention with sinks, then the output's RoPE slice rotated back by -p_t.
        o = v4_attention_backend(self._core(entries.shape[1]))(q, window_kv, allowed, entries, indices, valid,
                                                               self.sinks, self.scale)  # (B, T, H, d)
        o = rotate_trailing(o, cos[:, None], -sin[:, None])  # (B, T, H, d)
        # 5) Grouped output projection.
        o = self.o_a_proj(o.reshape(b, t, self.o_groups, -1))  # (B, T, g, d_g)
        return self.o_b_proj(o.flatten(2))  # (B, T, d_model)

    def _core(self, n_entries: int) -> str:
        """The registered backend a call with ``n_entries`` compressed entries uses (:data:`AUTO` picks by size)."""
        if self._backend != AUTO:
            return self._backend
        return "gather" if self.indexer is not None and n_entries > self.index_topk else "masked"

    def _input_matrices(self) -> list[Tensor]:
        """Every matrix a decode step applies to ``h_t``: ``W^DQ``, ``W^KV``, then the compressor's ``W^KV, W^Z``
        (CSA, HCA), then the indexer's compressor's ``W^KV, W^Z`` and ``W^w`` (CSA)."""
        matrices = [self.q_a_proj.weight, self.kv_proj.weight]
        if self.compressor is not None:
            matrices += [self.compressor.kv_proj.weight, self.compressor.gate_proj.weight]
        if self.indexer is not None:
            compressor = self.indexer.compressor
            matrices += [compressor.kv_proj.weight, compressor.gate_proj.weight, self.indexer.weights_proj.weight]
        return matrices

    def _input_weight(self) -> tuple[Tensor, list[int]]:
        """:meth:`_input_matrices` stacked into one ``(sum of widths, d_model)`` matrix, so the step makes ONE
        product of ``h_t``, and the widths that split its result. Kept between steps while no matrix changed
        (same storage and version); rebuilt, and not kept, when gradients are on."""
        matrices = self._input_matrices()
        widths = [w.shape[0] for w in matrices]
        if torch.is_grad_enabled():
            return torch.cat(matrices), widths
        key = [(w.data_ptr(), w._version) for w in matrices]
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, torch.cat(matrices))
        return self._stacked[1], widths

    def step(self, x: Tensor, cache: V4Cache) -> Tensor:
        """:meth:`forward` for ONE new token ``x (B, 1, d_model)`` continuing ``cache``: the decode step.

        The same numbers by a shorter road: ONE product of ``h_t`` with every matrix that reads it
        (:meth:`_input_weight`); the newest token sees its whole window and every closed window, so no mask is
        built; RoPE comes from a table (:func:`rope_phase`); a window the token closes is pooled alone
        (:meth:`Compressor.step`); the indexer scores all its keys in two
        matrix products (:meth:`LightningIndexer.step`) and only the top-``k`` entries are gathered (CSA), or all
        of them read (HCA); one product over ``[window ; entries]`` serves every head (one ``K = V`` head).
        """
        b = x.shape[0]
        phase = rope_phase(cache.length, self.rope_dim, self.rope_theta, x.device)  # (d_R / 2,) complex
        weight, widths = self._input_weight()
        q_a, kv, *rest = F.linear(x, weight).split(widths, dim=-1)  # (B, 1, width) each
        q_residual = self.q_a_norm(q_a)  # (B, 1, d_c'): c^Q_t
        q = unweighted_rms_norm(self.q_b_proj(q_residual).view(b, self.n_heads, self.head_dim), self.eps)
        q = rotate_trailing_by(q, phase)  # (B, H, d)
        kv = rotate_trailing_by(self.kv_norm(kv), phase)  # (B, 1, d)
        keys = cache.window.append(kv)[0]  # (B, S, d): S <= n_win, all visible
        if self.compressor is not None:
            entries = self.compressor.step(x, cache.compressor, *rest[:2])  # (B, N, d): all visible
            if self.indexer is not None and entries.shape[1] > self.index_topk:
                scores = self.indexer.step(x, q_residual, phase, cache.indexer, *rest[2:])  # (B, 1, N)
                chosen = scores[:, 0].topk(self.index_topk, dim=-1).indices  # (B, k)
                entries = entries[0].index_select(0, chosen[0])[None] if b == 1 else \
                    entries.gather(1, chosen[..., None].expand(-1, -1, self.head_dim))  # (B, k, d)
            elif self.indexer is not None:  # k >= N: every entry is chosen; the indexer's state still advances
                self.indexer.compressor.step(x, cache.indexer, *rest[2:4])
            keys = torch.cat([keys, entries], dim=1)  # (B, S + k, d): K = V
        logits = torch.bmm(q, keys.transpose(1, 2)) * self.scale  # (B, H, S + k)
        sink = self.sinks.float()[None, :, None].expand(b, -1, 1)  # (B, H, 1)
        p = torch.cat([logits.float(), sink], dim=-1).softmax(dim=-1)[..., :-1].to(keys.dtype)  # (B, H, S + k)
        o = rotate_trailing_by(torch.bmm(p, keys), phase.conj())  # (B, H, d), rotated back by -p_t
        o = self.o_a_proj(o.view(b, 1, self.o_groups, -1))  # (B, 1, g, d_g)
        return self.o_b_proj(o.flatten(2))  # (B, 1, d_model)
