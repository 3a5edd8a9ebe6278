"""The MLA checkers pass the notebooks' solutions, reject the exercise stubs, and name each known mistake."""

import re

import pytest
from nbload import load_notebook

from helpers.mla.checks import check_absorbed_attention, check_compress_expand, check_split_rope
from helpers.teaching.checks import CheckFailure

NB21, NB22, NB23 = ("21_mla_low_rank_kv_compression.ipynb", "22_mla_decoupled_rope.ipynb",
                    "23_mla_weight_absorption.ipynb")


@pytest.fixture(scope="module")
def solutions():
    return {"compress_expand": load_notebook(NB21).compress_expand, "split_and_rope": load_notebook(NB22).split_and_rope}


@pytest.fixture(scope="module")
def stubs():
    return {"compress_expand": load_notebook(NB21, exercise=True).compress_expand,
            "split_and_rope": load_notebook(NB22, exercise=True).split_and_rope}


CHECKERS = {"compress_expand": check_compress_expand, "split_and_rope": check_split_rope}




@pytest.mark.parametrize("name", list(CHECKERS))
def test_solution_passes_and_stub_is_reported(name, solutions, stubs, capsys):
    assert CHECKERS[name](solutions[name]) is None  # passes: a tick, no exception
    assert f"✓ {name} passes" in capsys.readouterr().out
    with pytest.raises(CheckFailure, match="still the exercise stub"):
        CHECKERS[name](stubs[name])






# Each known mistake, made on purpose, must fail with its own message (a fragment of it is matched).
ALL_CHECKERS = {c.name: c for c in (check_compress_expand, check_split_rope, check_absorbed_attention)}
MISTAKE_MESSAGES = {
    "compress_expand": {
        "expanded K/V cached": "yours is the expanded keys/values",
        "no kv_norm": "missing its RMSNorm",
        "cached before kv_norm": r"\*before\* kv_norm",
        "W^UK and W^UV swapped": "keys and values are swapped",
    },
    "split_and_rope": {
        "RoPE on the nope part": "RoPE was applied to the content",
        "per-head k^R": "single RoPE key k\\^R per token",
        "halves instead of pairs": "with interleave=True the rotated pairs are",
        "pairs instead of halves": "with interleave=False the rotated pairs are halves",
        "transformers' de-interleaved output": "de-interleaved",
        "rotated backwards": "the wrong way",
        "k^R not rotated": "k_rope is returned unrotated",
    },
    "absorbed_attention": {
        "scale from the nope width": re.escape("too large by sqrt((qk_nope_head_dim + qk_rope_head_dim)"),
        "no scale": "not scaled",
        "RoPE score missing": "RoPE part of the score is missing",
        "W^UV transposed": "W\\^UV is transposed",
        "W^UK transposed": "W\\^UK is transposed",
        "W^UK and W^UV swapped": "absorbed on the wrong side",
        "W^UV not applied": "still in latent space",
        "causal offset ignored": "wrong causal offset during cached decode",
        "no causal mask": "no causal mask",
    },
}
MISTAKE_CASES = [(name, mistake) for name, checker in ALL_CHECKERS.items() for mistake in checker.mistakes]


@pytest.mark.parametrize("name,mistake", MISTAKE_CASES, ids=[f"{n}: {m.name}" for n, m in MISTAKE_CASES])
def test_each_known_mistake_gets_its_message(name, mistake):
    with pytest.raises(CheckFailure, match=MISTAKE_MESSAGES[name][mistake.name]):
        ALL_CHECKERS[name](mistake.fn)


def test_every_mistake_has_a_test():
    for name, checker in ALL_CHECKERS.items():
        assert sorted(m.name for m in checker.mistakes) == sorted(MISTAKE_MESSAGES[name])


def test_caching_expanded_kv_is_recognised_by_shape(solutions):
    """Any cache of expanded keys/values (here a tuple (k, v)) is named, not just the mistake function."""
    def caches_k_and_v(h, w_dkv, kv_norm, w_uk, w_uv):
        c_kv, k_nope, v = solutions["compress_expand"](h, w_dkv, kv_norm, w_uk, w_uv)
        return (k_nope, v), k_nope, v

    with pytest.raises(CheckFailure, match=r"expanded keys/values \(a tuple of \(2, 5, 4, 8\), \(2, 5, 4, 8\)\)"):
        check_compress_expand(caches_k_and_v)


def test_per_head_k_rope_of_any_form_is_recognised(solutions):
    def per_head_copy(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
        q_nope, q_rope, k = solutions["split_and_rope"](q, k_rope, cos, sin, qk_nope_head_dim, interleave)
        return q_nope, q_rope, k[:, :, None].repeat(1, 1, q.shape[2], 1) * 1.01  # not an exact match

    with pytest.raises(CheckFailure, match="k_rope has a head axis"):
        check_split_rope(per_head_copy)


def test_a_wrong_q_nope_is_explained(solutions):
    def rotated_content(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
        q_nope, q_rope, k = solutions["split_and_rope"](q, k_rope, cos, sin, qk_nope_head_dim, interleave)
        return 2 * q_nope, q_rope, k

    with pytest.raises(CheckFailure, match="q_nope is wrong"):
        check_split_rope(rotated_content)
