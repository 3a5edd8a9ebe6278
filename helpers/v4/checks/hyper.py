"""Checkers of notebook 40 (mHC): Sinkhorn-Knopp and the hyper-connection update.

Each known mistake is the reference with one step changed (``_sinkhorn_with``, ``_update_with``): the axis
normalised first, only one axis normalised, the loop count, ending on the rows; ``B_l`` used untransposed, the post
map on the wrong tensor, the residual streams or the block output dropped. Inputs are seeded and every size in a
case differs (streams, width, tokens), so an axis mix-up cannot go unnoticed; matrices are not symmetric.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.teaching.checks import Case, Checker, Mistake
from helpers.v4.hyper import sinkhorn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sinkhorn_cases() -> list[Case]:
    gen = _gen(40)
    return [  # few iterations and peaked logits: every step leaves a visible trace
        Case("2 matrices of 4x4, 3 iterations", dict(logits=3 * torch.randn(2, 4, 4, generator=gen), iters=3, eps=1e-6)),
        Case("one 3x3 matrix, 1 iteration", dict(logits=2 * torch.randn(3, 3, generator=gen), iters=1, eps=1e-6)),
        Case("5 matrices of 6x6, 2 iterations", dict(logits=4 * torch.randn(5, 6, 6, generator=gen), iters=2, eps=1e-6)),
    ]


def _sinkhorn_with(logits: Tensor, iters: int, eps: float, *, first: int = -1, axes: str = "both",
                   extra: int = 0, end_on_rows: bool = False) -> Tensor:
    """Sinkhorn with switches: ``first`` the softmax's axis, ``axes`` which axes the loop normalises, ``extra``
    more loop turns, ``end_on_rows`` a last row normalisation."""
    second = -2 if first == -1 else -1
    m = logits.softmax(dim=first) + eps
    if axes != "first only":
        m = m / (m.sum(dim=second, keepdim=True) + eps)
    for _ in range(iters - 1 + extra):
        if axes == "both":
            m = m / (m.sum(dim=first, keepdim=True) + eps)
        if axes != "first only":
            m = m / (m.sum(dim=second, keepdim=True) + eps)
    if end_on_rows:
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


def _sinkhorn_mistake(**switch):
    return lambda logits, iters, eps: _sinkhorn_with(logits, iters, eps, **switch)


check_sinkhorn = Checker(
    name="sinkhorn",
    checker_name="hyper_checks.check_sinkhorn",
    nudge="a softmax over each row first; then divide by column sums, and (iters - 1) more times by row sums, "
          "then by column sums.",
    cases=_sinkhorn_cases,
    reference=sinkhorn,
    mistakes=[
        Mistake("columns first", _sinkhorn_mistake(first=-2),
                "the softmax ran over the columns (dim=-2) and the loop started on the rows: V4 takes the softmax "
                "over each row (dim=-1), then normalises the columns; Sinkhorn's result depends on which axis "
                "goes first when it stops after a few iterations"),
        Mistake("rows only", _sinkhorn_mistake(axes="first only"),
                "only the rows were normalised (the softmax and nothing after it): the columns do not sum to 1, so "
                "the matrix is not doubly stochastic; divide by the column sums (dim=-2) after each row step"),
        Mistake("columns only in the loop", _sinkhorn_mistake(axes="second only"),
                "the loop normalises only the columns: after the first column step, dividing by the column sums "
                "again changes nothing, so the rows stay off 1; alternate rows (dim=-1) and columns (dim=-2)"),
        Mistake("one turn too many", _sinkhorn_mistake(extra=1),
                "one loop turn too many: the softmax counts as the first row normalisation, so after the first "
                "column step the loop runs iters - 1 times, not iters"),
        Mistake("ends on the rows", _sinkhorn_mistake(end_on_rows=True),
                "an extra row normalisation at the end: V4 ends on the columns (each turn is rows, then columns)"),
    ],
    hint="m = logits.softmax(dim=-1) + eps                      # rows sum to 1\n"
         "m = m / (m.sum(dim=-2, keepdim=True) + eps)           # columns\n"
         "for _ in range(iters - 1):\n"
         "    m = m / (m.sum(dim=-1, keepdim=True) + eps)       # rows\n"
         "    m = m / (m.sum(dim=-2, keepdim=True) + eps)       # columns\n"
         "return m",
)


def hc_update(streams: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """``X_{l+1} = B_l X_l + C_l F_l`` with ``transformers``' ``comb = B_l^T``: ``post * out + comb^T @ streams``."""
    return post.unsqueeze(-1) * out.unsqueeze(-2) + comb.transpose(-1, -2) @ streams


def _update_cases() -> list[Case]:
    gen = _gen(41)

    def case(b: int, t: int, n: int, d: int) -> dict[str, Tensor]:
        comb = torch.randn(b, t, n, n, generator=gen).softmax(dim=-1)  # rows sum to 1, columns do not
        return dict(streams=torch.randn(b, t, n, d, generator=gen), out=torch.randn(b, t, d, generator=gen),
                    post=2 * torch.rand(b, t, n, generator=gen), comb=comb)

    return [Case("batch 2, 3 tokens, 4 streams of width 5", case(2, 3, 4, 5)),
            Case("batch 1, 5 tokens, 3 streams of width 7", case(1, 5, 3, 7))]


def _update_with(streams, out, post, comb, *, transpose=True, post_on="out", residual=True, block=True):
    mix = (comb.transpose(-1, -2) if transpose else comb) @ streams  # (B, T, n, d)
    if post_on == "streams":
        return out.unsqueeze(-2) + post.unsqueeze(-1) * mix
    new = (post.unsqueeze(-1) * out.unsqueeze(-2)) if block else torch.zeros_like(mix)
    return new + mix if residual else new


def _update_mistake(**switch):
    return lambda streams, out, post, comb: _update_with(streams, out, post, comb, **switch)


check_hc_update = Checker(
    name="hc_update",
    checker_name="hyper_checks.check_hc_update",
    nudge="two terms per stream k: the block output weighted by post[k], and the streams mixed by the residual "
          "map; mind which index of comb runs over the input streams.",
    cases=_update_cases,
    reference=hc_update,
    mistakes=[
        Mistake("comb untransposed", _update_mistake(transpose=False),
                "comb was used untransposed: transformers' comb[j, k] is how much of input stream j goes to output "
                "stream k, so the mix sums over its first index, comb.transpose(-1, -2) @ streams (B_l = comb^T); "
                "Sinkhorn's matrix is not symmetric, so the direction matters"),
        Mistake("post on the streams", _update_mistake(post_on="streams"),
                "post weighted the mixed streams and the block output was added to every stream as it is: post "
                "(C_l) spreads the block output, post[..., :, None] * out[..., None, :]"),
        Mistake("no residual streams", _update_mistake(residual=False),
                "the residual term B_l X_l is missing: add comb^T @ streams"),
        Mistake("no block output", _update_mistake(block=False),
                "the block's output is missing: add post[..., :, None] * out[..., None, :] to the mixed streams"),
    ],
    hint="mixed = comb.transpose(-1, -2) @ streams            # (B, T, n, d): B_l X_l\n"
         "return post.unsqueeze(-1) * out.unsqueeze(-2) + mixed  # + C_l F_l(A_l X_l)",
)
