"""A whole DeepSeek-V3 (or V3.2) in miniature, assembled from the tracks' finished layers.

=====================  =============================================================================
piece                  what it is (DeepSeek-V3, arXiv 2412.19437)
=====================  =============================================================================
``embed``              token embedding ``Emb(t)``, shared with the MTP modules (§2.2)
``layers[i]``          :class:`DecoderBlock`: pre-norm, attention (MLA §2.1.1, or V3.2's sparse attention),
                       then a dense SwiGLU or DeepSeekMoE (§2.1.2), each inside a residual
``norm``, ``head``     final RMSNorm and the untied output head ``OutHead``
``mtp[k-1]``           :class:`MTPModule` ``k`` of ``D`` (§2.2, eq. 21-25), sharing ``embed`` and ``head``
=====================  =============================================================================

The layers are imported, never copied, and chosen by name from the config (:mod:`helpers.model.blocks`):
``DeepseekV3Config`` gives MLA blocks, ``DeepseekV32Config`` sparse-attention blocks. The config is a
``transformers`` config (same field names), checked once by :func:`helpers.rules.check_config`.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.inputs import check_caches, check_input_ids
from helpers.mla import GrowingBuffer, MultiHeadLatentAttention
from helpers.model.blocks import (
    ATTENTIONS,
    FFNS,
    READS_TOKEN_IDS,
    RESIDUALS,
    attention_kind,
    ffn_kind,
    norm_class,
    residual_kind,
)
from helpers.moe import Balancing, DeepSeekMoE
from helpers.precision import RMSNorm
from helpers.rules import check_config, require_count


class DecoderBlock(nn.Module):
    """One pre-norm transformer block: ``h = x + Attn(norm(x))``, ``out = h + FFN(norm(h))``.

    Each ``+`` is the block's residual (:mod:`helpers.model.blocks`): V2-V3.2 add; DeepSeek-V4 runs each sub-layer
    inside a hyper-connection on ``hc_mult`` streams, ``X' = B X + C F(norm(A X))`` (V4 §2.2).

    Args:
        config: a ``DeepseekV3Config``, ``DeepseekV32Config`` or ``DeepseekV4Config``.
        layer_idx: the block's depth (:mod:`helpers.model.blocks` picks its attention and FFN from it).
        moe: ``True`` forces DeepSeekMoE (MTP blocks).
        balancing: the MoE's training-only settings (bias speed, auxiliary-loss weights).
    """

    def __init__(self, config, layer_idx: int, *, moe: bool | None = None, balancing: Balancing | None = None) -> None:
        super().__init__()
        require_count(layer_idx=layer_idx)
        balancing = balancing or Balancing()
        norm = norm_class(config)
        self.attn_norm = norm(config.hidden_size, config.rms_norm_eps)
        self.attn = ATTENTIONS[attention_kind(config, layer_idx)](config, layer_idx)
        self.attn_residual = RESIDUALS[residual_kind(config)](config)
        self.ffn_norm = norm(config.hidden_size, config.rms_norm_eps)
        kind = "moe" if moe else ffn_kind(config, layer_idx)
        self.is_moe = kind != "dense"
        self.ffn = FFNS[kind](config, layer_idx, balancing)
        self.reads_token_ids = kind in READS_TOKEN_IDS
        self.ffn_residual = RESIDUALS[residual_kind(config)](config)

    def forward(self, x: Tensor, cache: GrowingBuffer | None = None, absorb: bool | None = None,
                input_ids: Tensor | None = None, *, validate: bool = True) -> Tensor:
        """``x (B, T, H) -> (B, T, H)`` (V4: ``hc_mult`` streams, ``(B, T, n_hc, H)``); with ``cache``
        (``self.attn.new_cache()``), the tokens continue it.

        ``absorb`` reaches the attentions that have an absorbed form (MLA, DSA; ``None``: the layer's default);
        ``input_ids (B, T)`` reaches the FFNs that route by token id (:data:`helpers.model.blocks.READS_TOKEN_IDS`).
        ``validate=False``: the model checked its input once (:meth:`DeepSeekV3.hidden`), so the MLA and DSA
        attentions skip their own input checks (their ``forward(..., validate=False)``).
        """
        options = {} if absorb is None else {"absorb": absorb}
        if not validate and isinstance(self.attn, MultiHeadLatentAttention):
            options["validate"] = False
        ids = (input_ids,) if self.reads_token_ids else ()
        x = self.attn_residual(x, lambda h: self.attn(self.attn_norm(h), cache=cache, **options))  # (B, T, H)
        return self.ffn_residual(x, lambda h: self.ffn(self.ffn_norm(h), *ids))  # (B, T, H)


class MTPModule(nn.Module):
    """Multi-token prediction module ``k`` (V3 §2.2, eq. 21-22), with DeepSeek's checkpoint names.

    ``h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]`` (eq. 21; the checkpoints put the
    embedding half first, the paper writes the hidden half first: the same map with the columns of
    ``M_k`` swapped), then ``h^k = TRM_k(h'^k)`` (eq. 22), then a final RMSNorm before the shared head
    (``shared_head.norm`` in DeepSeek's checkpoint). The block is always a DeepSeekMoE block.

    Parameters: ``enorm``, ``hnorm`` (RMSNorms), ``eh_proj`` (``M_k``, ``H x 2H``), ``block``, ``post_norm``.
    """

    def __init__(self, config, balancing: Balancing | None = None) -> None:
        super().__init__()
        h = config.hidden_size
        self.enorm, self.hnorm = RMSNorm(h, config.rms_norm_eps), RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)  # M_k
        self.block = DecoderBlock(config, 0, moe=True, balancing=balancing)
        self.post_norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, h_prev: Tensor, emb_next: Tensor, cache: GrowingBuffer | None = None,
                absorb: bool | None = None) -> Tensor:
        """``h_prev (B, T, H)`` (depth ``k-1``) and ``emb_next (B, T, H)`` (``Emb(t_{i+k})``) -> normed ``h^k (B, T, H)``."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # (B, T, H), eq. 21
        return self.post_norm(self.block(x, cache=cache, absorb=absorb))  # (B, T, H), eq. 22


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 (or V3.2) in miniature: embedding, decoder blocks, final norm, untied head, ``D`` MTP modules.

    Args:
        config: a ``transformers`` ``DeepseekV3Config`` or ``DeepseekV32Config`` (``num_mtp_layers``, where
            set, gives ``D``).
        balancing: the training-only settings of every MoE layer (:class:`helpers.moe.Balancing`: bias update
            speed ``gamma``, auxiliary-loss weights); default: none.

    ``model(input_ids)`` returns the main head's logits ``(B, T, V)``, attending causally from position 0;
    :meth:`generate` decodes over the blocks' own caches (see :mod:`helpers.model.generate`).
    """

    validate = staticmethod(check_config)
    """The config check run once at construction (:func:`helpers.rules.check_config`; V4 has its own)."""

    def __init__(self, config, balancing: Balancing | None = None) -> None:
        super().__init__()
        self.validate(config)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderBlock(config, i, balancing=balancing)
                                     for i in range(config.num_hidden_layers)])
        self.norm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(config, balancing)
                                  for _ in range(getattr(config, "num_mtp_layers", 0) or 0)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Initialise every weight matrix from ``N(0, std^2)`` (``config.initializer_range``, as ``transformers``)."""
        std = self.config.initializer_range if std is None else std
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, DeepSeekMoE):
                module.bias.zero_()

    @property
    def moe_layers(self) -> list[DeepSeekMoE]:
        """The DeepSeekMoE layers of the main model, in depth order (MTP blocks excluded)."""
        return [block.ffn for block in self.layers if block.is_moe]

    def check_length(self, n_positions: int) -> None:
        """``ValueError`` if a sequence would reach past ``config.max_position_embeddings``."""
        if n_positions > self.config.max_position_embeddings:
            raise ValueError(f"the sequence needs {n_positions} positions but max_position_embeddings is "
                             f"{self.config.max_position_embeddings}: shorten the prompt or max_new_tokens")

    def new_caches(self) -> list[GrowingBuffer]:
        """One empty cache per block, each made by the block's attention (latent, or latent + indexer keys)."""
        return [block.attn.new_cache() for block in self.layers]

    def hidden(self, input_ids: Tensor, caches: list[GrowingBuffer] | None = None,
               absorb: bool | None = None) -> Tensor:
        """The last block's output ``h (B, T, H)`` before the final norm; with ``caches`` (one per block), continue them.

        Checks ``input_ids`` (ids in the vocabulary) and the caches (one per block, each of its block's kind, filled
        by no other layer, equally long) before any cache changes.
        """
        check_input_ids(input_ids, self.config.vocab_size)
        if caches is not None:
            check_caches(caches, [block.attn for block in self.layers], batch=input_ids.shape[0])
        self.check_length((caches[0].length if caches else 0) + input_ids.shape[1])
        if absorb is not None and not isinstance(absorb, bool):
            raise TypeError(f"absorb must be True, False or None (the layers' default), got {absorb!r}")
        return self.run_blocks(input_ids, caches, absorb)

    def run_blocks(self, input_ids: Tensor, caches: list[GrowingBuffer] | None = None,
                   absorb: bool | None = None) -> Tensor:
        """:meth:`hidden` without its checks: the decode loop, whose tokens the model itself chose.

        The attentions skip their input checks too (``validate=False``): the embeddings they read have the
        model's dtype and device by construction, and :meth:`hidden` checked the caches once for every block.
        """
        x = self.embed_streams(input_ids)  # (B, T, H); V4: (B, T, n_hc, H)
        for i, block in enumerate(self.layers):
            x = block(x, cache=caches[i] if caches else None, absorb=absorb, input_ids=input_ids, validate=False)
        return x

    def embed_streams(self, input_ids: Tensor) -> Tensor:
        """The residual stream the first block reads: ``Emb(t)``, ``(B, T) -> (B, T, H)`` (V4 widens it)."""
        return self.embed(input_ids)

    def logits(self, h: Tensor) -> Tensor:
        """``OutHead(RMSNorm(h))``: ``(B, T, H) -> (B, T, V)``."""
        return self.head(self.norm(h))

    def forward(self, input_ids: Tensor) -> Tensor:
        """``input_ids (B, T)`` LongTensor -> logits ``(B, T, V)`` of the main head, causal from position 0."""
        return self.logits(self.hidden(input_ids))

    def mtp_forward(self, input_ids: Tensor, h: Tensor) -> list[Tensor]:
        """The ``D`` MTP modules over a whole sequence (V3 eq. 21-23), for training.

        Depth ``k`` sees positions ``i = 0..T-1-k`` (``h_i^{k-1}`` with ``Emb(t_{i+k})``) and its logits at ``i``
        predict ``t_{i+k+1}``. ``h_i^0`` is the main model's representation after its final norm, the convention of
        ``transformers``' and vLLM's MTP decoding, so an exported MTP module drafts the same tokens there.

        Args:
            input_ids: ``(B, T)``; h: the main model's ``(B, T, H)`` from :meth:`hidden`.

        Returns:
            ``[(B, T-k, V) for k = 1..D]``.
        """
        out, h_prev = [], self.norm(h)  # h^0: the main model's output after its final norm (as vLLM, transformers)
        for k, module in enumerate(self.mtp, start=1):
            h_prev = module(h_prev[:, :-1], self.embed(input_ids[:, k:]))  # (B, T-k, H)
            out.append(self.head(h_prev))  # (B, T-k, V)
        return out

    def losses(self, input_ids: Tensor, mtp_lambda: float = 0.3) -> dict[str, Tensor]:
        """Next-token loss, MTP loss (V3 eq. 24-25) and the MoE balance loss on one batch ``(B, T)``.

        Returns:
            ``{"main", "mtp", "balance", "total"}``: ``total = main + lambda / D * sum_k L_MTP^k + balance``.
        """
        h = self.hidden(input_ids)  # (B, T, H)
        logits = self.logits(h)  # (B, T, V)
        main = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        mtp = h.new_zeros(())
        for k, lk in enumerate(self.mtp_forward(input_ids, h) if mtp_lambda else [], start=1):
            mtp = mtp + F.cross_entropy(lk[:, :-1].flatten(0, 1), input_ids[:, k + 1:].flatten())  # eq. 24
        if len(self.mtp) and mtp_lambda:
            mtp = mtp / len(self.mtp)
        balance = h.new_zeros(())
        for m in self.moe_layers + ([b.block.ffn for b in self.mtp] if mtp_lambda else []):
            balance = balance + m.aux_loss
        return {"main": main, "mtp": mtp, "balance": balance, "total": main + mtp_lambda * mtp + balance}  # eq. 25

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: every MoE layer that saw training tokens moves its bias (call after step)."""
        for block in list(self.layers) + [m.block for m in self.mtp]:
            if block.is_moe and block.ffn.load_since_update.any():
                block.ffn.update_bias()

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """``(B, T)`` -> ``(B, T + max_new_tokens)``: greedy over the absorbed latent cache by default.

        Keyword arguments are those of :func:`helpers.model.generate.generate` (``temperature``, ``top_p``,
        ``absorb``, ``use_mtp``, ``generator``).
        """
        from helpers.model.generate import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def num_parameters(self, include_mtp: bool = False) -> tuple[int, int]:
        """``(total, activated per token)``: routed experts count ``K_r / N_r`` of their weights.

        Without ``include_mtp`` this is the count ``helpers.accounting`` gives for ``self.config`` (the
        ``transformers`` model has no MTP weights).
        """
        frac = self.config.num_experts_per_tok / self.config.n_routed_experts
        total, activated = 0, 0.0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not include_mtp:
                continue
            total += p.numel()
            routed = name.endswith((".ffn.w_gate_up", ".ffn.w_down"))
            activated += p.numel() * (frac if routed else 1.0)
        return total, round(activated)
