"""The MLA checkers of notebooks 20-22 pass the notebooks' solutions, reject the exercise stubs, and name
every known mistake with its own message (``audit()``); unknown errors are described, not guessed."""

import pytest
import torch
from nbload import load_notebook

from helpers.mla import MultiHeadLatentAttention
from helpers.mla.checks import (
    check_cached_mla,
    check_causal_attention,
    check_compress_expand,
    check_split_rope,
)
from helpers.mla.checks.cached import mla_with
from helpers.teaching.checks import CheckFailure

NB20, NB21, NB22 = ("20_mla_mha_kv_cache.ipynb", "21_mla_low_rank_kv_compression.ipynb",
                    "22_mla_decoupled_rope.ipynb")
FUNCTIONS = {"causal_attention": (NB20, check_causal_attention), "compress_expand": (NB21, check_compress_expand),
             "split_and_rope": (NB22, check_split_rope)}
CHECKERS = [check_causal_attention, check_compress_expand, check_split_rope, check_cached_mla]


@pytest.fixture(scope="module")
def solutions():
    return {name: getattr(load_notebook(nb), name) for name, (nb, _) in FUNCTIONS.items()}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_solution_passes_and_stub_is_reported(name, solutions, capsys):
    nb, checker = FUNCTIONS[name]
    assert checker(solutions[name]) is None  # passes: a tick, no exception, nothing returned
    assert f"✓ {name} passes" in capsys.readouterr().out
    stub = getattr(load_notebook(nb, exercise=True), name)
    with pytest.raises(CheckFailure, match="still the exercise stub") as failure:
        checker(stub)
    assert "show_hint()" in str(failure.value)  # the full hint is offered, not shown


@pytest.mark.parametrize("checker", CHECKERS, ids=lambda c: c.name)
def test_every_mistake_gets_its_own_message(checker):
    assert len(checker.mistakes) >= 6
    audit = checker.audit()
    for mistake in checker.mistakes:
        message = audit[mistake.name]
        assert message is not None, f"{mistake.name} passes the checker"
        assert mistake.message in message, f"{mistake.name} got another message: {message}"
        others = [m.message for m in checker.mistakes if m is not mistake]
        assert not any(other in message for other in others), f"{mistake.name} also matches another mistake"


@pytest.mark.parametrize("checker", CHECKERS, ids=lambda c: c.name)
def test_full_hint_on_request(checker, capsys):
    checker.show_hint()
    out = capsys.readouterr().out
    assert checker.hint and checker.hint in out


# ------------------------------------------------------------------ unknown mistakes are described


def test_causal_attention_unknown_error_names_heads_and_positions():
    def one_head_wrong(q, k, v, start_pos=0):
        out = check_causal_attention.reference(q, k, v, start_pos)
        out[:, 4, -1] += 0.5  # head 4, last query of the chunk
        return out

    with pytest.raises(CheckFailure, match=r"head\(s\) \[4\] of 6 and query token\(s\) at position\(s\) \[6\]"):
        check_causal_attention(one_head_wrong)


def test_causal_attention_nan_rows_are_reported():
    def first_row_all_masked(q, k, v, start_pos=0):
        out = check_causal_attention.reference(q, k, v, start_pos)
        out[:, :, 0] = float("nan")
        return out

    with pytest.raises(CheckFailure, match=r"NaN for the query token\(s\) at position\(s\) \[4\]"):
        check_causal_attention(first_row_all_masked)


def test_transposed_weight_that_raises_is_named_from_the_case_where_it_runs(solutions):
    def uk_transposed(h, w_dkv, kv_norm, w_uk, w_uv):
        c_kv = kv_norm(h @ w_dkv.T)
        return c_kv, torch.einsum("btc,hcd->bthd", c_kv, w_uk), torch.einsum("btc,hdc->bthd", c_kv, w_uv)

    with pytest.raises(CheckFailure, match=r"(?s)it raised RuntimeError.*W\^UK is used transposed"):
        check_compress_expand(uk_transposed)


def test_caching_expanded_kv_is_recognised_by_shape(solutions):
    """Any cache of expanded keys/values (here a tuple (k, v)) is named, not just the mistake function."""
    def caches_k_and_v(h, w_dkv, kv_norm, w_uk, w_uv):
        c_kv, k_nope, v = solutions["compress_expand"](h, w_dkv, kv_norm, w_uk, w_uv)
        return (k_nope, v), k_nope, v

    with pytest.raises(CheckFailure, match=r"expanded keys/values \(a tuple of \(2, 5, 3, 6\), \(2, 5, 3, 9\)\)"):
        check_compress_expand(caches_k_and_v)


def test_per_head_k_rope_of_any_form_is_recognised(solutions):
    def per_head_copy(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
        q_nope, q_rope, k = solutions["split_and_rope"](q, k_rope, cos, sin, qk_nope_head_dim, interleave)
        return q_nope, q_rope, k[:, :, None].repeat(1, 1, q.shape[2], 1) * 1.01  # not an exact match

    with pytest.raises(CheckFailure, match="k_rope has a head axis"):
        check_split_rope(per_head_copy)


def test_a_wrong_q_nope_is_explained(solutions):
    def scaled_content(q, k_rope, cos, sin, qk_nope_head_dim, interleave=True):
        q_nope, q_rope, k = solutions["split_and_rope"](q, k_rope, cos, sin, qk_nope_head_dim, interleave)
        return 2 * q_nope, q_rope, k

    with pytest.raises(CheckFailure, match="q_nope is wrong"):
        check_split_rope(scaled_content)


# ------------------------------------------------------------------ the cached layer checker


def test_cached_checker_passes_the_notebook_layer_and_the_helpers_layer(capsys):
    check_cached_mla(load_notebook(NB22).MLA)
    check_cached_mla(MultiHeadLatentAttention)
    assert capsys.readouterr().out.count("✓ cached MLA layer") == 2


def test_cached_checker_reports_the_stub():
    with pytest.raises(CheckFailure, match="exercise stub"):
        check_cached_mla(load_notebook(NB22, exercise=True).MLA)


def test_cached_checker_describes_an_unknown_decode_error_without_guessing():
    class LastStepScaled(MultiHeadLatentAttention):
        def forward(self, x, cache=None):
            out = mla_with(self, x, cache)
            return out * 1.5 if cache is not None and cache.length == 8 else out  # decode step 4 only

    with pytest.raises(CheckFailure) as failure:
        check_cached_mla(LastStepScaled)
    message = str(failure.value)
    assert "decode step 3 (the token at position 7" in message
    assert "The cache holds the right c^KV and k^R for every position" in message
    assert not any(m.message in message for m in check_cached_mla.mistakes)


def test_cached_checker_reports_a_wrong_full_pass_as_such():
    class WrongScale(MultiHeadLatentAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.softmax_scale = self.qk_nope_head_dim ** -0.5

    with pytest.raises(CheckFailure, match="without a cache your layer already differs"):
        check_cached_mla(WrongScale)
