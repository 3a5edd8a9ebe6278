"""Checker of a learner's cached MLA layer (notebook 22): prefill, then token-by-token decode, against recomputation.

``check_cached_mla(LayerClass)`` builds the learner's class with small sizes (every dimension different),
copies its weights into :class:`helpers.mla.MultiHeadLatentAttention`, and runs a prefill of a few tokens
followed by one decode step per token with a :class:`helpers.mla.LatentCache`. Every output must equal the
full pass without a cache. When one does not, the message says which call first differs (the prefill or
decode step ``d``, at which absolute position), and adds only what the evidence shows: the cache length,
which cached ``c^{KV}`` or ``k^R`` rows differ from recomputation, the position whose RoPE angle a wrong
``k^R`` row carries, and which simple alternative (a mask that sees keys ``0..m`` only, a query rotated at
another position, attention over the new tokens only) reproduces a wrong output exactly.

The known mistakes are layers built by :func:`mla_with` with one switch flipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from helpers.mla import LatentCache, MultiHeadLatentAttention, naive_attention
from helpers.mla.checks.common import _gen
from helpers.mla.checks.evidence import _close, _Evidence, _rotate, _rows_differ, _tokens_differ
from helpers.teaching.checks import CheckFailure, Mistake

# ------------------------------------------------------------------ a reference layer with switches


def mla_with(layer: MultiHeadLatentAttention, x: Tensor, cache: LatentCache | None = None, *,
             q_positions: str = "absolute", k_positions: str = "absolute", mask_offset: str = "start",
             cache_normed: bool = True, append: bool = True, attend_new_only: bool = False,
             start_after_append: bool = False) -> Tensor:
    """The cached MLA forward pass with switches; defaults are right, each other value is one mistake.

    ``*_positions="restart"`` rotates at ``0..T-1`` in every call; ``mask_offset="zero"`` masks as if the
    call started at position 0; ``cache_normed=False`` caches (and attends over) the latent before
    ``kv_norm``; ``append=False`` never writes the cache; ``attend_new_only`` appends but attends over this
    call's tokens only; ``start_after_append`` reads the start position from the cache after appending.
    """
    b, t, _ = x.shape
    start = cache.length if cache is not None else 0
    q = layer.wq(x) if layer.q_lora_rank is None else layer.wq_b(layer.q_norm(layer.wq_a(x)))
    q_nope, q_rope = q.view(b, t, layer.n_heads, layer.qk_head_dim).split(
        [layer.qk_nope_head_dim, layer.qk_rope_head_dim], dim=-1)
    c_raw, k_rope = layer.wkv_a(x).split([layer.kv_lora_rank, layer.qk_rope_head_dim], dim=-1)
    c_kv = layer.kv_norm(c_raw) if cache is None or cache_normed else c_raw
    if start_after_append and cache is not None:
        start = cache.length + t
    absolute, restart = torch.arange(start, start + t), torch.arange(t)
    q_rope = _rotate(layer, q_rope, absolute if q_positions == "absolute" else restart, heads=True)
    k_rope = _rotate(layer, k_rope, absolute if k_positions == "absolute" else restart, heads=False)
    if cache is not None and append:
        all_c, all_k = cache.append(c_kv, k_rope)
        if not attend_new_only:
            c_kv, k_rope = all_c, all_k
    w_uk, w_uv = layer.up_projections()
    first = start if mask_offset == "start" else 0
    o = naive_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, layer.softmax_scale, first)
    return layer.wo(o.reshape(b, t, layer.n_heads * layer.v_head_dim))


def _layer_with(name: str, **switch: Any) -> type:
    def forward(self, x: Tensor, cache: LatentCache | None = None) -> Tensor:
        return mla_with(self, x, cache, **switch)

    return type(name, (MultiHeadLatentAttention,), {"forward": forward})


# ------------------------------------------------------------------ cases and evidence


@dataclass
class LayerCase:
    """Sizes of the layer, the batch, and how many tokens are prefilled and then decoded one by one."""

    description: str
    sizes: dict[str, Any]
    batch: int
    prefill: int
    decode: int
    seed: int


def _layer_cases() -> list[LayerCase]:
    return [
        LayerCase("hidden_size=40, n_heads=3, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, "
                  "v_head_dim=7, q_lora_rank=12, interleaved RoPE; B=2, prefill 5 tokens, then 4 decode steps",
                  dict(hidden_size=40, n_heads=3, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                       v_head_dim=7, q_lora_rank=12, rope_interleave=True), 2, 5, 4, 0),
        LayerCase("hidden_size=36, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=5, qk_rope_head_dim=6, "
                  "v_head_dim=9, no query compression, half-split RoPE; B=1, prefill 3 tokens, then 3 decode steps",
                  dict(hidden_size=36, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=5, qk_rope_head_dim=6,
                       v_head_dim=9, q_lora_rank=None, rope_interleave=False), 1, 3, 3, 1),
    ]


# ------------------------------------------------------------------ the checker


@dataclass
class CachedLayerChecker:
    """Checks a learner's MLA class: cached prefill + decode must equal the full pass without a cache."""

    name: str
    cases: Callable[[], list[LayerCase]]
    mistakes: list[Mistake] = field(default_factory=list)
    nudge: str = ""
    hint: str = ""
    checker_name: str = "check_cached_mla"
    _known: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)

    def show_hint(self) -> None:
        """Print the full hint."""
        print(f"Hint for {self.name}:\n{self.hint or self.nudge}")

    def _fail(self, case: LayerCase, reason: str) -> str:
        return f"{self.name} is not right yet, on the case '{case.description}':\n  {reason}"

    def explain(self, layer_cls: type) -> str | None:
        """``None`` if every case passes, else the message a learner would see."""
        for index, case in enumerate(self.cases()):
            try:
                message = self._explain_case(layer_cls, case)
            except NotImplementedError:
                return (f"{self.name}: the layer still calls an exercise stub (raise NotImplementedError): "
                        f"finish the exercise above first.{(' First hint: ' + self.nudge) if self.nudge else ''}")
            except Exception as exc:  # a learner's bug: report it in words, with the case
                return self._fail(case, f"it raised {type(exc).__name__}: {exc}")
            if message is not None:
                for mistake in self.mistakes:  # a known mistake gives the same outputs: name it
                    if self._same(layer_cls, mistake, index, case):
                        return self._fail(case, f"{mistake.message}\n  (What the check saw: {message})")
                return self._fail(case, message)
        return None

    def _run(self, layer_cls: type, case: LayerCase) -> tuple[Any, MultiHeadLatentAttention, Tensor]:
        torch.manual_seed(case.seed)
        layer = layer_cls(**case.sizes)
        ref = MultiHeadLatentAttention(**case.sizes)
        missing = ref.load_state_dict(layer.state_dict(), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"its parameters are not named like helpers.mla.MultiHeadLatentAttention's: missing "
                             f"{missing.missing_keys}, unexpected {missing.unexpected_keys}")
        x = torch.randn(case.batch, case.prefill + case.decode, case.sizes["hidden_size"], generator=_gen(case.seed))
        return layer, ref, x

    def _steps(self, layer: Any, x: Tensor, case: LayerCase) -> tuple[list[Tensor], LatentCache, list[int]]:
        cache, outputs, lengths = LatentCache(), [], []
        chunks = [(0, case.prefill)] + [(p, p + 1) for p in range(case.prefill, case.prefill + case.decode)]
        for a, b in chunks:
            outputs.append(layer(x[:, a:b], cache))
            lengths.append(cache.length)
        return outputs, cache, lengths

    def _signature(self, layer_cls: type, case: LayerCase) -> list[Any] | None:
        """Everything the check observes of a class on a case: outputs, cache lengths and cache contents."""
        try:
            with torch.no_grad():
                layer, _, x = self._run(layer_cls, case)
                outputs, cache, lengths = self._steps(layer, x, case)
                return [layer(x), *outputs, lengths, *(cache.views() if cache.length else ())]
        except Exception:  # noqa: BLE001 - a class that fails on this case matches no mistake
            return None

    def _same(self, layer_cls: type, mistake: Mistake, index: int, case: LayerCase) -> bool:
        key = (mistake.name, index)
        if key not in self._known:
            self._known[key] = self._signature(mistake.fn, case)
        mine, theirs = self._signature(layer_cls, case), self._known[key]
        if mine is None or theirs is None or len(mine) != len(theirs):
            return False
        return all(_close(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else a == b
                   for a, b in zip(mine, theirs))

    def _explain_case(self, layer_cls: type, case: LayerCase) -> str | None:
        with torch.no_grad():
            layer, ref, x = self._run(layer_cls, case)
            want = ref(x)  # (B, T, H): the reference without a cache
            evidence = _Evidence(ref, x)
            full = layer(x)
            outputs, cache, lengths = self._steps(layer, x, case)
        if not _close(full, want):
            return ("without a cache your layer already differs from helpers.mla.MultiHeadLatentAttention with "
                    f"the same weights ({_tokens_differ(full, want, 0) if full.shape == want.shape else 'shape'}"
                    f" {tuple(full.shape)}): fix the full pass first; this is not a cache problem."
                    + self._cache_evidence(cache, evidence, lengths, case))
        cached = torch.cat(outputs, dim=1) if all(o.dim() == 3 for o in outputs) else None
        if cached is not None and _close(cached, want):
            return None
        starts = [0] + list(range(case.prefill, case.prefill + case.decode))
        for step, (start, out) in enumerate(zip(starts, outputs)):
            end = case.prefill if step == 0 else start + 1
            if _close(out, want[:, start:end]):
                continue
            call = (f"the prefill (positions 0..{case.prefill - 1})" if step == 0 else
                    f"decode step {step} (the token at position {start}; the prefill and "
                    f"{'the earlier steps' if step > 1 else 'no earlier step'} were right)")
            what = _tokens_differ(out, want[:, start:end], start) if out.shape == want[:, start:end].shape else \
                f"its output has shape {tuple(out.shape)}, expected {tuple(want[:, start:end].shape)}"
            text = f"with a cache, {call} differs from the full pass without a cache: {what}."
            text += self._cache_evidence(cache, evidence, lengths, case)
            if step > 0 and out.shape == want[:, start:end].shape and "cache holds" not in text:
                found = evidence.explain_step(out[:, 0], start)
                text += f" The cache holds the right c^KV and k^R; {found}." if found else (
                    " The cache holds the right c^KV and k^R for every position, so the difference arises after "
                    "the cache is read, in this step's attention over it.")
            return text
        return None

    def _cache_evidence(self, cache: LatentCache, evidence: _Evidence, lengths: list[int], case: LayerCase) -> str:
        expected = [case.prefill + d for d in range(case.decode + 1)]
        if lengths != expected:
            return (f" After each call the cache holds {lengths} tokens, expected {expected}: append the new "
                    "tokens' c^KV and k^R exactly once per call.")
        parts = []
        rows = _rows_differ(cache.c_kv, evidence.c_kv)
        if rows:
            raw = all(_close(cache.c_kv[:, p], evidence.c_raw[:, p]) for p in rows)
            parts.append(f"the cached c^KV differs from recomputation at position(s) {rows}"
                         + (" and equals the latent before kv_norm there" if raw else ""))
        rows = _rows_differ(cache.k_rope, evidence.k_rope)
        if rows:
            angles = {p: evidence.k_rope_angle(cache.k_rope[:, p], p) for p in rows}
            shown = ", ".join(f"{p} -> {a}" for p, a in list(angles.items())[:6] if a is not None)
            parts.append(f"the cached k^R differs from recomputation at position(s) {rows}"
                         + (f"; those rows are rotated by the RoPE angle of another position (cached position -> "
                            f"angle's position: {shown}): rotate each new k^R at its absolute position"
                            if shown else ""))
        return (" The cache holds wrong entries: " + "; ".join(parts) + ".") if parts else ""

    def audit(self) -> dict[str, str | None]:
        """Each known mistake's name mapped to the message it gets."""
        return {m.name: self.explain(m.fn) for m in self.mistakes}

    def __call__(self, layer_cls: type) -> None:
        message = self.explain(layer_cls)
        if message is not None:
            raise CheckFailure(message) from None
        print(f"✓ {self.name}: prefill and every decode step equal the full pass without a cache "
              f"({len(self.cases())} layer configurations)")


check_cached_mla = CachedLayerChecker(
    name="cached MLA layer",
    cases=_layer_cases,
    nudge="with a cache, the new tokens sit at positions cache.length, cache.length + 1, ...; everything "
          "that depends on position (RoPE of q^R and k^R, the mask) must use those absolute positions.",
    hint="start = cache.length, read BEFORE appending; rotate q^R and k^R at torch.arange(start, start + T); "
         "cache the normalised c^KV and the rotated k^R (cache.append returns everything cached); attend over "
         "all of it with the causal mask offset by start.",
    mistakes=[
        Mistake("positions restart at 0 in every call", _layer_with("RestartPositions", q_positions="restart",
                                                                     k_positions="restart"),
                "RoPE positions restart at 0 in every call: with a cache, the new tokens are at positions "
                "cache.length, cache.length + 1, ...; rotate q^R and k^R at those absolute positions."),
        Mistake("k^R rotated at restarted positions", _layer_with("RestartKeys", k_positions="restart"),
                "the k^R of the new tokens is rotated at positions 0, 1, ... of the call instead of their "
                "absolute positions (cache.length + i); the queries are right."),
        Mistake("q^R rotated at restarted positions", _layer_with("RestartQueries", q_positions="restart"),
                "the query's RoPE part is rotated at positions 0, 1, ... of the call instead of its absolute "
                "position (cache.length + i); the cached keys are right."),
        Mistake("mask offset ignored", _layer_with("MaskFromZero", mask_offset="zero"),
                "the causal mask ignores the cache offset: the token at position start_pos + t may see keys "
                "0..start_pos + t, but your mask treats it as position t."),
        Mistake("latent cached before kv_norm", _layer_with("RawLatent", cache_normed=False),
                "the cache holds the latent before kv_norm (and attention reads it so): normalise c^KV with "
                "kv_norm, then cache it."),
        Mistake("cache never written", _layer_with("NoAppend", append=False),
                "nothing is appended to the cache, so each call sees only its own tokens: cache.append(c_kv, "
                "k_rope) and attend over what it returns."),
        Mistake("attends over the new tokens only", _layer_with("NewOnly", attend_new_only=True),
                "the cache is filled but not read: attend over everything cache.append returns (all cached "
                "tokens), not only this call's tokens."),
        Mistake("start position read after appending", _layer_with("StartAfterAppend", start_after_append=True),
                "the start position is read after appending (cache.length already counts the new tokens), so "
                "every position is shifted by the call's length: read start = cache.length before appending."),
    ],
)
