"""Checker of notebook 24's exercise: the KV cache of one sequence, from a model config (V2 paper Table 1).

``sequence_cache_bytes(config, kind, tokens, dtype, n_groups)`` returns the bytes one sequence of ``tokens``
tokens occupies in the cache of every layer, if the model's attention were ``kind``:

- ``"MHA"``: keys and values of ``num_attention_heads`` heads of width ``d_h = qk_nope_head_dim``, ``2 n_h d_h``;
- ``"GQA"``: keys and values of ``n_groups`` shared heads of width ``d_h``, ``2 n_g d_h``;
- ``"MLA"``: the latent and the shared RoPE key, ``d_c + d_h^R`` (``kv_lora_rank + qk_rope_head_dim``);

times ``num_hidden_layers``, ``tokens`` and the bytes of ``dtype`` (:data:`helpers.accounting.BYTES_PER_ELEMENT`).
The known mistakes are one-step deviations from :func:`_bytes_with`, a reference with switches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import DeepseekV3Config

from helpers.accounting import BYTES_PER_ELEMENT, kv_cache_bytes, kv_cache_elements
from helpers.teaching.checks import Case, Checker, Mistake


def sequence_cache_bytes(config, kind: str, tokens: int, dtype: str, n_groups: int) -> int:
    """The reference: bytes of KV cache of one ``tokens``-long sequence, all layers (see the module docstring)."""
    d_h = config.qk_nope_head_dim
    elements = {"MHA": lambda: kv_cache_elements("MHA", n_heads=config.num_attention_heads, head_dim=d_h),
                "GQA": lambda: kv_cache_elements("GQA", n_kv_heads=n_groups, head_dim=d_h),
                "MLA": lambda: kv_cache_elements("MLA", kv_lora_rank=config.kv_lora_rank,
                                                 qk_rope_head_dim=config.qk_rope_head_dim)}[kind]()
    return kv_cache_bytes(elements, n_layers=config.num_hidden_layers, tokens=tokens, dtype=dtype)


def _config(n_h: int, d_h: int, d_r: int, d_c: int, layers: int) -> DeepseekV3Config:
    # num_key_value_heads = num_attention_heads, as in every DeepSeek config (MLA has no key/value groups)
    return DeepseekV3Config(num_attention_heads=n_h, num_key_value_heads=n_h, qk_nope_head_dim=d_h, v_head_dim=d_h,
                            qk_rope_head_dim=d_r, kv_lora_rank=d_c, num_hidden_layers=layers)


def _cases() -> list[Case]:
    # Within a case every size differs (n_h, d_h, d_h^R, d_c, layers, tokens, n_groups), so mistakes give
    # different numbers; the dtypes differ between cases, so do the bytes per element.
    return [
        Case("MLA, bf16: n_h=6, d_h=10, d_h^R=4, d_c=38, 5 layers, 7 tokens",
             dict(config=_config(6, 10, 4, 38, 5), kind="MLA", tokens=7, dtype="bf16", n_groups=3)),
        Case("MHA, fp32: n_h=5, d_h=12, d_h^R=6, d_c=40, 3 layers, 11 tokens",
             dict(config=_config(5, 12, 6, 40, 3), kind="MHA", tokens=11, dtype="fp32", n_groups=2)),
        Case("GQA with 2 groups, fp8: n_h=8, d_h=6, d_h^R=4, d_c=24, 7 layers, 9 tokens",
             dict(config=_config(8, 6, 4, 24, 7), kind="GQA", tokens=9, dtype="fp8", n_groups=2)),
        Case("MLA, fp32: n_h=12, d_h=14, d_h^R=8, d_c=56, 3 layers, 5 tokens",
             dict(config=_config(12, 14, 8, 56, 3), kind="MLA", tokens=5, dtype="fp32", n_groups=4)),
    ]


def _bytes_with(config, kind, tokens, dtype, n_groups, *, kv_factor=2, gqa_heads="n_groups", mla="latent + rope",
                element_bytes="dtype", layer_power=1, with_tokens=True) -> int:
    """The reference with switches; the defaults are right, and each known mistake flips one switch."""
    n_h, d_h, d_r, d_c = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                          config.kv_lora_rank)
    if kind == "MHA":
        elements = kv_factor * n_h * d_h
    elif kind == "GQA":
        elements = kv_factor * (n_groups if gqa_heads == "n_groups" else config.num_key_value_heads) * d_h
    else:
        elements = {"latent + rope": d_c + d_r, "rope per head": d_c + n_h * d_r, "no rope": d_c,
                    "latent twice": 2 * d_c + d_r, "per-head keys and values": 2 * config.num_key_value_heads * d_h,
                    "n_h d_h for the latent": n_h * d_h + d_r, "d_h for the latent": d_h + d_r}[mla]
    per_element = {"dtype": BYTES_PER_ELEMENT[dtype], "fp32": 4, "elements": 1}[element_bytes]
    return elements * per_element * config.num_hidden_layers ** layer_power * (tokens if with_tokens else 1)


def _with(**switch) -> Callable[..., Any]:
    return lambda **kwargs: _bytes_with(**kwargs, **switch)


@dataclass
class _CountChecker(Checker):
    """A Checker that, when no known mistake matches a wrong count, also says by what factor it is off."""

    def explain(self, fn: Callable[..., Any]) -> str | None:
        message = super().explain(fn)
        if message is None or "expected" not in message or self._argument_problem(fn, self.cases()[0].kwargs):
            return message
        for case, fresh in zip(self.cases(), self.cases()):
            got, want = fn(**case.kwargs), self.reference(**fresh.kwargs)
            if isinstance(got, (int, float)) and got != want and f"got {got!r}, expected {want!r}" in message:
                return message + (f" (yours is {got / want:.4g} times the expected count; compare each factor: "
                                  "elements per token per layer, layers, tokens, bytes per element)")
        return message


check_sequence_cache_bytes = _CountChecker(
    name="sequence_cache_bytes",
    nudge="per token and per layer first (V2 paper Table 1: which sizes does each kind cache?), then "
          "multiply by what makes it a whole sequence in a whole model, in bytes.",
    cases=_cases,
    reference=sequence_cache_bytes,
    mistakes=[
        Mistake("keys without values", _with(kv_factor=1),
                "MHA and GQA cache keys AND values: 2 n_h d_h (MHA) or 2 n_g d_h (GQA) elements per token per "
                "layer; yours counts one of the two (the factor 2 is missing)."),
        Mistake("GQA with every head", _with(gqa_heads="config"),
                "for GQA the cache holds n_groups key/value heads, not config.num_key_value_heads (which equals "
                "num_attention_heads in DeepSeek's configs: that is MHA's cache): 2 * n_groups * d_h."),
        Mistake("MLA as per-head keys and values", _with(mla="per-head keys and values"),
                "for MLA you counted per-head keys and values (2 * num_key_value_heads * d_h, MHA's cache): MLA "
                "caches no per-head keys or values, only the latent (kv_lora_rank) and the shared RoPE key "
                "(qk_rope_head_dim)."),
        Mistake("RoPE key per head", _with(mla="rope per head"),
                "the RoPE key k^R is counted once per head: it is one vector per token, shared by all heads, "
                "so MLA caches kv_lora_rank + qk_rope_head_dim."),
        Mistake("RoPE key forgotten", _with(mla="no rope"),
                "the decoupled RoPE key is missing: MLA caches kv_lora_rank + qk_rope_head_dim per token per "
                "layer, not kv_lora_rank alone."),
        Mistake("latent counted twice", _with(mla="latent twice"),
                "the latent is counted twice (once for keys, once for values): keys and values are both "
                "rebuilt from the same cached c^KV, so it is cached once: kv_lora_rank + qk_rope_head_dim."),
        Mistake("n_h d_h instead of kv_lora_rank", _with(mla="n_h d_h for the latent"),
                "the latent's width is kv_lora_rank (d_c), not num_attention_heads * qk_nope_head_dim (the "
                "width of all heads' keys it is expanded into)."),
        Mistake("d_h instead of kv_lora_rank", _with(mla="d_h for the latent"),
                "the latent's width is kv_lora_rank (d_c), not qk_nope_head_dim (one head's key width)."),
        Mistake("always fp32 bytes", _with(element_bytes="fp32"),
                "the bytes per element ignore dtype: 4 bytes is fp32; bf16 takes 2 and fp8 1 -- use "
                "BYTES_PER_ELEMENT[dtype]."),
        Mistake("elements, not bytes", _with(element_bytes="elements"),
                "this is a count of elements, not bytes: multiply by the bytes per element of dtype "
                "(BYTES_PER_ELEMENT[dtype])."),
        Mistake("one layer only", _with(layer_power=0),
                "this is one layer's cache: every layer keeps its own, multiply by num_hidden_layers."),
        Mistake("layers counted twice", _with(layer_power=2),
                "num_hidden_layers is multiplied in twice: the cache is per token x per layer x layers, once."),
        Mistake("one token only", _with(with_tokens=False),
                "this is one token's cache: multiply by the number of tokens in the sequence."),
    ],
    hint="elements per token per layer: MHA 2 * num_attention_heads * d_h, GQA 2 * n_groups * d_h "
         "(d_h = qk_nope_head_dim), MLA kv_lora_rank + qk_rope_head_dim;\n"
         "then x num_hidden_layers x tokens x BYTES_PER_ELEMENT[dtype].",
    checker_name="check_sequence_cache_bytes",
)
