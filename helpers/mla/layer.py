"""Multi-head Latent Attention (MLA), the finished layer (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1).

Keys and values are compressed jointly into a latent ``c_t^{KV}`` of width ``d_c`` (``kv_lora_rank``);
positions enter through a separate, decoupled RoPE key ``k_t^R`` shared by all heads. At decode time
the cache holds only ``c_t^{KV}`` and ``k_t^R``: ``d_c + d_h^R`` elements per token per layer.

Two ways to compute the same attention from that cache:

- *naive*: expand the cached latent into per-head keys and values with ``W^{UK}``, ``W^{UV}`` on every
  step (what ``transformers`` does), then attend as usual;
- *absorbed*: fold ``W^{UK}`` into the query (``q^C_{t,i}{}^T W^{UK}_i c_j = (W^{UK}_i{}^T q^C_{t,i})^T c_j``)
  and ``W^{UV}`` into the output, so attention runs directly over the cached latent (V2 paper, Sec. 2.1.2,
  "we can absorb W^{UK} into W^{UQ}, and W^{UV} into W^O").

Parameter names follow DeepSeek's official ``inference/model.py``: ``wq`` (or ``wq_a``, ``q_norm``, ``wq_b``
with query compression), ``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo``. ``helpers.mla.hf`` maps them to and
from the ``transformers`` names.

The attention itself is looked up by name (``backend``, :data:`helpers.mla.attention.ATTENTION_BACKENDS`):
``"naive"`` (the default, the equations as written) or ``"absorbed"``; ``absorb=True``/``False`` is the
shortcut for those two. :meth:`MultiHeadLatentAttention.from_config` builds the layer from a ``transformers``
config, the one place where config fields become layer settings.

Long context: ``yarn`` (:class:`helpers.mla.rope.YaRN`, from a config's ``rope_parameters`` with
``rope_type="yarn"``) stretches the RoPE frequencies and multiplies ``softmax_scale`` by ``mscale^2``, as
DeepSeek-V2/V3 do for their 128K context (V3 §4.3) and as ``transformers``' ``DeepseekV3Attention`` does.

RoPE layout: with ``rope_interleave=True`` (DeepSeek's checkpoints) the rotated pairs are
``(x0, x1), (x2, x3), ...``; :func:`apply_rope` keeps that pair layout. ``transformers``'
``apply_rotary_pos_emb_interleave`` instead returns the rotated vector de-interleaved into halves
``(x0', x2', ..., x1', x3', ...)``. It applies the same permutation to queries and keys, so every
``q^R . k^R`` score, and hence the layer output, is identical; only the cached ``k^R`` differs by that
fixed permutation.

"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from helpers.inputs import check_attention_input
from helpers.mla.attention import attention_backend
from helpers.mla.cache import LatentCache
from helpers.mla.rope import YaRN, require_yarn, rope_at, rope_cos_sin, rotate
from helpers.precision import RMSNorm
from helpers.rules import require_bool, require_number, require_positive


def check_mla_settings(hidden_size: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                       qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None, rope_theta: float,
                       rope_interleave: bool, rms_norm_eps: float, yarn: YaRN | None = None) -> None:
    """Build-time rules of an MLA layer: ``ValueError`` (``TypeError`` for a flag) naming the field.

    Sizes are positive integers (``q_lora_rank`` may be ``None``: no query compression), ``qk_rope_head_dim`` is
    even (RoPE rotates pairs), ``rope_theta`` and ``rms_norm_eps`` are finite and positive, ``rope_interleave`` is
    a bool, ``yarn`` a :class:`~helpers.mla.rope.YaRN` or ``None`` (its fields were checked when it was built).
    (The backend is checked when it is set: :attr:`MultiHeadLatentAttention.backend`.)
    """
    require_positive(hidden_size=hidden_size, n_heads=n_heads, kv_lora_rank=kv_lora_rank,
                     qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                     v_head_dim=v_head_dim, q_lora_rank=q_lora_rank)
    if qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs of channels), got {qk_rope_head_dim}")
    require_number("rope_theta", rope_theta, positive=True)
    require_number("rms_norm_eps", rms_norm_eps, positive=True)
    require_bool(rope_interleave=rope_interleave)
    require_yarn(yarn)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE, a latent cache, and naive or absorbed computation.

    Equations (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.2-2.1.3; DeepSeek-V3 2412.19437 eq. 1-11):

    - queries (eq. 12-13, 10-11): ``c^Q_t = W^{DQ} h_t`` (normalised by ``q_norm``), ``[q^C_t; q^R_t] = W^{UQ}, W^{QR}``
      applied to ``c^Q_t`` (``wq_b``), or straight from ``h_t`` (``wq``) without query compression;
      ``q^R`` is rotated with RoPE;
    - latent and RoPE key (eq. 9, 14): ``[c^{KV}_t; k^R_t] = [W^{DKV}; W^{KR}] h_t`` (``wkv_a``), ``c^{KV}_t`` is
      normalised by ``kv_norm``, ``k^R_t`` rotated with RoPE; these two are what :class:`LatentCache` holds;
    - keys and values (eq. 10-12, 15-16): ``k^C_{t,i} = W^{UK}_i c^{KV}_t``, ``v^C_{t,i} = W^{UV}_i c^{KV}_t`` (``wkv_b``);
    - attention and output (eq. 17-19): softmax over ``(q^C . k^C + q^R . k^R) / sqrt(d_h + d_h^R)``, then ``wo``
      (``softmax_scale``; with YaRN multiplied by ``mscale**2``, see ``yarn`` below).

    Precision (:mod:`helpers.precision`): ``q_norm``, ``kv_norm`` and the softmax compute in fp32 and return to
    the model's dtype; everything else, the cache included, stays in the dtype of the weights.

    Args:
        hidden_size: ``H``.
        n_heads: ``n_h``.
        kv_lora_rank: ``d_c``, the latent width.
        qk_nope_head_dim: ``d_h``, the per-head content width of queries and keys.
        qk_rope_head_dim: ``d_h^R``, the RoPE width (even).
        v_head_dim: the per-head value width.
        q_lora_rank: ``d_c'``, the query latent width; ``None`` means no query compression (DeepSeek-V2-Lite).
        rope_theta: RoPE base.
        rope_interleave: pair layout for RoPE, see :func:`apply_rope`.
        rms_norm_eps: epsilon of ``q_norm`` and ``kv_norm``.
        absorb: shortcut for ``backend``: ``False`` is ``"naive"`` (re-expansion), ``True`` is ``"absorbed"``.
        backend: the attention by name (``"naive"``, ``"absorbed"``); ``None`` follows ``absorb``.
        yarn: YaRN long-context RoPE (:class:`~helpers.mla.rope.YaRN`; V3 §4.3, notebook 26): stretched
            frequencies for ``q^R``, ``k^R``, cos and sin times ``attention_factor``, and ``softmax_scale`` times
            ``mscale(s, mscale_all_dim)**2``, ``mscale = 0.1 * mscale_all_dim * ln(s) + 1``; ``None``: plain RoPE.
    """

    default_backend = "naive"
    has_selection = False  # an indexer's top-k, which the sparse backends attend over (helpers.dsa)

    def __init__(self, hidden_size: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None,
                 rope_theta: float = 10000.0, rope_interleave: bool = True, rms_norm_eps: float = 1e-6,
                 absorb: bool | None = None, backend: str | None = None, yarn: YaRN | None = None) -> None:
        super().__init__()
        if absorb is not None:
            require_bool(absorb=absorb)
            if backend is not None and backend != self.backend_for(absorb):
                raise ValueError(f"absorb={absorb} and backend={backend!r} disagree: give one of them")
            backend = self.backend_for(absorb)
        backend = self.default_backend if backend is None else backend
        check_mla_settings(hidden_size, n_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                           q_lora_rank, rope_theta, rope_interleave, rms_norm_eps, yarn)
        self.hidden_size, self.n_heads = hidden_size, n_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta, self.rope_interleave, self.rms_norm_eps = rope_theta, rope_interleave, rms_norm_eps
        self.yarn = yarn
        self.backend = backend
        self.softmax_scale = self.qk_head_dim ** -0.5 if yarn is None else yarn.scale_softmax(self.qk_head_dim ** -0.5)
        if q_lora_rank is None:
            self.wq = nn.Linear(hidden_size, n_heads * self.qk_head_dim, bias=False)  # [W^{UQ}; W^{QR}] on h_t
        else:
            self.wq_a = nn.Linear(hidden_size, q_lora_rank, bias=False)  # W^{DQ}
            self.q_norm = RMSNorm(q_lora_rank, eps=rms_norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)  # [W^{UQ}; W^{QR}]
        self.wkv_a = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)  # [W^{DKV}; W^{KR}]
        self.kv_norm = RMSNorm(kv_lora_rank, eps=rms_norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)  # [W^{UK}; W^{UV}]
        self.wo = nn.Linear(n_heads * v_head_dim, hidden_size, bias=False)  # W^O

    @staticmethod
    def settings_from_config(config: Any) -> dict[str, Any]:
        """The constructor's arguments read from a ``transformers`` ``DeepseekV3Config``, ``DeepseekV32Config`` or
        ``DeepseekV2Config``: THE one mapping from config fields to MLA settings.

        ``q_norm``/``kv_norm`` use eps 1e-6 whatever ``config.rms_norm_eps`` says, as ``transformers``
        (``DeepseekV3RMSNorm(q_lora_rank)``) and DeepSeek's ``inference/model.py`` do. V2 and V3.2 always rotate
        interleaved pairs (their configs have no ``rope_interleave``). ``rope_parameters`` with ``rope_type="yarn"``
        give ``yarn`` (:meth:`YaRN.from_rope_parameters`). ``ValueError`` naming the field for what we do not
        implement: another ``rope_type``, bad YaRN fields, ``attention_bias``, key/value head groups.
        """
        rope = config.rope_parameters or {}
        yarn = YaRN.from_rope_parameters(rope)
        if getattr(config, "attention_bias", False):
            raise ValueError("attention_bias=True is not supported: DeepSeek's MLA projections have no biases")
        if config.num_key_value_heads != config.num_attention_heads:
            raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must equal num_attention_heads "
                             f"({config.num_attention_heads}): MLA has no key/value head groups")
        return dict(hidden_size=config.hidden_size, n_heads=config.num_attention_heads,
                    kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                    qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                    q_lora_rank=config.q_lora_rank, rope_theta=float(rope["rope_theta"]),
                    rope_interleave=bool(getattr(config, "rope_interleave", True)), rms_norm_eps=1e-6, yarn=yarn)

    @classmethod
    def from_config(cls, config: Any, backend: str | None = None) -> MultiHeadLatentAttention:
        """The layer ``config`` describes (:meth:`settings_from_config`), fresh weights.

        ``backend``: the attention by name; ``None`` reads ``config.attention_backend`` if the config has one,
        else the layer's default.
        """
        backend = getattr(config, "attention_backend", None) if backend is None else backend
        return cls(**cls.settings_from_config(config), backend=backend)

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments that rebuild this layer's shape and settings (not its backend)."""
        return dict(hidden_size=self.hidden_size, n_heads=self.n_heads, kv_lora_rank=self.kv_lora_rank,
                    qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                    v_head_dim=self.v_head_dim, q_lora_rank=self.q_lora_rank, rope_theta=self.rope_theta,
                    rope_interleave=self.rope_interleave, rms_norm_eps=self.rms_norm_eps, yarn=self.yarn)

    def config_fields(self) -> dict[str, Any]:
        """The ``transformers`` config fields describing this layer: the inverse of :meth:`settings_from_config`.

        With YaRN, ``max_position_embeddings`` is the stretched context ``s L`` (rounded up), the length
        ``transformers`` expects beside ``factor`` and ``original_max_position_embeddings``.
        """
        fields = dict(hidden_size=self.hidden_size, num_attention_heads=self.n_heads, num_key_value_heads=self.n_heads,
                      kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                      qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim, q_lora_rank=self.q_lora_rank,
                      rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                      rope_interleave=self.rope_interleave)
        if self.yarn is not None:
            fields["rope_parameters"] = {**self.yarn.rope_parameters(), "rope_theta": self.rope_theta}
            fields["max_position_embeddings"] = math.ceil(self.yarn.factor * self.yarn.original_max_position_embeddings)
        return fields

    @property
    def backend(self) -> str:
        """The attention's name in :data:`~helpers.mla.attention.ATTENTION_BACKENDS`; set it to switch (checked)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if attention_backend(name).needs_selection and not self.has_selection:
            raise ValueError(f"backend {name!r} attends over the lightning indexer's selection, which this layer "
                             "does not have: use helpers.dsa.SparseLatentAttention, or backend 'naive' or 'absorbed'")
        self._backend = name

    @property
    def absorb(self) -> bool:
        """``True`` when the backend is the absorbed one; setting it picks the absorbed or the naive backend."""
        return self.backend == self.backend_for(True)

    @absorb.setter
    def absorb(self, value: bool) -> None:
        require_bool(absorb=value)
        self.backend = self.backend_for(value)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
                f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
                f"v_head_dim={self.v_head_dim}, rope_interleave={self.rope_interleave}, backend={self.backend!r}, "
                f"absorb={self.absorb}" + ("" if self.yarn is None else f", yarn={self.yarn}"))

    def new_cache(self, max_length: int | None = None) -> LatentCache:
        """An empty cache for this layer (``max_length``: preallocate that many tokens)."""
        return LatentCache(max_length=max_length)

    def up_projections(self) -> tuple[Tensor, Tensor]:
        """``w_uk (n_h, d_h, d_c)`` and ``w_uv (n_h, d_v, d_c)``: views of ``wkv_b.weight`` (no copy)."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def rope_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin`` ``[T, d_h^R / 2]`` at absolute ``positions [T]``: this layer's RoPE (with its YaRN, if any)."""
        return rope_cos_sin(positions, self.qk_rope_head_dim, self.rope_theta, self.yarn)

    def attention_inputs(self, x: Tensor, cache: LatentCache | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Everything attention needs for the new tokens ``x (B, T, H)`` (V2 paper eq. 9-14).

        Appends the new ``c^{KV}`` and ``k^R`` to ``cache`` if one is given.

        Returns:
            ``q_nope (B, T, n_h, d_h)``, ``q_rope (B, T, n_h, d_h^R)`` (rotated), ``c_kv (B, S, d_c)``,
            ``k_rope (B, S, d_h^R)`` (all cached tokens, or the new ones without a cache), and ``start_pos``,
            the absolute position of the first new token.
        """
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        # 1) Queries, split into content and RoPE parts.
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, n_h*(d_h+d_r))
        q = q.view(b, t, self.n_heads, self.qk_head_dim)  # (B, T, n_h, d_h + d_r)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # 2) The latent and the shared RoPE key: the only things cached.
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # (B, T, d_c), (B, T, d_r)
        c_kv = self.kv_norm(c_kv)  # (B, T, d_c)
        # 3) Decoupled RoPE at absolute positions start..start+T-1 (rows of a table made once, see rope_at).
        cos, sin = rope_at(start, t, self.qk_rope_head_dim, self.rope_theta, self.yarn, x.device)  # (T, d_r/2) each
        q_rope = rotate(q_rope, cos[:, None], sin[:, None], self.rope_interleave)  # (B, T, n_h, d_r)
        k_rope = rotate(k_rope, cos, sin, self.rope_interleave)  # (B, T, d_r)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)  # (B, S, d_c), (B, S, d_r)
        return q_nope, q_rope, c_kv, k_rope, start

    def backend_for(self, absorb: bool | None) -> str:
        """The backend a call uses: ``absorb=True``/``False`` picks ``"absorbed"``/``"naive"``, ``None`` the layer's."""
        return self.backend if absorb is None else ("absorbed" if absorb else "naive")

    def forward(self, x: Tensor, cache: LatentCache | None = None, absorb: bool | None = None, *,
                validate: bool = True) -> Tensor:
        """Attend causally: ``x (B, T, H) -> (B, T, H)``.

        Without a cache the tokens sit at positions ``0..T-1``; with one, at ``cache.length..``, and their
        ``c^{KV}`` and ``k^R`` are appended to it. ``absorb=None`` uses ``self.backend``. Bad input (shape, dtype,
        device, a cache of another kind, batch, width or layer) raises before the cache changes.

        ``validate=False`` skips those checks and runs :meth:`attend` directly: for a caller that checked its
        input once at its own edge (the model's decode loop, :meth:`helpers.model.DeepSeekV3.run_blocks`).
        """
        if validate:
            check_attention_input(self, x, cache, LatentCache, dense=True, absorb=absorb)
        return self.attend(x, cache, absorb)

    def attend(self, x: Tensor, cache: LatentCache | None = None, absorb: bool | None = None) -> Tensor:
        """:meth:`forward`'s math, without its input checks (the caller vouches for ``x``, ``cache``, ``absorb``)."""
        if cache is not None:
            cache.bind(self)
        b, t, _ = x.shape
        if b == 0 or t == 0:  # no query (T = 0 or an empty batch): nothing to attend, nothing to cache
            return self.wo(x.new_zeros(b, t, self.n_heads * self.v_head_dim))  # (B, T, H)
        attend = attention_backend(self.backend_for(absorb))
        q_nope, q_rope, c_kv, k_rope, start = self.attention_inputs(x, cache)
        # 4) Attention by the chosen backend (eq. 17-18), then the output projection (eq. 19).
        w_uk, w_uv = self.up_projections()
        o = attend(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, self.softmax_scale, start)  # (B, T, n_h, d_v)
        return self.wo(o.reshape(b, t, self.n_heads * self.v_head_dim))  # (B, T, H)
