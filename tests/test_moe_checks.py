"""The MoE exercise checkers: the notebooks' solutions pass, the stubs fail with a nudge, every known
mistake gets its own message (``audit``), mistakes written out by hand the way a learner would are
named, and an unknown mistake is described (which tokens, which experts), not guessed."""

import pytest
import torch
from nbload import load_notebook

from helpers.moe import checks as moe_checks

NB10 = "10_moe_from_dense_to_experts.ipynb"
NB11 = "11_moe_efficient_dispatch.ipynb"
NB12 = "12_deepseekmoe_fine_grained_shared_routing.ipynb"

CHECKERS = {"route_topk": moe_checks.check_route_topk, "sorted_dispatch": moe_checks.check_sorted_dispatch,
            "route_v3": moe_checks.check_route_v3, "moe_forward": moe_checks.check_moe_forward}


def fails_with(checker, fn, *fragments):
    with torch.no_grad():
        message = checker.explain(fn)
    assert message is not None, f"{checker.name} accepted a wrong function"
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in:\n{message}"
    return message


@pytest.fixture(scope="module")
def nb10():
    return load_notebook(NB10)


@pytest.fixture(scope="module")
def nb12():
    return load_notebook(NB12)


STUB = "still the exercise stub"


# --------------------------------------------------------------------------- every checker alike

@pytest.mark.parametrize("name", CHECKERS)
def test_every_known_mistake_gets_its_own_message(name):
    checker = CHECKERS[name]
    assert len(checker.mistakes) >= 6
    with torch.no_grad():
        audit = checker.audit()
    assert set(audit) == {m.name for m in checker.mistakes}
    for mistake in checker.mistakes:
        assert audit[mistake.name] is not None, f"{mistake.name} passes {name}"
        assert mistake.message in audit[mistake.name], f"{mistake.name} is reported as:\n{audit[mistake.name]}"


@pytest.mark.parametrize("name", CHECKERS)
def test_reference_passes_and_case_sizes_differ(name):
    checker = CHECKERS[name]
    with torch.no_grad():
        assert checker.explain(checker.reference) is None
    for case in checker.cases():
        sizes = [v for k, v in case.kwargs.items() if isinstance(v, int) and k not in ("n_group", "topk_group")
                 or k == "n_group" and v > 1]
        sizes += [d for k in ("logits", "x", "u") if k in case.kwargs for d in case.kwargs[k].shape]
        if "experts" in case.kwargs:
            sizes += [len(case.kwargs["experts"]), case.kwargs["experts"][0].w_gate.weight.shape[0]]
        if "indices" in case.kwargs:
            sizes.append(case.kwargs["indices"].shape[1])
        assert len(sizes) == len(set(sizes)), f"{case.description}: sizes {sizes} repeat"


@pytest.mark.parametrize("name", CHECKERS)
def test_show_hint_prints_the_full_hint(name, capsys):
    checker = CHECKERS[name]
    checker.show_hint()
    out = capsys.readouterr().out
    assert checker.hint in out and checker.hint != checker.nudge


def test_solutions_pass_and_stubs_fail_with_a_nudge(nb10, nb12):
    nb11 = load_notebook(NB11)
    stubs = {NB: load_notebook(NB, exercise=True) for NB in (NB10, NB11, NB12)}
    for name, solution, stub in (("route_topk", nb10.route_topk, stubs[NB10].route_topk),
                                 ("sorted_dispatch", nb11.sorted_dispatch, stubs[NB11].sorted_dispatch),
                                 ("route_v3", nb12.route_v3, stubs[NB12].route_v3),
                                 ("moe_forward", nb12.moe_forward, stubs[NB12].moe_forward)):
        with torch.no_grad():
            assert CHECKERS[name].explain(solution) is None
        fails_with(CHECKERS[name], stub, STUB, "First hint:", CHECKERS[name].nudge, f"moe_checks.check_{name}.show_hint()")


# ----------------------------------------------------------------------------------- route_topk

def test_route_topk_ignores_index_order():
    def reversed_order(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return (top / top.sum(-1, keepdim=True)).flip(-1), idx.flip(-1)
    assert moe_checks.check_route_topk.explain(reversed_order) is None


def test_route_topk_mistakes_written_by_hand():
    check = moe_checks.check_route_topk

    def renormalise(top):
        return top / top.sum(-1, keepdim=True)

    def wrong_dim(logits, k):
        top, idx = logits.softmax(dim=0).topk(k, dim=-1)
        return renormalise(top), idx

    def sigmoid(logits, k):
        top, idx = logits.sigmoid().topk(k, dim=-1)
        return renormalise(top), idx

    def second_softmax(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return top.softmax(-1), idx

    def smallest(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1, largest=False)
        return renormalise(top), idx

    def over_tokens(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return top / top.sum(0, keepdim=True), idx

    def swapped(logits, k):
        top, idx = logits.softmax(-1).topk(k, dim=-1)
        return idx, renormalise(top)

    fails_with(check, wrong_dim, "softmax over the wrong dimension")
    fails_with(check, lambda logits, k: logits.softmax(dim=-1).topk(k, dim=-1), "not renormalised")
    fails_with(check, sigmoid, "sigmoid affinities")
    fails_with(check, second_softmax, "second softmax")
    fails_with(check, smallest, "*lowest*")
    fails_with(check, over_tokens, "sum over the tokens")
    fails_with(check, lambda logits, k: (renormalise(logits.topk(k, dim=-1).values), logits.topk(k, dim=-1).indices),
               "raw logits")
    fails_with(check, swapped, "return (weights, indices)")
    fails_with(check, lambda logits, k: logits, "returned 1 value")


def test_route_topk_describes_an_unknown_mistake():
    check = moe_checks.check_route_topk

    def second_best_only(logits, k):  # chooses the 2nd..(k+1)th experts: not a listed mistake
        top, idx = logits.softmax(-1).topk(k + 1, dim=-1)
        return top[:, 1:] / top[:, 1:].sum(-1, keepdim=True), idx[:, 1:]

    message = fails_with(check, second_best_only, "the chosen expert sets differ for 6 of 6 tokens", "token 0 chose")
    assert "expected" in message

    def wrong_weights_for_token_2(logits, k):
        weights, idx = check.reference(logits, k)
        weights[2] = weights[2].flip(0)
        return weights, idx

    fails_with(check, wrong_weights_for_token_2, "every token chose the right experts", "for 1 of 6 tokens (2)")


# ------------------------------------------------------------------------------ sorted_dispatch

def _sorted_rows(x, weights, indices, experts):
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // indices.shape[1]
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    rows = torch.cat([experts[e](b) for e, b in enumerate(x[token].split(counts)) if len(b)])
    return order, token, rows


def test_sorted_dispatch_mistakes_written_by_hand():
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

    def onto_x(x, weights, indices, experts):
        order, token, rows = _sorted_rows(x, weights, indices, experts)
        return x.index_add(0, token, rows * weights.reshape(-1)[order, None])

    def skip_empty_first(x, weights, indices, experts):
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // indices.shape[1]
        blocks = [b for b in x[token].split(torch.bincount(flat, minlength=len(experts)).tolist()) if len(b)]
        rows = torch.cat([expert(b) for expert, b in zip(experts, blocks)])
        return torch.zeros_like(x).index_add_(0, token, rows * weights.reshape(-1)[order, None])

    fails_with(check, assign, "contributions are lost", "Accumulate")
    fails_with(check, unweighted, "not multiplied by their gating weights")
    fails_with(check, weights_unsorted, "permute the weights")
    fails_with(check, wrong_tokens, "added to the wrong tokens")
    fails_with(check, onto_x, "accumulated onto x")
    fails_with(check, skip_empty_first, "empty blocks were removed")


def test_sorted_dispatch_describes_an_unknown_mistake():
    check = moe_checks.check_sorted_dispatch

    def expert_3_doubled(x, weights, indices, experts):
        return check.reference(x, weights * (1 + (indices == 3)), indices, experts)

    message = fails_with(check, expert_3_doubled, "the output rows of 1 of 7 tokens differ (3)", "was routed to expert 3",
                         "no token whose row is right was")
    assert "mistake" not in message


def test_checkers_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    moe_checks.check_sorted_dispatch.explain(lambda x, weights, indices, experts: x)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------ route_v3

def _v3(logits, bias, top_k, n_group, topk_group, scale, *, score="sigmoid", w_bias=False, c_bias=True,
        g_bias=True, g_score="top2", groups=True, renorm=True, scale_first=False):
    """V3 routing written independently of the checker, with a learner's possible slips."""
    s = logits.sigmoid() if score == "sigmoid" else logits.softmax(-1)
    choice = s + bias if c_bias else s
    if groups:
        grouped = (s + bias if g_bias else s).view(len(s), n_group, -1)
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
    (dict(c_bias=False), "the bias chose the groups but not the experts"),
    (dict(score="softmax"), "softmax affinities"),
    (dict(g_score="max"), "scored by their best expert"),
    (dict(groups=False), "outside their topk_group best groups"),
    (dict(renorm=False), "not renormalised"),
    (dict(scale_first=True), "applied before renormalising"),
])
def test_route_v3_mistakes_written_by_hand(switch, fragment):
    assert moe_checks.check_route_v3.explain(_v3_variant()) is None  # the switchboard itself is right
    fails_with(moe_checks.check_route_v3, _v3_variant(**switch), fragment)


def test_route_v3_describes_weights_that_sum_wrong():
    right = _v3_variant()
    fails_with(moe_checks.check_route_v3, lambda **kw: (right(**kw)[0] * 0.5, right(**kw)[1]),
               "every token chose the right experts", "sum to 1.250, expected 2.5")


# --------------------------------------------------------------------------------- moe_forward

def test_moe_forward_mistakes_written_by_hand(nb12):
    route_v3 = nb12.route_v3

    def forward(u, gate_weight, bias, experts, shared_expert, top_k, n_group, topk_group, routed_scaling_factor,
                *, shared=True, residual=False, scale=True, use_bias=True, assign=False, scale_all=False):
        w, idx = route_v3(u @ gate_weight.T, bias if use_bias else torch.zeros_like(bias), top_k, n_group,
                          topk_group, routed_scaling_factor if scale and not scale_all else 1.0)
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
        if scale_all:
            out = out * routed_scaling_factor
        return out + u if residual else out

    def variant(**switch):
        return lambda **kw: forward(**kw, **switch)

    check = moe_checks.check_moe_forward
    with torch.no_grad():
        assert check.explain(variant()) is None
    fails_with(check, variant(shared=False), "shared experts' output is missing")
    fails_with(check, variant(residual=True), "added the residual u")
    fails_with(check, variant(scale=False), "routed_scaling_factor forgotten")
    fails_with(check, variant(scale_all=True), "shared expert's output was multiplied by routed_scaling_factor")
    fails_with(check, variant(use_bias=False), "the bias did not change which experts")
    fails_with(check, variant(assign=True), "contributions are lost")


def test_moe_forward_describes_an_unknown_mistake():
    check = moe_checks.check_moe_forward
    fails_with(check, lambda **kw: check.reference(**kw) * 1.01, "the output rows of 7 of 7 tokens differ",
               "(every token)", "largest difference")


# ------------------------------------------------------------------------------ sort_routing

def test_sort_routing_leaves_other_outputs_alone_and_keeps_a_swapped_pair_swapped():
    x = torch.ones(3)
    assert moe_checks.sort_routing(x) is x
    w, i = moe_checks.sort_routing((torch.tensor([[0.2, 0.8]]), torch.tensor([[5, 1]])))
    assert i.tolist() == [[1, 5]] and torch.equal(w, torch.tensor([[0.8, 0.2]]))
    i, w = moe_checks.sort_routing((torch.tensor([[5, 1]]), torch.tensor([[0.2, 0.8]])))
    assert i.tolist() == [[1, 5]] and torch.equal(w, torch.tensor([[0.8, 0.2]]))
