"""Checker of notebook 45 (V4 at real scale): the cache one V4 attention layer keeps for a sequence.

The learner counts the elements (not bytes) one layer caches for ``context`` tokens; each known mistake is the
reference with one rule changed: the window growing with the context, the window forgotten in compressed layers,
one compressed entry per token, a partial block counted as an entry, indexer keys on every compressed layer or on
none. The contexts are not multiples of the compression rates and are longer than the window.
"""

from __future__ import annotations

from helpers.teaching.checks import Case, Checker, Mistake


def _elements_with(kind, context, head_dim, sliding_window, compress_rate, index_head_dim, *, window_grows=False,
                   window_in_compressed=True, per_token=False, ceil=False, index_on=("csa",)):
    window = (context if window_grows else min(context, sliding_window)) * head_dim
    if kind == "swa":
        return window
    entries = context if per_token else (-(-context // compress_rate) if ceil else context // compress_rate)
    total = (window if window_in_compressed else 0) + entries * head_dim
    return total + (entries * index_head_dim if kind in index_on else 0)


def v4_layer_cache_elements(kind: str, context: int, head_dim: int, sliding_window: int, compress_rate: int,
                            index_head_dim: int) -> int:
    """Elements one V4 layer caches for ``context`` tokens: the window's last ``n_win`` entries of ``c``; for
    ``"csa"``/``"hca"`` also one entry of ``c`` per full block of ``compress_rate`` tokens; ``"csa"`` also one
    indexer key of ``index_head_dim`` per compressed entry."""
    return _elements_with(kind, context, head_dim, sliding_window, compress_rate, index_head_dim)


def _cases() -> list[Case]:
    def case(kind, context, rate):
        return dict(kind=kind, context=context, head_dim=48, sliding_window=16, compress_rate=rate, index_head_dim=12)

    return [Case("a CSA layer, 1001 tokens, m=4, window 16, c=48, d_I=12", case("csa", 1001, 4)),
            Case("an HCA layer, 1001 tokens, m'=128, window 16, c=48", case("hca", 1001, 128)),
            Case("a sliding-window layer, 300 tokens, window 16, c=48", case("swa", 300, 4))]


def _mistake(**switch):
    return lambda kind, context, head_dim, sliding_window, compress_rate, index_head_dim: _elements_with(
        kind, context, head_dim, sliding_window, compress_rate, index_head_dim, **switch)


check_v4_layer_cache = Checker(
    name="v4_layer_cache_elements",
    checker_name="cost_checks.check_v4_layer_cache",
    nudge="three parts: the window (bounded), the compressed entries (one per full block), the indexer keys (CSA only).",
    cases=_cases,
    reference=v4_layer_cache_elements,
    mistakes=[
        Mistake("window grows", _mistake(window_grows=True),
                "the sliding window grew with the context: it keeps only the last sliding_window entries, "
                "min(context, sliding_window)"),
        Mistake("no window in compressed layers", _mistake(window_in_compressed=False),
                "the compressed layers lost their window: CSA and HCA layers keep the last sliding_window "
                "uncompressed entries too"),
        Mistake("one entry per token", _mistake(per_token=True),
                "one compressed entry per token: there is one per block of compress_rate tokens, context // m"),
        Mistake("partial block counted", _mistake(ceil=True),
                "a partial block was counted as an entry: the compressor emits an entry only once a block of "
                "compress_rate tokens is complete, context // compress_rate (floor)"),
        Mistake("indexer keys on HCA too", _mistake(index_on=("csa", "hca")),
                "indexer keys were counted in the HCA layer: only CSA has a lightning indexer (HCA attends to all "
                "of its few entries)"),
        Mistake("no indexer keys", _mistake(index_on=()),
                "the CSA layer's indexer keys are missing: one key of index_head_dim per compressed entry"),
    ],
    hint="window = min(context, sliding_window) * head_dim\n"
         "if kind == 'swa': return window\n"
         "entries = context // compress_rate\n"
         "return window + entries * head_dim + (entries * index_head_dim if kind == 'csa' else 0)",
)
