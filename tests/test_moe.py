"""helpers.moe: routing, dispatch, balancing statistics and losses, gradients, config errors."""

import pytest
import torch
import torch.nn.functional as F

from helpers.moe import (
    DeepSeekMoE,
    SwiGLU,
    affinity,
    dispatch,
    expert_parallel,
    gating_weights,
    max_violation,
    route,
    select_experts,
    sort_by_expert,
    split_experts,
)


def loop_moe(x, weights, indices, w_gate_up, w_down):
    """The definition, one token and one chosen expert at a time (V3 eq. 12, routed part)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for g, e in zip(weights[t], indices[t]):
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            out[t] += g * (w_down[e] @ (F.silu(gate) * up))
    return out


def test_swiglu_shapes_and_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 16)
    u = torch.randn(2, 3, 8)
    want = ffn.w_down.weight @ (F.silu(ffn.w_gate.weight @ u[1, 2]) * (ffn.w_up.weight @ u[1, 2]))
    torch.testing.assert_close(ffn(u)[1, 2], want)


def test_affinity():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    torch.testing.assert_close(affinity(logits, "softmax").sum(), torch.tensor(1.0))
    torch.testing.assert_close(affinity(logits, "sigmoid"), torch.sigmoid(logits))
    assert affinity(logits.half(), "sigmoid").dtype == torch.float32  # routed in fp32
    with pytest.raises(ValueError, match="scoring_func"):
        affinity(logits, "relu")


def test_select_experts_group_limited_by_hand():
    # 8 experts in 4 groups of 2. Group scores (top-2 sum): 0.9+0.0, 0.5+0.5, 0.8+0.1, 0.3+0.2
    s = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.8, 0.1, 0.3, 0.2]])
    # top2_sum keeps groups 1 (1.0) and 2 (0.9): experts {2, 3, 4, 5}; top-2 of those is {4, 2 or 3}
    got = set(select_experts(s, 2, n_group=4, topk_group=2, group_score="top2_sum")[0].tolist())
    assert 4 in got and got <= {2, 3, 4, 5} and 0 not in got
    # max keeps groups 0 (0.9) and 2 (0.8): experts {0, 1, 4, 5}; top-2 is {0, 4}
    assert set(select_experts(s, 2, n_group=4, topk_group=2, group_score="max")[0].tolist()) == {0, 4}
    # no groups: plain top-2
    assert set(select_experts(s, 2)[0].tolist()) == {0, 4}


def test_gating_weights_normalise_then_scale():
    s = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    idx = torch.tensor([[1, 2]])
    torch.testing.assert_close(gating_weights(s, idx, False, 2.0), torch.tensor([[1.2, 0.4]]))
    torch.testing.assert_close(gating_weights(s, idx, True, 2.0), torch.tensor([[1.5, 0.5]]))


def test_bias_changes_the_choice_not_the_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, idx = route(logits, scoring_func="sigmoid", top_k=1, norm_topk_prob=False)
    assert idx.item() == 0
    w, idx = route(logits, scoring_func="sigmoid", top_k=1, norm_topk_prob=False,
                   bias=torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert idx.item() == 3
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-1.0]])))  # s_3, not s_3 + b_3


def test_dispatch_equals_the_loop():
    torch.manual_seed(0)
    n_tokens, hidden, inter, n_experts, top_k = 13, 8, 4, 6, 3
    x = torch.randn(n_tokens, hidden)
    w_gate_up, w_down = torch.randn(n_experts, 2 * inter, hidden), torch.randn(n_experts, hidden, inter)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    indices[indices == 5] = 4  # expert 5 gets no token; expert 4 may appear twice in a row: both count
    weights = torch.rand(n_tokens, top_k)
    torch.testing.assert_close(dispatch(x, weights, indices, w_gate_up, w_down),
                               loop_moe(x, weights, indices, w_gate_up, w_down))


def dispatch_inputs(dtype=torch.float32, n_tokens=13, hidden=8, inter=4, n_experts=6, top_k=3):
    torch.manual_seed(0)
    x = torch.randn(n_tokens, hidden, dtype=dtype)
    w_gate_up = torch.randn(n_experts, 2 * inter, hidden, dtype=dtype)
    w_down = torch.randn(n_experts, hidden, inter, dtype=dtype)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    indices[indices == 1] = 0  # expert 1 gets no token
    return x, torch.rand(n_tokens, top_k, dtype=dtype), indices, w_gate_up, w_down


@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_dispatch_is_the_same_for_any_number_of_workers(n_workers):
    x, weights, indices, w_gate_up, w_down = dispatch_inputs()
    torch.testing.assert_close(dispatch(x, weights, indices, w_gate_up, w_down, n_workers=n_workers),
                               loop_moe(x, weights, indices, w_gate_up, w_down))


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_dispatch_backward_gradcheck_float64(n_workers):
    x, weights, indices, w_gate_up, w_down = (t.requires_grad_() if t.is_floating_point() else t
                                              for t in dispatch_inputs(torch.float64, n_tokens=7, hidden=5, inter=3))
    assert torch.autograd.gradcheck(lambda *t: dispatch(t[0], t[1], indices, t[2], t[3], n_workers=n_workers),
                                    (x, weights, w_gate_up, w_down))


def test_dispatch_backward_for_a_subset_of_inputs():
    x, weights, indices, w_gate_up, w_down = dispatch_inputs(torch.float64, n_tokens=7, hidden=5, inter=3)
    w_down.requires_grad_()
    dispatch(x, weights, indices, w_gate_up, w_down, n_workers=2).sum().backward()
    expected = torch.func.grad(lambda w: loop_moe(x, weights, indices, w_gate_up, w).sum())(w_down.detach())
    torch.testing.assert_close(w_down.grad, expected)
    assert x.grad is None and w_gate_up.grad is None and weights.grad is None


@pytest.mark.parametrize("n_workers", [0, -1])
def test_dispatch_without_workers_is_an_error(n_workers):
    with pytest.raises(ValueError, match="n_workers"):
        dispatch(*dispatch_inputs(), n_workers=n_workers)


def test_dispatch_rejects_mismatched_routing_tables():
    x, weights, indices, w_gate_up, w_down = dispatch_inputs()
    with pytest.raises(ValueError, match="weights .* and indices .* must both be"):
        dispatch(x, weights[:, :2], indices, w_gate_up, w_down)
    with pytest.raises(ValueError, match="rows of u"):
        dispatch(x[:5], weights, indices, w_gate_up, w_down)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 6\), got 9"):
        dispatch(x, weights, indices.index_fill(1, torch.tensor([0]), 9), w_gate_up, w_down)


def test_sort_by_expert_and_split_experts():
    indices = torch.tensor([[2, 0], [2, 3], [0, 2]])
    order, token, bounds = sort_by_expert(indices, 5)
    assert bounds == [0, 2, 2, 5, 6, 6]  # expert 0: 2 pairs, 1: none, 2: 3, 3: 1, 4: none
    assert indices.reshape(-1)[order].tolist() == [0, 0, 2, 2, 2, 3]
    assert token.tolist() == [0, 2, 0, 1, 2, 1]
    assert split_experts(bounds, 1) == [range(0, 5)]
    assert split_experts(bounds, 2) == [range(0, 2), range(2, 5)]  # 2 pairs, then 4
    assert split_experts([0, 0, 0], 2) == []  # no pairs: no work
    parts = split_experts(list(range(0, 101, 10)), 3)  # 10 experts of 10 pairs
    assert [r.start for r in parts] == [0, 3, 7] and parts[-1].stop == 10


def test_expert_parallel_restores_the_thread_count_and_runs_without_autograd():
    threads = torch.get_num_threads()
    w = torch.ones(3, requires_grad=True)
    outs = expert_parallel(lambda a, b: (torch.get_num_threads(), (w * a).requires_grad, b), [(1, "x"), (2, "y")])
    assert outs == [(1, False, "x"), (1, False, "y")]
    assert torch.get_num_threads() == threads
    with pytest.raises(ZeroDivisionError):
        expert_parallel(lambda a: 1 / a, [(0,), (1,)])
    assert torch.get_num_threads() == threads


def test_layer_is_the_same_with_two_threads():
    torch.manual_seed(0)
    layer = DeepSeekMoE(16, 8, 8, 3, n_shared_experts=1)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y1 = layer(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, layer.w_gate_up, layer.gate_weight])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y2 = layer(x)
        g2 = torch.autograd.grad(y2.square().sum(), [x, layer.w_gate_up, layer.gate_weight])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y2, y1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_layer_equals_its_definition():
    torch.manual_seed(0)
    layer = DeepSeekMoE(16, 8, 8, 2, n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    layer.bias.normal_()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    flat = x.reshape(-1, 16)
    scores = torch.sigmoid(flat @ layer.gate_weight.T)
    stats = layer.last_stats
    torch.testing.assert_close(stats.weights, 2.0 * scores.gather(1, stats.indices)
                               / scores.gather(1, stats.indices).sum(-1, keepdim=True))
    want = loop_moe(flat, stats.weights, stats.indices, layer.w_gate_up, layer.w_down) + layer.shared_experts(flat)
    torch.testing.assert_close(y.reshape(-1, 16), want)


@pytest.mark.parametrize("training", [False, True])
def test_last_stats_describe_the_last_forward(training):
    """``last_stats`` is computed when read; it is that of the newest forward, never a stale one."""
    torch.manual_seed(0)
    layer = DeepSeekMoE(16, 8, 8, 2).train(training)
    assert layer.last_stats is None
    total = torch.zeros(8)
    for x in (torch.randn(1, 5, 16), torch.randn(2, 3, 16)):
        layer(x)
        stats = layer.last_stats
        assert stats is layer.last_stats  # read twice, computed once
        assert stats.indices.shape == (x.shape[0] * x.shape[1], 2)
        torch.testing.assert_close(stats.load, torch.bincount(stats.indices.reshape(-1), minlength=8).float())
        torch.testing.assert_close(stats.max_vio, max_violation(stats.load))
        total += stats.load
    torch.testing.assert_close(layer.load_since_update, total if training else torch.zeros(8))


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = DeepSeekMoE(6, 3, 4, 2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                        seq_aux_loss_alpha=0.1).double()
    params = dict(layer.named_parameters())
    names = list(params)
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)

    def run(x, *tensors):
        out = torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))
        return out, layer.aux_loss

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params.values()])
    assert torch.autograd.gradcheck(run, inputs)






@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(moe_intermediate_size=-4), "moe_intermediate_size"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(gamma=-0.1), "gamma"),
    (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
])
def test_impossible_configs_name_the_field(kwargs, field):
    args = dict(hidden_size=8, moe_intermediate_size=4, n_routed_experts=8, num_experts_per_tok=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        DeepSeekMoE(**args)


def test_notebook_11_sorted_dispatch_equals_helpers_dispatch():
    from nbload import load_notebook

    from helpers.moe import checks as moe_checks

    nb = load_notebook("11_moe_efficient_dispatch.ipynb")
    torch.manual_seed(0)
    experts = moe_checks.make_experts(5, 8, 4, seed=3)
    x, weights = torch.randn(9, 8), torch.rand(9, 2)
    indices = torch.rand(9, 5).topk(2, dim=-1).indices
    with torch.no_grad():
        want = dispatch(x, weights, indices, *moe_checks.stack_experts(experts))
        for fn in (nb.sorted_dispatch, nb.naive_dispatch, nb.expert_loop):
            torch.testing.assert_close(fn(x, weights, indices, experts), want)


def test_notebook_11_checker_passes_the_solution_and_fails_the_stub():
    from nbload import load_notebook

    from helpers.moe import checks as moe_checks
    from helpers.teaching.checks import CheckFailure

    with torch.no_grad():
        moe_checks.check_sorted_dispatch(load_notebook("11_moe_efficient_dispatch.ipynb").sorted_dispatch)
        stub = load_notebook("11_moe_efficient_dispatch.ipynb", exercise=True).sorted_dispatch
        with pytest.raises((CheckFailure, NotImplementedError)):
            moe_checks.check_sorted_dispatch(stub)
