"""The checker of notebook 23's exercise (absorbed attention)."""

import pytest
import torch
from nbload import NOTEBOOKS, load_notebook

from helpers.mla import absorbed_attention
from helpers.mla.checks import check_absorbed_attention
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
