"""Property: random shapes and dtypes either work and match a reference, or raise ValueError/TypeError naming the
argument, never anything else (issue 12). Uses hypothesis with a fixed number of examples and no deadline."""

from __future__ import annotations

import pytest
import torch

from helpers.mla import MultiHeadLatentAttention
from helpers.moe import DeepSeekMoE, expert_load
from helpers.moe.bench import naive_moe

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

H = 8
DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool]
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)

torch.manual_seed(0)
MOE = DeepSeekMoE(H, 4, 6, 2, n_shared_experts=1).eval()
MLA = MultiHeadLatentAttention(hidden_size=H, n_heads=2, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
                               v_head_dim=2, q_lora_rank=6)


def tensors(width_choices):
    @st.composite
    def build(draw):
        rank = draw(st.integers(0, 4))
        lead = draw(st.lists(st.integers(0, 3), min_size=max(rank - 1, 0), max_size=max(rank - 1, 0)))
        shape = (*lead, draw(st.sampled_from(width_choices))) if rank else ()
        dtype = draw(st.sampled_from(DTYPES))
        x = torch.randn(shape) * 2 if dtype.is_floating_point else torch.randint(0, 2, shape)
        return x.to(dtype)
    return build()


@PROPERTY
@given(tensors([H, H, 3, 2 * H]))
def test_moe_random_inputs_work_or_name_the_argument(u):
    valid = u.dim() >= 2 and u.shape[-1] == H and u.dtype == torch.float32
    if not valid:
        with pytest.raises((ValueError, TypeError)) as info:
            MOE(u)
        assert str(info.value).startswith("u ") or str(info.value).startswith("u's "), str(info.value)
        return
    with torch.no_grad():
        out = MOE(u)
        assert out.shape == u.shape
        if u.numel():  # the literal per-token reference cannot stack zero tokens
            torch.testing.assert_close(out, naive_moe(MOE, u), atol=1e-5, rtol=1e-4)


@PROPERTY
@given(tensors([H, H, 5]), st.sampled_from([None, True, False]))
def test_mla_random_inputs_work_or_name_the_argument(x, absorb):
    valid = x.dim() == 3 and x.shape[-1] == H and x.dtype == torch.float32
    if not valid:
        with pytest.raises((ValueError, TypeError)) as info:
            MLA(x, absorb=absorb)
        assert str(info.value).startswith(("x ", "x's ")), str(info.value)
        return
    with torch.no_grad():
        out = MLA(x, absorb=absorb)
        assert out.shape == x.shape
        torch.testing.assert_close(out, MLA(x, absorb=not absorb), atol=1e-5, rtol=1e-4)  # naive == absorbed
        if x.shape[0] > 1:  # every sequence of the batch is independent
            torch.testing.assert_close(out[1:2], MLA(x[1:2], absorb=absorb), atol=1e-5, rtol=1e-4)


@PROPERTY
@given(st.lists(st.integers(-2, 8), max_size=12), st.integers(1, 3), st.integers(-1, 8),
       st.sampled_from([torch.int64, torch.int32, torch.float32]))
def test_expert_load_random_tables(ids, k, n_experts, dtype):
    table = torch.tensor(ids[: len(ids) // k * k], dtype=dtype).view(-1, k)
    valid = (n_experts > 0 and not dtype.is_floating_point
             and all(0 <= i < n_experts for i in table.flatten().tolist()))
    if not valid:
        with pytest.raises((ValueError, TypeError)) as info:
            expert_load(table, n_experts)
        assert str(info.value).startswith(("indices ", "n_experts ")), str(info.value)
        return
    want = torch.zeros(n_experts)
    for i in table.flatten().tolist():
        want[i] += 1
    assert torch.equal(expert_load(table, n_experts), want)
