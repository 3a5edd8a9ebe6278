"""A whole DeepSeek-V4 in miniature, assembled from the V4 pieces by the model family's registries.

=====================  =============================================================================
piece                  what it is (DeepSeek-V4 report, §2)
=====================  =============================================================================
``embed``              token embedding, copied into ``hc_mult`` residual streams (:func:`expand_streams`, §2.2)
``layers[i]``          :class:`helpers.model.DecoderBlock`: attention (sliding window, CSA or HCA by
                       ``layer_types[i]``, §2.3) and V4's MoE (hash or top-k routed by ``mlp_layer_types[i]``,
                       §2.1), each pre-normed inside a manifold-constrained hyper-connection (§2.2)
``hc_head``            :class:`HyperHead`: the streams collapsed into one hidden state
``norm``, ``head``     final RMSNorm and the untied output head
=====================  =============================================================================

The blocks are the same :class:`helpers.model.DecoderBlock` as V3's, filled from the registries of
:mod:`helpers.model.blocks` by the names a ``DeepseekV4Config`` gives (``swa``/``csa``/``hca``, ``hash_moe``/``v4_moe``,
``hyper``). :class:`DeepSeekV4` is :class:`helpers.model.DeepSeekV3` with three differences: the streams after the
embedding, the hyper head before the final norm, and no MTP modules (``transformers`` has none for V4).

Shapes: ``B`` batch, ``T`` tokens, ``n_hc`` streams (``hc_mult``), ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DeepseekV4Config

from helpers.inputs import check_input_ids
from helpers.model.blocks import V4_ATTENTION_KINDS, V4_FFN_KINDS
from helpers.model.model import DeepSeekV3
from helpers.moe import Balancing
from helpers.rules import require_choice, require_positive
from helpers.v4.attention import AUTO, check_layer_backend
from helpers.v4.cache import V4Cache
from helpers.v4.hyper import HyperConnection, HyperHead, expand_streams
from helpers.v4.moe import V4MoE
from helpers.v4.norms import V4RMSNorm

TINY_V4 = dict(
    vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, routed_scaling_factor=1.5,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=4, sliding_window=8, o_groups=2, o_lora_rank=16,
    index_n_heads=5, index_head_dim=8, index_topk=3, max_position_embeddings=256,
)
"""Every V4 path on a CPU in milliseconds: the three attention kinds, hash and top-k MoE, four streams. Five indexer
heads (two give exact ties in the indexer's top-k) and ``index_head_dim`` equal to the RoPE width (8)."""


def tiny_v4_config(**overrides: Any) -> DeepseekV4Config:
    """A tiny ``DeepseekV4Config`` (:data:`TINY_V4` with ``overrides``), eager attention and experts, no hub.

    ``num_hidden_layers`` follows a given ``layer_types`` (and ``mlp_layer_types`` defaults to hash routing in the
    first layer, top-k after).
    """
    fields = dict(TINY_V4)
    if "layer_types" in overrides:
        n = len(overrides["layer_types"])
        fields.update(num_hidden_layers=n, mlp_layer_types=["hash_moe"] + ["moe"] * (n - 1))
    fields.update(overrides)
    return DeepseekV4Config(**fields, attn_implementation="eager", experts_implementation="eager")


def check_v4_config(config: Any) -> None:
    """``ValueError`` naming the field if our model cannot compute what a ``DeepseekV4Config`` describes.

    The model-level fields are checked here (the schedules, the streams, the head); each piece checks its own
    (:meth:`V4Attention.from_config`, :meth:`V4MoE.from_config`, :meth:`HyperConnection.from_config`).
    """
    if getattr(config, "model_type", None) != "deepseek_v4":
        raise ValueError(f"config must be a DeepseekV4Config (model_type 'deepseek_v4'), got "
                         f"{getattr(config, 'model_type', type(config).__name__)!r}: DeepSeek-V3 configs build "
                         "helpers.model.DeepSeekV3")
    require_positive(num_hidden_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                     hidden_size=config.hidden_size, hc_mult=config.hc_mult, sliding_window=config.sliding_window,
                     max_position_embeddings=config.max_position_embeddings)
    for field, kinds in (("layer_types", V4_ATTENTION_KINDS), ("mlp_layer_types", V4_FFN_KINDS)):
        types = getattr(config, field)
        if not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers:
            got = f"{len(types)} entries" if isinstance(types, (list, tuple)) else repr(types)
            raise ValueError(f"{field} must list one entry per layer (num_hidden_layers={config.num_hidden_layers}), "
                             f"got {got}")
        for i, kind in enumerate(types):
            require_choice(f"{field}[{i}]", kind, kinds)
    for field, want, why in (("tie_word_embeddings", False, "DeepSeek-V4 has an untied output head"),
                             ("hidden_act", "silu", "the experts are SwiGLUs"),
                             ("attention_bias", False, "V4's attention projections have no biases")):
        if getattr(config, field) != want:
            raise ValueError(f"{field} must be {want!r} ({why}), got {getattr(config, field)!r}")


class DeepSeekV4(DeepSeekV3):
    """DeepSeek-V4 in miniature: embedding -> ``hc_mult`` streams -> blocks -> hyper head -> norm -> head.

    Args:
        config: a ``transformers`` ``DeepseekV4Config`` (checked once, :func:`check_v4_config`).
        balancing: accepted for the family's signature; V4's MoE layers balance through the training loop
            (:mod:`helpers.v4.train`), so only ``Balancing()`` (the default) is meaningful.
        attention_backend: every attention layer's ``backend`` (:class:`helpers.v4.attention.V4Attention`):
            ``"auto"`` (default: the fast decode step, gathered or masked prefill by size), ``"gather"`` or
            ``"masked"`` (the plain reading, ``transformers``' way); all give the same numbers.

    ``model(input_ids)`` returns logits ``(B, T, V)``; :meth:`hidden` returns the streams ``(B, T, n_hc, H)``;
    :meth:`generate` decodes greedily (or samples) over the blocks' own caches (:meth:`new_caches`).
    """

    validate = staticmethod(check_v4_config)

    def __init__(self, config, balancing: Balancing | None = None, attention_backend: str = AUTO) -> None:
        check_layer_backend(attention_backend)
        super().__init__(config, balancing)
        self.hc_head = HyperHead.from_config(config)
        for block in self.layers:
            block.attn.backend = attention_backend

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Initialise as ``transformers``' ``_init_weights``: every matrix ``N(0, std^2)``, norms 1, the attention
        sinks and compressor position biases 0, hyper-connection bases 0 and scales 1, MoE biases 0; the hash
        tables stay balanced (:func:`helpers.v4.moe.hash_table`)."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                p.zero_()
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
        for module in self.modules():
            if isinstance(module, (nn.RMSNorm, V4RMSNorm)):
                nn.init.ones_(module.weight)
            if isinstance(module, (HyperConnection, HyperHead)):
                module.reset_parameters()
                nn.init.normal_(module.fn if isinstance(module, HyperConnection) else module.hc_fn, 0.0, std)
            if isinstance(module, V4MoE) and not module.is_hash:
                module.bias.zero_()

    @property
    def moe_layers(self) -> list[V4MoE]:
        """The MoE layer of every block, in depth order (V4 has no dense blocks)."""
        return [block.ffn for block in self.layers]

    def new_caches(self) -> list[V4Cache]:
        """One empty cache per block, each made by the block's attention (window, compressor and indexer states)."""
        return [block.attn.new_cache() for block in self.layers]

    def hidden(self, input_ids: Tensor, caches: list[V4Cache] | None = None, absorb: None = None) -> Tensor:
        """The last block's streams ``(B, T, n_hc, H)``; with ``caches`` (one per block), continue them.

        Checks ``input_ids`` and the caches (one per block, each of its block's kind, distinct, equally long)
        before any cache changes.
        """
        check_input_ids(input_ids, self.config.vocab_size)
        if caches is not None:
            check_v4_caches(caches, [block.attn for block in self.layers])
        self.check_length((caches[0].length if caches else 0) + input_ids.shape[1])
        return self.run_blocks(input_ids, caches, absorb)

    def embed_streams(self, input_ids: Tensor) -> Tensor:
        """``Emb(t)`` copied into ``hc_mult`` streams: ``(B, T) -> (B, T, n_hc, H)`` (V4 §2.2)."""
        return expand_streams(self.embed(input_ids), self.config.hc_mult)

    def logits(self, h: Tensor) -> Tensor:
        """``OutHead(RMSNorm(HyperHead(X)))``: streams ``(B, T, n_hc, H) -> (B, T, V)``."""
        return self.head(self.norm(self.hc_head(h)))

    def losses(self, input_ids: Tensor, mtp_lambda: float = 0.0) -> dict[str, Tensor]:
        """Next-token cross-entropy on one batch ``(B, T)``, in the family's layout ``{"main", "mtp", "balance",
        "total"}``: this miniature has no MTP module and no auxiliary balance loss (its top-k MoE layers balance by
        the bias update alone, :mod:`helpers.v4.train`), so ``mtp`` and ``balance`` are 0 and ``mtp_lambda`` must be.
        """
        if mtp_lambda:
            raise ValueError(f"mtp_lambda must be 0 for DeepSeekV4 (it has no MTP module), got {mtp_lambda!r}")
        logits = self.logits(self.hidden(input_ids))  # (B, T, V)
        main = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        zero = main.new_zeros(())
        return {"main": main, "mtp": zero, "balance": zero, "total": main}

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """``(B, T)`` -> ``(B, T + max_new_tokens)``, greedy by default, over the blocks' own caches.

        Keyword arguments are those of :func:`helpers.model.generate.generate` (``temperature``, ``top_p``,
        ``generator``, ``stats``); V4's attention has one form, so there is no ``absorb``, and no MTP module.
        """
        from helpers.model.generate import generate
        return generate(self, input_ids, max_new_tokens, absorb=None, **kwargs)

    def num_parameters(self, include_mtp: bool = False) -> tuple[int, int]:
        """``(total, activated per token)``: routed experts count ``K_r / N_r`` of their weights (V4 has no MTP)."""
        frac = self.config.num_experts_per_tok / self.config.n_routed_experts
        total, activated = 0, 0.0
        for name, p in self.named_parameters():
            total += p.numel()
            activated += p.numel() * (frac if name.endswith((".ffn.w_gate_up", ".ffn.w_down")) else 1.0)
        return total, round(activated)


def check_v4_caches(caches: Any, attentions: list) -> None:
    """One cache per block, each as its attention makes it (``attn.new_cache()``: same window, same compressor and
    indexer), distinct objects, all equally long; checked before the first block writes into its cache."""
    n = len(attentions)
    if not isinstance(caches, (list, tuple)) or len(caches) != n:
        got = f"a {type(caches).__name__} of {len(caches)}" if isinstance(caches, (list, tuple)) else type(caches).__name__
        raise TypeError(f"caches must be a list of {n} caches (one per decoder block), got {got}: "
                        "use model.new_caches()")
    if len({id(c) for c in caches}) < n:
        raise ValueError("the same cache object appears twice in caches: give every block its own cache "
                         "(model.new_caches())")
    for i, (cache, attn) in enumerate(zip(caches, attentions)):
        want = attn.new_cache()
        if not isinstance(cache, V4Cache) or _layout(cache) != _layout(want):
            raise TypeError(f"caches[{i}] is not the cache block {i}'s attention makes ({_describe(want)}), got "
                            f"{_describe(cache)}: use model.new_caches()")
    if len({cache.length for cache in caches}) > 1:
        raise ValueError(f"caches hold different lengths {[c.length for c in caches]}: a failed or partial call "
                         "left them apart; start new caches")


def _layout(cache: V4Cache) -> tuple:
    """What distinguishes the caches of the three layer kinds: the window, the compression rate, an indexer."""
    return (cache.window.window, cache.compressor.ratio if cache.compressor else None, cache.indexer is not None)


def _describe(cache: Any) -> str:
    if not isinstance(cache, V4Cache):
        return f"a {type(cache).__name__}"
    window, ratio, indexer = _layout(cache)
    kind = "sliding window only" if ratio is None else f"compression rate {ratio}" + (" + indexer" if indexer else "")
    return f"a V4Cache, window {window}, {kind}"
