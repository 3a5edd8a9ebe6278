"""Checker of notebook 44's exercise: one whole DeepSeek-V4 decoder block, from its parts (V4 report §2.2).

==========================  ===============================================================================
checker                     exercise
==========================  ===============================================================================
``check_v4_block``          ``v4_block(block, streams, input_ids)``: attention then MoE, each pre-normed inside
                            its own manifold-constrained hyper-connection, on ``n_hc`` residual streams
==========================  ===============================================================================

Each known mistake is a one-step deviation from the reference (the residual map not transposed, the output not
weighted by the post map, a plain residual instead of the mixing, a norm left out, the MoE's maps computed from
the block's input instead of the streams after attention, one hyper-connection used for both sub-layers), and
``Checker.audit()`` proves that each gets its own message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers.teaching.checks import Case, Checker, Mistake


def v4_block(block, streams: Tensor, input_ids: Tensor) -> Tensor:
    """One V4 decoder block on ``streams (B, T, n_hc, d)`` (V4 report §2.2, mHC eq. 3), without a cache.

    ``X' = B_l^a X + C_l^a Attn(RMSNorm(A_l^a X))``, then ``X'' = B_l^f X' + C_l^f MoE(RMSNorm(A_l^f X'), ids)``,
    where each hyper-connection's maps come from the streams it receives (``hc.maps``: ``pre = A``, ``post = C``,
    ``comb = B^T``, so the mixing is ``comb^T X``).

    Args:
        block: a :class:`helpers.model.DecoderBlock` of a :class:`helpers.v4.model.DeepSeekV4` (``attn_residual``,
            ``attn_norm``, ``attn``, ``ffn_residual``, ``ffn_norm``, ``ffn``).
        streams: ``(B, T, n_hc, d)``. input_ids: ``(B, T)``, which a hash MoE layer routes by.

    Returns:
        ``(B, T, n_hc, d)``.
    """
    return _block_with(block, streams, input_ids)


def _sublayer(hc, streams, f, *, comb_t=True, post_weight=True, mix=True):
    pre, post, comb = hc.maps(streams)  # (B, T, n), (B, T, n), (B, T, n, n)
    out = f(hc.collapse(streams, pre))  # (B, T, d)
    spread = (post.unsqueeze(-1) if post_weight else 1.0) * out.unsqueeze(-2)  # (B, T, n, d): C_l F
    if not mix:
        return streams + spread
    return spread + torch.matmul(comb.transpose(-1, -2) if comb_t else comb, streams)  # + B_l X


def _block_with(block, streams, input_ids, *, comb_t=True, post_weight=True, mix=True, norm=True,
                ffn_maps="after", one_hc=False):
    """:func:`v4_block` with switches; the defaults are right, each known mistake flips one."""
    opts = dict(comb_t=comb_t, post_weight=post_weight, mix=mix)
    attn_norm = block.attn_norm if norm else (lambda h: h)
    x = _sublayer(block.attn_residual, streams, lambda h: block.attn(attn_norm(h)), **opts)
    ffn_hc = block.attn_residual if one_hc else block.ffn_residual
    if ffn_maps == "after":
        return _sublayer(ffn_hc, x, lambda h: block.ffn(block.ffn_norm(h), input_ids), **opts)
    pre, post, comb = ffn_hc.maps(streams)  # the block's input: the wrong streams
    out = block.ffn(block.ffn_norm(ffn_hc.collapse(x, pre)), input_ids)
    return post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)


def _case(description: str, seed: int, layer: int, batch: int, tokens: int) -> Case:
    from helpers.v4.model import DeepSeekV4, tiny_v4_config

    torch.manual_seed(seed)
    config = tiny_v4_config(hidden_size=32, head_dim=16, q_lora_rank=16, moe_intermediate_size=16, vocab_size=40,
                            hc_mult=3, o_lora_rank=8)
    block = DeepSeekV4(config).layers[layer].eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every map far from its start: B_l not symmetric, C_l not 1, norms with their own gains
        for name, p in block.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name or name.endswith("scale")
                    else torch.randn(p.shape, generator=g) * (1.0 if name.endswith(("base", "sinks")) else 0.3))
    streams = torch.randn(batch, tokens, config.hc_mult, config.hidden_size, generator=g)
    input_ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g)
    return Case(description, dict(block=block, streams=streams, input_ids=input_ids))


def _cases() -> list[Case]:
    return [_case("block 0 (sliding window, hash MoE): B=2, T=5, 3 streams of width 32", 1, 0, 2, 5),
            _case("block 1 (CSA, top-k MoE): B=1, T=13, 3 streams of width 32", 2, 1, 1, 13)]


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(**kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(**kwargs)

    return run


def _block(**switch: Any) -> Callable[..., Any]:
    return _no_grad(lambda **kwargs: _block_with(**kwargs, **switch))


_UPDATE = "each sub-layer gives X' = post * F(norm(collapse(X, pre))) + comb^T X (V4 report §2.2)"

check_v4_block = Checker(
    name="v4_block",
    nudge="each sub-layer is one hyper-connection: its maps from the streams it receives, collapse, norm, the "
          "sub-layer, then spread the output with post and mix the streams with comb.",
    cases=_cases,
    reference=_no_grad(v4_block),
    mistakes=[
        Mistake("residual map not transposed", _block(comb_t=False),
                "the streams are mixed with comb, not its transpose: hc.maps returns comb[j, k] = how much of "
                f"stream j goes to stream k, so the new stream k is sum_j comb[j, k] X_j = (comb^T X)_k: {_UPDATE}."),
        Mistake("output not weighted by post", _block(post_weight=False),
                "the sub-layer's output is added to every stream with weight 1: the post map C_l (2 sigmoid, one "
                f"weight per stream) spreads it: {_UPDATE}."),
        Mistake("plain residual on the streams", _block(mix=False),
                "the streams are kept as they are (X + post * F): mHC replaces the identity residual by the "
                f"doubly stochastic mixing comb^T X: {_UPDATE}."),
        Mistake("attention norm left out", _block(norm=False),
                "the collapsed stream reaches the attention without block.attn_norm: V4's blocks are pre-norm, "
                "norm(collapse(X, pre)) goes into each sub-layer."),
        Mistake("MoE maps from the block's input", _block(ffn_maps="before"),
                "the MoE's hyper-connection maps are computed from the block's input streams: they are dynamic, "
                "computed from the streams the MoE receives, those after the attention's update."),
        Mistake("one hyper-connection for both", _block(one_hc=True),
                "the attention's hyper-connection (attn_residual) is used around the MoE too: each sub-layer has "
                "its own (block.ffn_residual, transformers' ffn_hc)."),
    ],
    hint="def sub(hc, X, f):\n"
         "    pre, post, comb = hc.maps(X)\n"
         "    return post.unsqueeze(-1) * f(hc.collapse(X, pre)).unsqueeze(-2) + comb.transpose(-1, -2) @ X\n"
         "x = sub(block.attn_residual, streams, lambda h: block.attn(block.attn_norm(h)))\n"
         "return sub(block.ffn_residual, x, lambda h: block.ffn(block.ffn_norm(h), input_ids))",
    checker_name="check_v4_block",
)
