"""Checkers of the model track's exercises (notebooks 30 and 32), in the framework of :mod:`helpers.teaching.checks`.

==========================  ===============================================================================
checker                     exercise
==========================  ===============================================================================
``check_mtp_depth``         notebook 30: one MTP depth over a whole sequence (V3 §2.2, eq. 21-23), with its
                            index shift: position ``i`` pairs ``h_i^{k-1}`` with ``Emb(t_{i+k})``
``check_accept_draft``      notebook 32: the verify step of MTP drafts (V3 §2.2 "MTP in inference", §5.4.3):
                            which tokens to keep and how long the main model's cache stays
==========================  ===============================================================================

Each known mistake is a one-step deviation from the reference (shift by ``k - 1``, ``k + 1`` or ``2k``,
hidden states cut at the wrong end, norms or halves swapped, a norm left out; a draft accepted unverified,
verified against the wrong position, the bonus token dropped, the cache cropped one too long or too short, or
its length restarted at zero), and ``Checker.audit()`` proves that each gets its own message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from helpers.configs import tiny_config
from helpers.model.model import MTPModule
from helpers.teaching.checks import Case, Checker, Mistake

# ---------------------------------------------------------------------------------------------------------------
# Notebook 30: one MTP depth (V3 eq. 21-23)
# ---------------------------------------------------------------------------------------------------------------


def mtp_depth(module: MTPModule, embed: nn.Embedding, head: nn.Linear, h_prev: Tensor, input_ids: Tensor,
              k: int) -> tuple[Tensor, Tensor]:
    """MTP depth ``k`` over a whole sequence (V3 §2.2, eq. 21-23), 0-indexed positions.

    Args:
        module: the depth's :class:`~helpers.model.MTPModule` (``enorm``, ``hnorm``, ``eh_proj``, ``block``,
            ``post_norm``); embed, head: the main model's embedding and output head (shared).
        h_prev: ``(B, T-k+1, H)`` depth ``k-1``'s representations at positions ``0..T-k`` (for ``k = 1``, the
            main model's output after its final norm).
        input_ids: ``(B, T)`` the tokens. k: the depth, 1-based.

    Returns:
        ``h_k (B, T-k, H)`` and its logits ``(B, T-k, V)``: position ``i`` combines ``h_i^{k-1}`` with
        ``Emb(t_{i+k})`` and predicts ``t_{i+k+1}``.
    """
    return _mtp_with(module, embed, head, h_prev, input_ids, k)


def _mtp_with(module, embed, head, h_prev, input_ids, k, *, shift="k", hidden="first", norms="right",
              order="emb first", final_norm=True):
    """:func:`mtp_depth` with switches; the defaults are right, each known mistake flips one."""
    s = {"k": k, "k-1": k - 1, "k+1": k + 1, "2k": 2 * k}[shift]
    emb = embed(input_ids[:, s:])  # (B, T-s, H): Emb(t_{i+s})
    n = emb.shape[1]
    h = h_prev[:, :n] if hidden == "first" else h_prev[:, h_prev.shape[1] - n:]  # (B, T-s, H)
    if norms == "right":
        e, g = module.enorm(emb), module.hnorm(h)
    elif norms == "swapped":
        e, g = module.hnorm(emb), module.enorm(h)
    else:  # "none"
        e, g = emb, h
    x = module.eh_proj(torch.cat([e, g] if order == "emb first" else [g, e], dim=-1))  # (B, T-s, H), eq. 21
    out = module.block(x)  # (B, T-s, H), eq. 22
    if final_norm:
        out = module.post_norm(out)
    return out, head(out)  # eq. 23: the shared head


def _mtp_case(description: str, seed: int, k: int, batch: int, tokens: int) -> Case:
    torch.manual_seed(seed)
    config = tiny_config(hidden_size=24, vocab_size=40, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
                         qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6, moe_intermediate_size=10,
                         n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    module, embed = MTPModule(config).eval(), nn.Embedding(config.vocab_size, config.hidden_size)
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    with torch.no_grad():
        for p in [*module.parameters(), *module.buffers(), *embed.parameters(), *head.parameters()]:
            if p.is_floating_point():
                p.normal_(0.0, 0.3)
        for norm in (module.enorm, module.hnorm, module.post_norm):  # every norm its own gain: swaps show
            norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g)
    h_prev = torch.randn(batch, tokens - k + 1, config.hidden_size, generator=g)
    return Case(description, dict(module=module, embed=embed, head=head, h_prev=h_prev, input_ids=input_ids, k=k))


def _mtp_cases() -> list[Case]:
    # Depth 2 first: there k - 1, k + 1 and 2k are three different shifts (at depth 1, k + 1 = 2k).
    return [_mtp_case("depth k=2: B=2, T=9 tokens, h_prev of 8 positions", 1, 2, 2, 9),
            _mtp_case("depth k=1: B=1, T=7 tokens, h_prev of 7 positions", 2, 1, 1, 7)]


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(**kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(**kwargs)

    return run


def _mtp(**switch: Any) -> Callable[..., Any]:
    return _no_grad(lambda **kwargs: _mtp_with(**kwargs, **switch))


_PAIRING = "position i pairs h_i^{k-1} with Emb(t_{i+k}) and predicts t_{i+k+1} (V3 eq. 21-23)"

check_mtp_depth = Checker(
    name="mtp_depth",
    nudge="position i of depth k pairs which hidden state with which token's embedding? Count the positions "
          "each side has, then cut both to the same length.",
    cases=_mtp_cases,
    reference=_no_grad(mtp_depth),
    mistakes=[
        Mistake("shift by k - 1", _mtp(shift="k-1"),
                "the tokens are shifted by k - 1 instead of k (at depth 1: by 0, the token h_i^0 has already "
                f"seen, so the module learns to copy): {_PAIRING}; use input_ids[:, k:] and drop h_prev's last "
                "position."),
        Mistake("shift by k + 1", _mtp(shift="k+1"),
                f"the tokens are shifted by k + 1 instead of k (one too many: at depth 1, by 2): {_PAIRING}. "
                "The target t_{i+k+1} is one further than the input token t_{i+k}; do not add that 1 to the input."),
        Mistake("shift by 2k", _mtp(shift="2k"),
                f"the tokens are shifted by 2k: the depth is applied twice (h_prev of depth k-1 is already "
                f"k-1 positions short, so only input_ids needs the shift k): {_PAIRING}."),
        Mistake("hidden states cut at the wrong end", _mtp(hidden="last"),
                "h_prev is cut at the start (h_prev[:, 1:]) instead of the end: position i must pair "
                f"h_i^{{k-1}} with Emb(t_{{i+k}}), so drop the LAST position of h_prev: {_PAIRING}."),
        Mistake("norms swapped", _mtp(norms="swapped"),
                "the two RMSNorms are swapped: enorm normalises the embedding Emb(t_{i+k}), hnorm the hidden "
                "state h^{k-1} (each has its own gain)."),
        Mistake("no input norms", _mtp(norms="none"),
                "the embedding and the hidden state enter M_k without their RMSNorms: eq. 21 normalises each "
                "half first (module.enorm, module.hnorm)."),
        Mistake("halves swapped", _mtp(order="hidden first"),
                "the two halves are concatenated in the paper's written order [hidden; embedding]; DeepSeek's "
                "checkpoints (and module.eh_proj) put the embedding half first: "
                "cat([enorm(emb), hnorm(h)]) (the same map with M_k's columns swapped)."),
        Mistake("no final norm", _mtp(final_norm=False),
                "h^k is returned without the module's final RMSNorm (module.post_norm, `shared_head.norm` in "
                "DeepSeek's checkpoint): apply it after the block, before the shared head."),
    ],
    hint="emb = embed(input_ids[:, k:])  -> (B, T-k, H);  h = h_prev[:, :-1]  -> (B, T-k, H);\n"
         "x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h)], dim=-1))  (eq. 21);\n"
         "h_k = module.post_norm(module.block(x))  (eq. 22);  return h_k, head(h_k)  (eq. 23).",
    checker_name="check_mtp_depth",
)

# ---------------------------------------------------------------------------------------------------------------
# Notebook 32: the verify step of MTP drafts
# ---------------------------------------------------------------------------------------------------------------


def accept_draft(choice: list[int], draft: int, cache_length: int) -> tuple[list[int], int]:
    """The verify step of self-speculative greedy decoding with one MTP draft (V3 §2.2, §5.4.3).

    The main model ran one step of two tokens ``[nxt, draft]`` over its cache, which held ``cache_length``
    tokens before the step (so ``nxt`` sits at position ``cache_length``, the draft at ``cache_length + 1``).

    Args:
        choice: the main model's greedy tokens at those two positions: ``choice[0]`` follows ``nxt``,
            ``choice[1]`` follows the draft.
        draft: the MTP module's guess for the token after ``nxt``.
        cache_length: the cache length before the verify step.

    Returns:
        ``(new_tokens, keep)``: the tokens that are now final, and the cache length to keep (entries from
        ``keep`` on are forgotten).
    """
    if choice[0] == draft:  # the main model agrees: the draft and the token after it are both final
        return [draft, choice[1]], cache_length + 2
    return [choice[0]], cache_length + 1  # rejected: the main model's own token; forget the draft's entry


def _accept_with(choice, draft, cache_length, *, verify="choice[0]", bonus=True, keep_accept=2, keep_reject=1,
                 offset="cache_length"):
    base = {"cache_length": cache_length, "zero": 0}[offset]
    agree = {"choice[0]": choice[0] == draft, "choice[1]": choice[1] == draft, "always": True}[verify]
    if agree:
        return ([draft, choice[1]] if bonus else [draft]), base + keep_accept
    return [choice[0]], base + keep_reject


def _accept(**switch: Any) -> Callable[..., Any]:
    return lambda **kwargs: _accept_with(**kwargs, **switch)


def _accept_cases() -> list[Case]:
    return [
        Case("rejected: choice=[7, 3], draft=5, cache_length=11", dict(choice=[7, 3], draft=5, cache_length=11)),
        Case("accepted: choice=[5, 9], draft=5, cache_length=11", dict(choice=[5, 9], draft=5, cache_length=11)),
        Case("rejected, the draft equals the SECOND choice: choice=[4, 6], draft=6, cache_length=20",
             dict(choice=[4, 6], draft=6, cache_length=20)),
        Case("accepted, both choices equal: choice=[8, 8], draft=8, cache_length=3",
             dict(choice=[8, 8], draft=8, cache_length=3)),
    ]


check_accept_draft = Checker(
    name="accept_draft",
    nudge="which of the two choices was made at the position the draft claims? How many of the two new cache "
          "entries hold tokens that are final?",
    cases=_accept_cases,
    reference=accept_draft,
    mistakes=[
        Mistake("accepted without verifying", _accept(verify="always"),
                "the draft is kept without checking it: keep it only if it equals choice[0], the main model's own "
                "greedy token after nxt; otherwise the output is no longer greedy decoding's."),
        Mistake("verified against the wrong position", _accept(verify="choice[1]"),
                "the draft is compared with choice[1], the main model's token AFTER the draft (off by one "
                "position): the draft claims the position right after nxt, whose greedy token is choice[0]."),
        Mistake("bonus token dropped", _accept(bonus=False),
                "an accepted draft yields two final tokens: the draft and choice[1], the main model's token after "
                "it, computed in the same step (return [draft, choice[1]])."),
        Mistake("accepted: cache cropped one short", _accept(keep_accept=1),
                "after an accepted draft the cache must keep both new entries (nxt and the draft: cache_length + "
                "2); yours forgets the draft's, so the next step attends without it."),
        Mistake("rejected: draft's cache entry kept", _accept(keep_reject=2),
                "after a rejected draft the cache still holds the draft's entry (cache_length + 2): keep "
                "cache_length + 1 (nxt only), or the next step attends to a token that is not in the text."),
        Mistake("rejected: cache cropped one short", _accept(keep_reject=0),
                "after a rejected draft the cache must keep nxt's entry (cache_length + 1, off by one): yours "
                "also forgets nxt, which the text keeps."),
        Mistake("cache length restarted at zero", _accept(offset="zero"),
                "the kept length counts from 0, not from the cache_length before the step: the new entries sit "
                "at positions cache_length and cache_length + 1, after the tokens already cached."),
    ],
    hint="if choice[0] == draft: return [draft, choice[1]], cache_length + 2\n"
         "else: return [choice[0]], cache_length + 1",
    checker_name="check_accept_draft",
)
