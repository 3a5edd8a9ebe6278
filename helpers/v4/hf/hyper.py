"""Conversions between :mod:`helpers.v4.hyper` and ``transformers``' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead``.

The parameters map one to one, same names and layouts::

    ours (HyperConnection)      transformers (DeepseekV4HyperConnection, e.g. layers[i].attn_hc / ffn_hc)
    fn     ((2+n)n, n d)        fn
    base   ((2+n)n,)            base
    scale  (3,)                 scale
    ours (HyperHead)            transformers (DeepseekV4HyperHead, model.hc_head)
    hc_fn, hc_base, hc_scale    hc_fn, hc_base, hc_scale

The settings come from the module itself (``hc_mult``, ``hc_sinkhorn_iters``, ``hc_eps``, ``input_norm.eps``; ``d``
from ``fn``'s width), so no config is needed one way; the other way builds a ``DeepseekV4Config`` holding only
these settings unless one is passed (it must agree).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from helpers.v4.hyper import HyperConnection, HyperHead


def _hc_config(hidden_size: int, hc_mult: int, eps: float, norm_eps: float, sinkhorn_iters: int = 20):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(hidden_size=hidden_size, hc_mult=hc_mult, hc_sinkhorn_iters=sinkhorn_iters, hc_eps=eps,
                            rms_norm_eps=norm_eps)


def _agree(config: Any, **fields: Any) -> None:
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ValueError(f"config gives {name}={getattr(config, name)!r} but the module has {value!r}")


def hyper_from_hf(module: nn.Module) -> HyperConnection:
    """Our :class:`HyperConnection` equal to a ``transformers`` ``DeepseekV4HyperConnection`` (same dtype, device)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    if not isinstance(module, DeepseekV4HyperConnection):
        raise TypeError(f"expected a DeepseekV4HyperConnection (e.g. model.model.layers[0].attn_hc), got "
                        f"{type(module).__name__}")
    n = module.hc_mult
    ours = HyperConnection(module.fn.shape[1] // n, n, module.hc_sinkhorn_iters, module.hc_eps, module.input_norm.eps)
    ours.to(device=module.fn.device, dtype=module.fn.dtype)
    with torch.no_grad():
        for name in ("fn", "base", "scale"):
            getattr(ours, name).copy_(getattr(module, name))
    return ours


def hyper_to_hf(ours: HyperConnection, config: Any = None) -> nn.Module:
    """A ``transformers`` ``DeepseekV4HyperConnection`` equal to ``ours``.

    Args:
        ours: our module.
        config: a ``DeepseekV4Config`` to build it from (its ``hidden_size``, ``hc_mult``, ``hc_sinkhorn_iters``,
            ``hc_eps``, ``rms_norm_eps`` must agree); default: one with exactly these settings.
    """
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    settings = dict(hidden_size=ours.hidden_size, hc_mult=ours.hc_mult, hc_sinkhorn_iters=ours.sinkhorn_iters,
                    hc_eps=ours.eps, rms_norm_eps=ours.norm_eps)
    if config is None:
        config = _hc_config(ours.hidden_size, ours.hc_mult, ours.eps, ours.norm_eps, ours.sinkhorn_iters)
    _agree(config, **settings)
    module = DeepseekV4HyperConnection(config).to(device=ours.fn.device, dtype=ours.fn.dtype)
    with torch.no_grad():
        for name in ("fn", "base", "scale"):
            getattr(module, name).copy_(getattr(ours, name))
    return module


def head_from_hf(module: nn.Module) -> HyperHead:
    """Our :class:`HyperHead` equal to a ``transformers`` ``DeepseekV4HyperHead`` (``model.model.hc_head``)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

    if not isinstance(module, DeepseekV4HyperHead):
        raise TypeError(f"expected a DeepseekV4HyperHead (model.model.hc_head), got {type(module).__name__}")
    n = module.hc_mult
    ours = HyperHead(module.hc_fn.shape[1] // n, n, module.eps, module.input_norm.eps)
    ours.to(device=module.hc_fn.device, dtype=module.hc_fn.dtype)
    with torch.no_grad():
        for name in ("hc_fn", "hc_base", "hc_scale"):
            getattr(ours, name).copy_(getattr(module, name))
    return ours


def head_to_hf(ours: HyperHead, config: Any = None) -> nn.Module:
    """A ``transformers`` ``DeepseekV4HyperHead`` equal to ``ours`` (``config`` as in :func:`hyper_to_hf`)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

    if config is None:
        config = _hc_config(ours.hidden_size, ours.hc_mult, ours.eps, ours.norm_eps)
    _agree(config, hidden_size=ours.hidden_size, hc_mult=ours.hc_mult, hc_eps=ours.eps, rms_norm_eps=ours.norm_eps)
    module = DeepseekV4HyperHead(config).to(device=ours.hc_fn.device, dtype=ours.hc_fn.dtype)
    with torch.no_grad():
        for name in ("hc_fn", "hc_base", "hc_scale"):
            getattr(module, name).copy_(getattr(ours, name))
    return module
