"""Argument checks shared by every public entry point: one message style, raised before any work or state change.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, size,
range or value) whose message names the argument, says what was expected and what came, and gives the fix.
The layers call one function each at the top of ``forward`` (the MoE its own
``check_moe_forward``, :func:`check_attention_input`, :func:`check_input_ids`); the routing and balancing functions call
:func:`check_scores` and :func:`check_expert_ids`; the commands use the ``argparse`` types
(:func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`output_path`). Checks of
configuration values run once, when a layer is built, and live in :mod:`helpers.rules`.

NaN policy: the MoE layer refuses a router input holding NaN or an infinity (``ValueError``, before any
statistic changes). ``topk`` over NaN scores picks experts arbitrarily, so the load counters that steer the
bias update would otherwise count noise. Attention layers do not scan their input (NaN propagates to the
output, as in PyTorch), and the routing functions do not either: they are pure and change no state.

This module imports only ``torch`` (no ``transformers``), so the layers stay quick to import.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

import torch
from torch import Tensor


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def require_tensor(name: str, x: Any, layout: str) -> None:
    """``TypeError`` if ``x`` is not a tensor; ``layout`` (e.g. ``"[batch, tokens, 64]"``) says what is wanted."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}; "
                        f"convert it with torch.as_tensor({name}, dtype=torch.float32)")


def check_float_like(name: str, x: Tensor, weight: Tensor, owner: str = "the layer") -> None:
    """``TypeError``/``ValueError`` unless ``x`` has the dtype and device of ``weight`` (the layer's weights)."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor ({weight.dtype}, like {owner}'s weights), got "
                        f"{x.dtype}; token ids go through an embedding first, else use {name}.to({weight.dtype})")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {owner}'s weights are {weight.dtype}: use "
                        f"{name}.to({weight.dtype}) or move {owner} with .to({x.dtype})")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but {owner}'s weights are on {weight.device}: use "
                         f"{name}.to('{weight.device}') or move {owner} with .to('{x.device}')")


def check_hidden(name: str, x: Any, hidden_size: int, weight: Tensor, *, rank: int | None = None,
                 min_rank: int = 1, layout: str | None = None, owner: str = "the layer") -> None:
    """Check an activation ``x``: a tensor of ``rank`` (or at least ``min_rank``) dims, last dim ``hidden_size``,
    with ``weight``'s dtype and device."""
    layout = layout or f"[..., hidden_size={hidden_size}]"
    require_tensor(name, x, layout)
    if rank is not None and x.dim() != rank:
        fix = f"add the batch dim with {name}.unsqueeze(0)" if x.dim() == rank - 1 else f"reshape it to {layout}"
        raise ValueError(f"{name} must have {rank} dims {layout}, got shape {_shape(x)}: {fix}")
    if x.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dims {layout}, got shape {_shape(x)}: "
                         f"reshape it to {layout}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"{name}'s last dim must be hidden_size={hidden_size} ({owner} was built for it), got "
                         f"{x.shape[-1]} in shape {_shape(x)}: pass activations of width {hidden_size} or build "
                         f"{owner} with hidden_size={x.shape[-1]}")
    check_float_like(name, x, weight, owner)


def check_finite(name: str, x: Tensor, why: str) -> None:
    """``ValueError`` if ``x`` holds NaN or an infinity (``why``: what it would corrupt).

    One pass over ``x`` without a temporary: ``aminmax`` propagates NaN and an infinity is the minimum or the
    maximum, so both are finite exactly when every value is (``isfinite(x).all()`` makes a boolean copy first).
    """
    if x.numel() and not all(math.isfinite(v) for v in torch.aminmax(x.detach())):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{name} holds {n_nan} NaN and {n_inf} infinite value(s) of {x.numel()}; {why}. Find the "
                         f"step that produced them (e.g. torch.autograd.set_detect_anomaly(True)), or lower the "
                         f"learning rate")


def check_attention_input(layer: Any, x: Any, cache: Any, cache_type: type, *, dense: bool = False,
                          absorb: Any = None) -> None:
    """MLA / DSA entry check: ``x (B, T, H)`` like the weights; ``cache`` of ``cache_type`` that fits the layer.

    ``dense``: the layer fills no indexer keys, so it refuses DSA's cache (one with an ``indexer``), which it
    would leave inconsistent.
    """
    owner = type(layer).__name__
    check_hidden("x", x, layer.hidden_size, layer.wkv_a.weight, rank=3,
                 layout=f"[batch, tokens, hidden_size={layer.hidden_size}]", owner=owner)
    if absorb is not None and not isinstance(absorb, bool):
        raise TypeError(f"absorb must be True, False or None (the layer's default), got {absorb!r}")
    if cache is None:
        return
    want = cache_type.__name__
    if not isinstance(cache, cache_type) or (dense and hasattr(cache, "indexer")):
        raise ValueError(f"cache must be a {want} for {owner}, got {type(cache).__name__}: create one with "
                        f"{want}() and pass the same object at every step")
    b, t = x.shape[0], x.shape[1]
    if cache.max_length is not None and cache.length + t > cache.max_length:
        raise ValueError(f"cache is full: it holds {cache.length} of max_length={cache.max_length} tokens and x "
                         f"brings {t} more; create the cache with a larger max_length")
    if cache.length == 0:
        return
    c_kv, k_rope = cache.c_kv, cache.k_rope
    if c_kv.shape[0] != b:
        raise ValueError(f"cache holds a batch of {c_kv.shape[0]} sequences but x has batch {b}: continue a cache "
                         f"with the same batch, or start a new {want}() for a new batch")
    widths = (c_kv.shape[-1], k_rope.shape[-1])
    if widths != (layer.kv_lora_rank, layer.qk_rope_head_dim):
        raise ValueError(f"cache was filled by another layer: it holds (d_c, d_h^R) = {widths}, this layer has "
                         f"({layer.kv_lora_rank}, {layer.qk_rope_head_dim}); use one cache per layer")
    if c_kv.dtype != x.dtype or c_kv.device != x.device:
        raise TypeError(f"cache holds {c_kv.dtype} on {c_kv.device} but x is {x.dtype} on {x.device}: continue a "
                        f"cache in the dtype and device it was started with")


def check_input_ids(input_ids: Any, vocab_size: int) -> None:
    """The model's entry check: ``input_ids (B, T)`` long ids in ``[0, vocab_size)``.

    The id range is a scan of the data (one host sync): it runs where ids come from outside (a prompt, a
    training batch), never in the decode loop, whose ids the model chose itself.
    """
    require_tensor("input_ids", input_ids, "[batch, tokens] of token ids")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be a LongTensor [batch, tokens], got {input_ids.dtype}: use "
                        "input_ids.long() (token ids, not embeddings)")
    if input_ids.dim() != 2:
        fix = "add the batch dim with input_ids.unsqueeze(0)" if input_ids.dim() == 1 else "reshape it to [batch, tokens]"
        raise ValueError(f"input_ids must be a LongTensor [batch, tokens], got shape {_shape(input_ids)}: {fix}")
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids must be token ids in [0, vocab_size={vocab_size}), got {bad}: encode with "
                             "the model's tokenizer, or build the model with a larger vocab_size")


def check_caches(caches: Any, attentions: list, batch: int | None = None) -> None:
    """One cache per attention layer, each of the kind that layer makes (``attn.new_cache()``), filled by no other
    layer, all equally long, holding ``batch`` sequences (if given): checked for every block before the first block
    writes into its cache (the blocks then skip their own cache checks)."""
    n = len(attentions)
    if not isinstance(caches, (list, tuple)) or len(caches) != n:
        got = f"a {type(caches).__name__} of {len(caches)}" if isinstance(caches, (list, tuple)) else type(caches).__name__
        raise TypeError(f"caches must be a list of {n} caches (one per decoder block), got {got}: "
                        "use model.new_caches()")
    if len({id(c) for c in caches}) < n:
        raise ValueError("the same cache object appears twice in caches: give every block its own cache "
                         "(model.new_caches())")
    for i, (cache, attn) in enumerate(zip(caches, attentions)):
        want = type(attn.new_cache())
        if type(cache) is not want:
            raise TypeError(f"caches[{i}] must be a {want.__name__} (what block {i}'s {type(attn).__name__} makes), "
                            f"got {type(cache).__name__}: use model.new_caches()")
        if cache.owner is not None and cache.owner is not attn:
            raise ValueError(f"caches[{i}] was filled by another attention layer than block {i}'s: give every block "
                             "its own cache (model.new_caches())")
    if len({cache.length for cache in caches}) > 1:
        raise ValueError(f"caches hold different lengths {[c.length for c in caches]}: a failed or partial call "
                         "left them apart; start new caches")
    held = caches[0].views()[0].shape[0] if n and caches[0].length else batch
    if batch is not None and held != batch:
        raise ValueError(f"caches hold a batch of {held} sequences but input_ids has batch {batch}: continue caches "
                         "with the same batch, or start new ones (model.new_caches()) for a new batch")


def check_scores(name: str, x: Any, n_experts: int | None = None) -> None:
    """A (T, E) floating tensor of scores or logits (``n_experts``: the required ``E``)."""
    require_tensor(name, x, "[tokens, experts]")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [tokens, experts], got shape {_shape(x)}: flatten the leading dims with "
                         f"{name}.reshape(-1, {name}.shape[-1])")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}: use {name}.float()")
    if n_experts is not None and x.shape[1] != n_experts:
        raise ValueError(f"{name} must have {n_experts} experts in its last dim, got shape {_shape(x)}: route with "
                         "the same expert count everywhere")


def check_expert_ids(name: str, ids: Any, n_experts: int, *, tokens: int | None = None, rank: int | None = 2) -> None:
    """Integer expert ids ``(T, k)`` in ``[0, n_experts)`` (``tokens``: the required ``T``)."""
    require_tensor(name, ids, "[tokens, k] of expert ids")
    if not isinstance(n_experts, int) or isinstance(n_experts, bool) or n_experts <= 0:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of expert ids, got {ids.dtype}: pass the indices from "
                        "topk (.indices), not the values, or use .long()")
    if rank is not None and ids.dim() != rank:
        raise ValueError(f"{name} must be [tokens, k] expert ids, got shape {_shape(ids)}: reshape it to (-1, k)")
    if tokens is not None and ids.shape[0] != tokens:
        raise ValueError(f"{name} has {ids.shape[0]} tokens but the scores have {tokens}: pass the indices chosen "
                         "for these same tokens")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= n_experts:
            raise ValueError(f"{name} must be expert ids in [0, {n_experts}), got {low if low < 0 else high}: route "
                             f"with n_experts={n_experts}, or pass the expert count the ids were chosen from")


# ---- argparse types: a bad option stops the command with "argument --x: ..." before any work -------------

def _number_type(cast: type, what: str, lowest_ok: float, strict: bool):
    """An argparse type: ``cast(text)``, finite, above ``lowest_ok`` (or equal to it unless ``strict``)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        in_range = value > lowest_ok if strict else value >= lowest_ok  # False for NaN
        if not in_range or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = _number_type(int, "a positive integer", 0, strict=True)
non_negative_int = _number_type(int, "a non-negative integer", 0, strict=False)
positive_float = _number_type(float, "a positive number", 0, strict=True)
non_negative_float = _number_type(float, "a non-negative number", 0, strict=False)


def output_dir(text: str) -> str:
    """argparse type: a folder to create or fill, whose parent folder exists."""
    path = pathlib.Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(path.parent)!r} does not exist; create it first "
                                         f"(mkdir -p {path.parent})")
    return text


def output_path_or_empty(text: str) -> str:
    """argparse type: ``""`` (do not save) or an :func:`output_path`."""
    return text if text == "" else output_path(text)


def output_path(text: str) -> str:
    """argparse type: a file path whose folder exists (so a long run does not fail when it saves)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name inside it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(path.parent)!r} does not exist; create it first "
                                         f"(mkdir -p {path.parent})")
    return text
