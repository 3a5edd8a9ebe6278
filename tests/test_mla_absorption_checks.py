"""The checker of notebook 23's exercise (absorbed attention)."""

import pytest
import torch
from nbload import NOTEBOOKS, load_notebook

from helpers.mla import absorbed_attention
from helpers.mla.checks import check_absorbed_attention
from helpers.mla.checks.absorption import _attention_cases
from helpers.teaching.checks import CheckFailure

NB23 = "23_mla_weight_absorption.ipynb"


def learner_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
    """A correct absorbed attention, written independently of helpers.mla (a learner's solution)."""
    t, s = q_nope.shape[1], c_kv.shape[1]
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # W^UK absorbed into the query
    scores = (torch.einsum("bthc,bsc->bths", q_latent, c_kv)
              + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * softmax_scale  # (B, T, H, S)
    future = torch.arange(s)[None, :] > (start_pos + torch.arange(t))[:, None]  # (T, S)
    p = scores.masked_fill(future[None, :, None], float("-inf")).softmax(-1)
    return torch.einsum("bthc,hdc->bthd", torch.einsum("bths,bsc->bthc", p, c_kv), w_uv)


def test_absorbed_attention_passes_correct_solutions_and_rejects_a_stub():
    assert check_absorbed_attention(learner_absorbed_attention) is None  # passes: a tick, no exception
    assert check_absorbed_attention(absorbed_attention) is None  # passes: a tick, no exception

    def stub(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
        raise NotImplementedError("Exercise: absorb W^UK into the query")

    with pytest.raises(CheckFailure, match="still the exercise stub"):
        check_absorbed_attention(stub)


@pytest.mark.skipif(not (NOTEBOOKS / NB23).exists(), reason="notebook 23 is not written yet")
def test_notebook_23_solution_passes_and_its_stub_is_reported():
    assert check_absorbed_attention(load_notebook(NB23).absorbed_attention) is None  # passes: a tick, no exception
    with pytest.raises(CheckFailure, match="still the exercise stub"):
        check_absorbed_attention(load_notebook(NB23, exercise=True).absorbed_attention)


def test_every_known_mistake_gets_its_own_message():
    """audit(): each one-step mistake, run as the learner's function, is named by its own message."""
    audit = check_absorbed_attention.audit()
    assert len(check_absorbed_attention.mistakes) >= 6
    for mistake in check_absorbed_attention.mistakes:
        assert audit[mistake.name] is not None, f"{mistake.name} passes the checker"
        assert mistake.message in audit[mistake.name], f"{mistake.name} got another message: {audit[mistake.name]}"
    messages = [m.message for m in check_absorbed_attention.mistakes]
    assert len(set(messages)) == len(messages)


def test_mistakes_cover_scale_score_weights_mask_and_softmax_axis():
    names = {m.name for m in check_absorbed_attention.mistakes}
    assert {"scale from the nope width", "scale from the latent width", "no scale", "RoPE score not scaled",
            "RoPE score missing", "W^UK transposed", "W^UV transposed", "W^UK and W^UV swapped",
            "W^UV not applied", "causal offset ignored", "no causal mask", "mask off by one",
            "mask after the softmax", "softmax over the heads", "softmax over the queries"} <= names


def test_case_sizes_differ_so_mistakes_cannot_coincide():
    for case in _attention_cases()[:2]:  # the last case is square on purpose (transposes run silently there)
        kw = case.kwargs
        b, t, h, d_h = kw["q_nope"].shape
        sizes = [b, t, kw["c_kv"].shape[1], h, d_h, kw["q_rope"].shape[-1], kw["w_uv"].shape[1], kw["c_kv"].shape[-1]]
        assert len(set(sizes[2:])) == len(sizes[2:]), case.description
        assert d_h + kw["q_rope"].shape[-1] != kw["c_kv"].shape[-1]  # the latent-width scale differs from the right one


def test_an_unknown_mistake_is_described_by_query_position_and_head_without_a_cause():
    def one_head_off(**kw):
        o = absorbed_attention(**kw)
        o[:, :, 1] = o[:, :, 1] * 1.5
        return o

    with pytest.raises(CheckFailure, match=r"differs at query positions t = \[0\] of 1 \(absolute positions \[6\]\), "
                                           r"heads \[1\] of 3") as failure:
        check_absorbed_attention(one_head_off)
    assert "other positions and heads match" in str(failure.value)
    for known in check_absorbed_attention.mistakes:
        assert known.message not in str(failure.value)


def test_nan_rows_are_reported_by_query_position():
    def last_query_sees_nothing(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos):
        o = absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, softmax_scale, start_pos)
        o[:, -1] = float("nan")  # as if every key of the last query were masked
        return o

    with pytest.raises(CheckFailure, match=r"NaN in the output at query positions t = \[0\] \(absolute \[6\]\)"):
        check_absorbed_attention(last_query_sees_nothing)


def test_the_nudge_gives_no_code_and_the_full_hint_is_on_request(capsys):
    assert "einsum" not in check_absorbed_attention.nudge and "(" not in check_absorbed_attention.nudge.split("?")[0]
    check_absorbed_attention.show_hint()
    printed = capsys.readouterr().out
    assert "bthd,hdc->bthc" in printed and "start_pos + t" in printed
    with pytest.raises(CheckFailure, match=r"check_absorbed_attention.show_hint\(\)"):
        check_absorbed_attention(lambda **kw: (_ for _ in ()).throw(NotImplementedError()))
