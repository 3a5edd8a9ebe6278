"""The MoE exercise checkers: the notebooks' solutions pass, the stubs and known mistakes fail, each
with its own message. Every wrong implementation below is written out here on purpose."""

import pytest
import torch
from nbload import load_notebook

from helpers.moe import checks as moe_checks

NB10 = "10_moe_from_dense_to_experts.ipynb"
NB11 = "11_moe_efficient_dispatch.ipynb"
NB12 = "12_deepseekmoe_fine_grained_shared_routing.ipynb"


def fails_with(checker, fn, *fragments):
    message = checker.explain(fn)
    assert message is not None, f"{checker.name} accepted a wrong function"
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in:\n{message}"


@pytest.fixture(scope="module")
def nb10():
    return load_notebook(NB10)


@pytest.fixture(scope="module")
def nb12():
    return load_notebook(NB12)




STUB = "still the exercise stub"


# ----------------------------------------------------------------------------------- route_topk

def test_route_topk_solution_passes_and_stub_fails(nb10):
    assert moe_checks.check_route_topk.explain(nb10.route_topk) is None
    fails_with(moe_checks.check_route_topk, load_notebook(NB10, exercise=True).route_topk, STUB, "First hint:")


def test_route_topk_ignores_index_order():
    def reversed_order(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return (top / top.sum(-1, keepdim=True)).flip(-1), idx.flip(-1)
    assert moe_checks.check_route_topk.explain(reversed_order) is None


def test_route_topk_mistakes():
    check = moe_checks.check_route_topk

    def wrong_dim(logits, k):
        top, idx = logits.softmax(dim=0).topk(k, dim=-1)
        return top / top.sum(-1, keepdim=True), idx

    def no_renorm(logits, k):
        return logits.softmax(dim=-1).topk(k, dim=-1)

    def sigmoid(logits, k):
        top, idx = logits.sigmoid().topk(k, dim=-1)
        return top / top.sum(-1, keepdim=True), idx

    def second_softmax(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return top.softmax(-1), idx

    def smallest(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1, largest=False)
        return top / top.sum(-1, keepdim=True), idx

    fails_with(check, wrong_dim, "softmax over the wrong dimension")
    fails_with(check, no_renorm, "weights for token 0 sum to", "did you renormalise after top-k?")
    fails_with(check, sigmoid, "sigmoid affinities")
    fails_with(check, second_softmax, "second softmax")
    fails_with(check, smallest, "token 0 chose experts")
    fails_with(check, lambda logits, k: logits, "returned 1 value")


# ------------------------------------------------------------------------------ sorted_dispatch

def test_sorted_dispatch_solution_passes_and_stub_fails():
    check = moe_checks.check_sorted_dispatch
    with torch.no_grad():
        assert check.explain(load_notebook(NB11).sorted_dispatch) is None
        fails_with(check, load_notebook(NB11, exercise=True).sorted_dispatch, STUB)


def _sorted_rows(x, weights, indices, experts):
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // indices.shape[1]
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    rows = torch.cat([experts[e](b) for e, b in enumerate(x[token].split(counts)) if len(b)])
    return order, token, rows


def test_sorted_dispatch_mistakes():
    check = moe_checks.check_sorted_dispatch

    def assign(x, weights, indices, experts):
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            for t, j in zip(*torch.where(indices == e)):
                out[t] = weights[t, j] * expert(x[t])
        return out

    def unweighted(x, weights, indices, experts):
        order, token, rows = _sorted_rows(x, weights, indices, experts)
        return torch.zeros_like(x).index_add_(0, token, rows)

    def weights_unsorted(x, weights, indices, experts):
        order, token, rows = _sorted_rows(x, weights, indices, experts)
        return torch.zeros_like(x).index_add_(0, token, rows * weights.reshape(-1, 1))

    def wrong_tokens(x, weights, indices, experts):
        order, token, rows = _sorted_rows(x, weights, indices, experts)
        position = torch.arange(len(order)) // indices.shape[1]
        return torch.zeros_like(x).index_add_(0, position, rows * weights.reshape(-1)[order, None])

    with torch.no_grad():
        fails_with(check, assign, "contributions are lost", "Accumulate")
        fails_with(check, unweighted, "not multiplied by their gating weights")
        fails_with(check, weights_unsorted, "permute the weights")
        fails_with(check, wrong_tokens, "added to the wrong tokens")


def test_checkers_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    moe_checks.check_sorted_dispatch.explain(lambda x, weights, indices, experts: x)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------ route_v3

def test_route_v3_solution_passes_and_stub_fails(nb12):
    assert moe_checks.check_route_v3.explain(nb12.route_v3) is None
    fails_with(moe_checks.check_route_v3, load_notebook(NB12, exercise=True).route_v3, STUB)


def _v3(logits, bias, top_k, n_group, topk_group, scale, *, score="sigmoid", w_bias=False, c_bias=True,
        g_bias=True, g_score="top2", groups=True, renorm=True, scale_first=False):
    s = logits.sigmoid() if score == "sigmoid" else logits.softmax(-1)
    choice = s + bias if c_bias else s
    if groups:
        grouped = (choice if g_bias else s).view(len(s), n_group, -1)
        gs = grouped.topk(2, -1).values.sum(-1) if g_score == "top2" else grouped.amax(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(1, gs.topk(topk_group, -1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(s.shape[1] // n_group, 1), float("-inf"))
    idx = choice.topk(top_k, -1).indices
    w = (s + bias if w_bias else s).gather(1, idx)
    if scale_first:
        w = w * scale
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return (w if scale_first else w * scale), idx


def _v3_variant(**switch):
    return lambda logits, bias, top_k, n_group, topk_group, routed_scaling_factor: _v3(
        logits, bias, top_k, n_group, topk_group, routed_scaling_factor, **switch)


@pytest.mark.parametrize("switch, fragment", [
    (dict(w_bias=True), "bias was added to the gating weights"),
    (dict(c_bias=False, g_bias=False), "the bias did not change which experts were chosen"),
    (dict(g_bias=False), "groups were ranked by s, not by s + b"),
    (dict(score="softmax"), "softmax affinities"),
    (dict(g_score="max"), "scored by their best expert"),
    (dict(groups=False), "outside their topk_group best groups"),
    (dict(renorm=False), "not renormalised"),
    (dict(scale_first=True), "routed_scaling_factor forgotten"),
])
def test_route_v3_mistakes(switch, fragment):
    assert moe_checks.check_route_v3.explain(_v3_variant()) is None  # the switchboard itself is right
    fails_with(moe_checks.check_route_v3, _v3_variant(**switch), fragment)


def test_route_v3_diagnoses_weight_sums():
    half = _v3_variant()
    fails_with(moe_checks.check_route_v3, lambda **kw: (half(**kw)[0] * 0.5, half(**kw)[1]),
               "weights for token 0 sum to", "expected 2.5")


# --------------------------------------------------------------------------------- moe_forward

def test_moe_forward_solution_passes_and_stub_fails(nb12):
    with torch.no_grad():
        assert moe_checks.check_moe_forward.explain(nb12.moe_forward) is None
        fails_with(moe_checks.check_moe_forward, load_notebook(NB12, exercise=True).moe_forward, STUB)


def test_moe_forward_mistakes(nb12):
    route_v3 = nb12.route_v3

    def forward(u, gate_weight, bias, experts, shared_expert, top_k, n_group, topk_group, routed_scaling_factor,
                *, shared=True, residual=False, scale=True, use_bias=True, assign=False):
        w, idx = route_v3(u @ gate_weight.T, bias if use_bias else torch.zeros_like(bias), top_k, n_group,
                          topk_group, routed_scaling_factor if scale else 1.0)
        out = torch.zeros_like(u)
        for e, expert in enumerate(experts):
            token, slot = torch.where(idx == e)
            if len(token) == 0:
                continue
            contribution = w[token, slot, None] * expert(u[token])
            if assign:
                out[token] = contribution
            else:
                out.index_add_(0, token, contribution)
        if shared and shared_expert is not None:
            out = out + shared_expert(u)
        return out + u if residual else out

    def variant(**switch):
        return lambda **kw: forward(**kw, **switch)

    check = moe_checks.check_moe_forward
    with torch.no_grad():
        assert check.explain(variant()) is None
        fails_with(check, variant(shared=False), "shared experts' output is missing")
        fails_with(check, variant(residual=True), "added the residual u")
        fails_with(check, variant(scale=False), "routed_scaling_factor forgotten")
        fails_with(check, variant(use_bias=False), "the bias did not change which experts")
        fails_with(check, variant(assign=True), "contributions are lost")


# --------------------------------------------------------------------------------- update_bias







def test_sort_by_expert_leaves_other_outputs_alone():
    x = torch.ones(3)
    assert moe_checks.sort_routing(x) is x
    w, i = moe_checks.sort_routing((torch.tensor([[0.2, 0.8]]), torch.tensor([[5, 1]])))
    assert i.tolist() == [[1, 5]] and torch.equal(w, torch.tensor([[0.8, 0.2]]))
