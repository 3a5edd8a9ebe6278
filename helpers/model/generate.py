"""Generation over the latent cache: prefill, then one token at a time; greedy, temperature, top-p; MTP drafts.

Every block keeps the cache its attention makes (``model.new_caches()``: a :class:`helpers.mla.LatentCache`, only
``c^{KV}`` and ``k^R`` per token, or V3.2's latent cache with the indexer keys beside it). The prompt is
run once (prefill), then each new token is one forward step of ``T = 1`` that attends over the cache,
absorbed by default (``absorb=False`` re-expands the latent as ``transformers`` does).

Self-speculative decoding (``use_mtp=True``, V3 §2.2 "MTP in inference", §5.4.3): the MTP module drafts
the token after next from the main model's hidden state; the main model verifies the draft together
with the next token in one step of ``T = 2``. A draft is kept only if it equals the main model's own
greedy choice, so the output is exactly plain greedy decoding, with fewer main-model steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.inputs import check_input_ids
from helpers.mla import GrowingBuffer
from helpers.rules import require_bool


def crop(caches: list[GrowingBuffer], length: int) -> None:
    """Forget cached tokens from ``length`` on (a rejected draft): the buffers stay, the length shrinks."""
    for cache in caches:
        cache.truncate(min(cache.length, length))


def cache_bytes(caches: list[GrowingBuffer]) -> int:
    """Bytes the filled caches hold, measured from the tensors."""
    return sum(cache.nbytes() for cache in caches)


def pick(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``: argmax when ``temperature == 0``.

    Otherwise sample from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the first token is always kept
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             absorb: bool | None = True, use_mtp: bool = False, generator: torch.Generator | None = None,
             stats: dict | None = None) -> Tensor:
    """Continue ``input_ids (B, T)`` by ``max_new_tokens`` tokens -> ``(B, T + max_new_tokens)``.

    Args:
        model: a :class:`helpers.model.DeepSeekV3` or :class:`helpers.v4.model.DeepSeekV4` (used as it is: call
            ``eval()`` first for inference).
        temperature: 0 is greedy; above 0 samples (with ``top_p`` and ``generator``).
        absorb: attention over the latent with absorbed weights (default) or re-expanded (``False``); ``None`` for
            attentions with one form only (DeepSeek-V4's, whose ``generate`` passes it).
        use_mtp: self-speculative decoding with the first MTP module (greedy, batch 1); same output as greedy.
        stats: if a dict, filled with ``main_steps``, ``drafted``, ``accepted``, ``cache_bytes``.
    """
    _check_generate_args(max_new_tokens, temperature, top_p, absorb, use_mtp, generator)
    check_input_ids(input_ids, model.config.vocab_size)
    model.check_length(input_ids.shape[1] + max_new_tokens)
    if max_new_tokens == 0:
        return input_ids
    if use_mtp:
        return _speculative(model, input_ids, max_new_tokens, absorb, temperature, stats)
    caches = model.new_caches()
    logits = model.logits(model.run_blocks(input_ids, caches, absorb)[:, -1:])[:, 0]  # prefill: (B, V)
    new = decode(model, logits, caches, max_new_tokens, absorb, temperature, top_p, generator)  # (B, N)
    if stats is not None:
        stats.update(main_steps=max_new_tokens, drafted=0, accepted=0, cache_bytes=cache_bytes(caches))
    return torch.cat([input_ids, new], dim=1)


def decode(model, logits: Tensor, caches: list[GrowingBuffer], n: int, absorb: bool | None = True, temperature: float = 0.0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """The decode loop after a prefill: ``n`` new tokens ``(B, n)`` from last-position ``logits (B, V)``.

    Each token but the last is fed back as one step of ``T = 1`` over ``caches`` (which it extends).
    """
    out = []
    for step in range(n):
        token = pick(logits, temperature, top_p, generator)[:, None]  # (B, 1)
        out.append(token)
        if step + 1 < n:
            logits = model.logits(model.run_blocks(token, caches, absorb)[:, -1:])[:, 0]  # one decode step
    return torch.cat(out, dim=1)


def _check_generate_args(max_new_tokens: int, temperature: float, top_p: float, absorb: bool | None, use_mtp: bool,
                         generator: torch.Generator | None) -> None:
    """``ValueError``/``TypeError`` naming the argument, for values out of range and for arguments the chosen
    decoding would ignore (a ``generator`` or ``top_p`` with greedy decoding, sampling with ``use_mtp``)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    require_bool(use_mtp=use_mtp, **({} if absorb is None else {"absorb": absorb}))
    if temperature == 0 and (top_p != 1.0 or generator is not None):
        raise ValueError("top_p and generator only steer sampling, but temperature=0 decodes greedily and would "
                         "ignore them: set temperature > 0, or drop top_p/generator")


def _speculative(model, input_ids: Tensor, max_new_tokens: int, absorb: bool, temperature: float,
                 stats: dict | None) -> Tensor:
    """Greedy decoding where MTP module 1 drafts one extra token per main-model step (batch 1)."""
    if not len(model.mtp):
        raise ValueError("use_mtp=True needs an MTP module: build the model with config.num_mtp_layers >= 1")
    if input_ids.shape[0] != 1 or temperature != 0:
        raise ValueError("use_mtp=True is greedy decoding of one sequence: pass batch 1 and temperature=0")
    mtp = model.mtp[0]
    caches, mtp_cache = model.new_caches(), mtp.block.attn.new_cache()
    h = model.run_blocks(input_ids, caches, absorb)  # (1, P, H) prefill
    nxt = model.logits(h[:, -1]).argmax(-1, keepdim=True)  # (1, 1): token P, already final
    tokens = [input_ids, nxt]
    n_new, steps, drafted, accepted = 1, 1, 0, 0
    # MTP inputs pair the main hidden state at i with the token at i + 1.
    mtp_in_h, mtp_in_tok = model.norm(h), torch.cat([input_ids[:, 1:], nxt], dim=1)
    while n_new < max_new_tokens:
        draft = model.head(mtp(mtp_in_h, model.embed(mtp_in_tok), cache=mtp_cache, absorb=absorb)[:, -1])
        draft = draft.argmax(-1, keepdim=True)  # (1, 1): guess for the token after `nxt`
        drafted += 1
        length = caches[0].length
        h2 = model.run_blocks(torch.cat([nxt, draft], dim=1), caches, absorb)  # (1, 2, H): verify in one step
        steps += 1
        choice = model.logits(h2).argmax(-1)  # (1, 2): main model's greedy tokens after nxt and after draft
        if choice[0, 0] == draft[0, 0]:  # accepted: two tokens for one step
            accepted += 1
            new = torch.cat([draft, choice[:, 1:]], dim=1)  # (1, 2)
            mtp_in_h, mtp_in_tok = model.norm(h2), new
        else:  # rejected: keep the main model's token, forget the draft's cache entry
            crop(caches, length + 1)
            new = choice[:, :1]
            mtp_in_h, mtp_in_tok = model.norm(h2[:, :1]), new
        tokens.append(new)
        n_new += new.shape[1]
        nxt = new[:, -1:]
    if stats is not None:
        stats.update(main_steps=steps, drafted=drafted, accepted=accepted, cache_bytes=cache_bytes(caches))
    return torch.cat(tokens, dim=1)[:, : input_ids.shape[1] + max_new_tokens]
