"""Checker of notebook 14's exercise: the all-to-all's send counts, from the routing alone.

(Not to be confused with :mod:`helpers.parallel.check`, which compares the distributed layer with one process.)

The learner writes ``send_counts(indices, n_experts, n_ranks, once_per_rank)``: for the ``(T, k)`` experts the
tokens of one rank chose, how many rows that rank sends to every rank ``0 .. N-1`` (itself included) in the
contiguous layout (rank ``r`` holds experts ``r E/N .. (r+1) E/N - 1``,
:meth:`~helpers.parallel.layout.ExpertLayout.contiguous`), counting a token once per chosen *expert* (our
dispatch: one row per (token, expert) pair) or once per destination *rank* (a dispatch that sends a token to a
rank once and lets the rank's experts share it; V3 §3.2.2 does the same per node).

The known mistakes are one switch of :func:`_counts_with` each: where an expert lives (round-robin ``e % N``,
``e // N``, the first expert of each rank given to the rank before), what is counted (the flag ignored either
way, ranks deduplicated over the whole batch instead of per token, counts per expert), and the length of the
result (a rank that receives nothing dropped from the end). When none matches, :func:`_describe` says which
ranks' counts differ and what the totals are, without guessing a cause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from helpers.teaching.checks import Case, Checker, Mistake


def send_counts(indices: Tensor, n_experts: int, n_ranks: int, once_per_rank: bool) -> Tensor:
    """(N,) rows the rank sends to every rank: one per (token, expert) pair, or one per (token, rank).

    Args:
        indices: (T, k) the experts chosen by the tokens of this rank.
        n_experts: E; the contiguous layout gives rank ``r`` the experts ``[r E/N, (r+1) E/N)``.
        n_ranks: N.
        once_per_rank: count a token once per destination rank instead of once per chosen expert.
    """
    return _counts_with(indices, n_experts, n_ranks, once_per_rank)


def _counts_with(indices: Tensor, n_experts: int, n_ranks: int, once_per_rank: bool, *, rank_of: str = "block",
                 flag: str = "as given", dedup: str = "token", trim: bool = False, per_expert: bool = False) -> Tensor:
    """The send counts with switches, each of which makes one known mistake."""
    if per_expert:
        return torch.bincount(indices.reshape(-1), minlength=n_experts)
    per = n_experts // n_ranks  # experts per rank
    rank = {"block": indices // per, "mod": indices % n_ranks, "div ranks": indices // n_ranks,
            "boundary": (indices - 1).clamp(min=0) // per}[rank_of]  # (T, k) destination rank of every pair
    once = {"as given": once_per_rank, "always pairs": False, "always ranks": True}[flag]
    if not once:
        counts = torch.bincount(rank.reshape(-1), minlength=n_ranks)
    elif dedup == "token":
        hit = torch.zeros(len(indices), n_ranks, dtype=torch.bool).scatter_(1, rank, True)  # (T, N)
        counts = hit.sum(0)
    else:  # "batch": a rank counted once if any token goes there
        counts = torch.bincount(rank.reshape(-1), minlength=n_ranks).clamp(max=1)
    if trim:  # torch.bincount without minlength: trailing ranks that receive nothing are missing
        counts = counts[: int(counts.nonzero().max()) + 1]
    return counts


def _with(**switch: Any) -> Callable[..., Tensor]:
    return lambda indices, n_experts, n_ranks, once_per_rank: _counts_with(indices, n_experts, n_ranks,
                                                                            once_per_rank, **switch)


def _routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator, unused: tuple[int, ...] = ()) -> Tensor:
    scores = torch.rand(n_tokens, n_experts, generator=gen)  # (T, E)
    scores[:, list(unused)] = -1.0
    return scores.topk(top_k, dim=-1).indices  # (T, k) distinct experts per token


def _cases() -> list[Case]:
    gen = torch.Generator().manual_seed(14)
    return [  # E/N differs from N in every case (e // N would pass where E = N^2)
        Case("7 tokens, top-5 of 12 experts on 3 ranks (4 per rank), once per expert",
             dict(indices=_routing(7, 12, 5, gen), n_experts=12, n_ranks=3, once_per_rank=False)),
        Case("9 tokens, top-4 of 10 experts on 5 ranks (2 per rank), once per rank",
             dict(indices=_routing(9, 10, 4, gen), n_experts=10, n_ranks=5, once_per_rank=True)),
        Case("6 tokens, top-2 of 18 experts on 3 ranks (6 per rank; nobody picks rank 2's experts 12-17), "
             "once per expert", dict(indices=_routing(6, 18, 2, gen, unused=tuple(range(12, 18))), n_experts=18,
                                     n_ranks=3, once_per_rank=False)),
        Case("11 tokens, top-5 of 8 experts on 2 ranks (4 per rank), once per rank",
             dict(indices=_routing(11, 8, 5, gen), n_experts=8, n_ranks=2, once_per_rank=True)),
    ]


def _describe(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    """Which ranks' counts differ, and the totals: a description, not a cause."""
    indices = kwargs["indices"]
    wrong = (got != want).nonzero().flatten().tolist()
    ranks = ", ".join(f"rank {r}: {int(got[r])} instead of {int(want[r])}" for r in wrong)
    what = "distinct (token, rank) pairs" if kwargs["once_per_rank"] else f"(token, expert) pairs, T*k = {indices.numel()}"
    return (f"the counts differ for {ranks}; yours add up to {int(got.sum())}, the expected ones to "
            f"{int(want.sum())} (the number of {what})")


check_send_counts = Checker(
    name="send_counts",
    checker_name="checks.check_send_counts",
    nudge="find each pair's destination rank from its expert id, then count rows per rank: every pair, or every "
          "distinct (token, rank) when once_per_rank is set; return one count for every rank.",
    cases=_cases,
    reference=send_counts,
    mistakes=[
        Mistake("round-robin layout", _with(rank_of="mod"),
                "expert e was sent to rank e % n_ranks (experts dealt out round-robin); in the contiguous layout "
                "rank r holds the block of experts r*E/N .. (r+1)*E/N - 1, so expert e lives on rank e // (E/N)"),
        Mistake("divided by the number of ranks", _with(rank_of="div ranks"),
                "expert e was sent to rank e // n_ranks; the blocks are E/N experts long, so the rank is "
                "e // (n_experts // n_ranks) (the two agree only when E = N^2)"),
        Mistake("block boundary off by one", _with(rank_of="boundary"),
                "the first expert of each rank (expert r*E/N) was sent to rank r - 1: the block of rank r starts "
                "at expert r*E/N inclusive (e // (E/N); with torch.bucketize, right=True)"),
        Mistake("once_per_rank ignored (every pair counted)", _with(flag="always pairs"),
                "with once_per_rank=True a token that chose several experts on one rank is sent there once: count "
                "the distinct destination ranks of each token, not its (token, expert) pairs"),
        Mistake("always once per rank", _with(flag="always ranks"),
                "with once_per_rank=False every (token, expert) pair is a row (our dispatch sends one per pair): "
                "a token with two experts on one rank sends it two rows"),
        Mistake("deduplicated over the batch", _with(dedup="batch"),
                "each rank was counted at most once for the whole batch; deduplicate per token: a rank receives "
                "one row from every token that chose at least one of its experts"),
        Mistake("counted per expert", _with(per_expert=True),
                "these are counts per expert (the expert load, E numbers); the all-to-all needs one count per "
                "destination rank (N numbers): map each expert to its rank first"),
        Mistake("ranks that receive nothing dropped", _with(trim=True),
                "a rank that receives no rows is missing from the end of your counts: torch.bincount needs "
                "minlength=n_ranks, so every rank has a count (0 included) at its own position"),
    ],
    diagnose=_describe,
    hint="rank = indices // (n_experts // n_ranks)  (T, k) the destination rank of every pair\n"
         "once per expert: torch.bincount(rank.reshape(-1), minlength=n_ranks)\n"
         "once per rank:   hit = torch.zeros(T, n_ranks, dtype=torch.bool).scatter_(1, rank, True)  (T, N)\n"
         "                 hit.sum(0)  tokens that send to each rank at least one row",
)
