"""Every backend of the routed experts computes the same layer as the readable reference.

Backends are named (``dispatch(backend=...)``, ``layer.backend = ...``); outputs and gradients are compared
with the definition (one token, one expert at a time), with the ``reference`` backend and with transformers.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers.moe import BACKENDS, DeepSeekMoE, dispatch
from helpers.moe.backends import Auto
from helpers.moe.hf import moe_from_hf
from tests.test_moe_hf import random_hf_moe

# (backend, n_workers): every way auto can go, and the readable reference
PATHS = [("reference", None), ("loop", 1), ("loop", 2), ("sorted", 1), ("sorted", 2)]
IDS = ["reference", "loop", "loop, thread pool", "sorted, one part", "sorted, thread pool"]
FORWARD_PATHS, FORWARD_IDS = PATHS + [("grouped", None)], IDS + ["grouped"]  # F.grouped_mm has no float64
LAYER_BACKENDS = ["reference", "loop", "grouped", "sorted", "auto"]  # "compiled": its own small test below


def loop_moe(x, weights, indices, w_gate_up, w_down):
    """The definition, one token and one chosen expert at a time (V3 eq. 12, routed part)."""
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros_like(x[t])
        for g, e in zip(weights[t], indices[t].tolist()):
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            row = row + g * (w_down[e] @ (F.silu(gate) * up))
        rows.append(row)
    return torch.stack(rows)


def inputs(n_tokens, dtype=torch.float32, hidden=8, inter=4, n_experts=6, top_k=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n_tokens, hidden, dtype=dtype)
    w_gate_up = torch.randn(n_experts, 2 * inter, hidden, dtype=dtype)
    w_down = torch.randn(n_experts, hidden, inter, dtype=dtype)
    indices = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    indices[indices == 1] = 0  # expert 1 gets no token; a token may choose expert 0 twice: both count
    return x, torch.rand(n_tokens, top_k, dtype=dtype), indices, w_gate_up, w_down


@pytest.mark.parametrize("path, n_workers", FORWARD_PATHS, ids=FORWARD_IDS)
@pytest.mark.parametrize("n_tokens", [1, 2, 13])
def test_every_path_equals_the_definition(path, n_workers, n_tokens):
    x, weights, indices, w_gate_up, w_down = inputs(n_tokens)
    got = dispatch(x, weights, indices, w_gate_up, w_down, n_workers=n_workers, path=path)
    torch.testing.assert_close(got, loop_moe(x, weights, indices, w_gate_up, w_down))


@pytest.mark.parametrize("path, n_workers", PATHS, ids=IDS)
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_every_path_gradcheck_float64(path, n_workers, n_tokens):
    x, weights, indices, w_gate_up, w_down = (t.requires_grad_() if t.is_floating_point() else t
                                              for t in inputs(n_tokens, torch.float64, hidden=5, inter=3))
    assert torch.autograd.gradcheck(
        lambda *t: dispatch(t[0], t[1], indices, t[2], t[3], n_workers=n_workers, path=path),
        (x, weights, w_gate_up, w_down))


def test_the_grouped_path_gives_the_sorted_paths_gradients_in_float32():
    x, weights, indices, w_gate_up, w_down = (t.requires_grad_() if t.is_floating_point() else t
                                              for t in inputs(9))
    grads = []
    for path in ("grouped", "sorted"):
        y = dispatch(x, weights, indices, w_gate_up, w_down, path=path)
        grads.append(torch.autograd.grad(y, [x, weights, w_gate_up, w_down], torch.ones_like(y)))
    for name, a, b in zip(["x", "weights", "w_gate_up", "w_down"], *grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_the_grouped_path_refuses_float64_by_name():
    x, weights, indices, w_gate_up, w_down = inputs(3, torch.float64)
    with pytest.raises(ValueError, match="grouped path needs u in one of"):
        dispatch(x, weights, indices, w_gate_up, w_down, path="grouped")


def test_the_loop_path_gives_the_gradients_of_a_subset_only():
    x, weights, indices, w_gate_up, w_down = inputs(7, torch.float64)
    w_down.requires_grad_()
    dispatch(x, weights, indices, w_gate_up, w_down, path="loop").sum().backward()
    expected = torch.func.grad(lambda w: loop_moe(x, weights, indices, w_gate_up, w).sum())(w_down.detach())
    torch.testing.assert_close(w_down.grad, expected)
    assert x.grad is None and w_gate_up.grad is None and weights.grad is None


@pytest.mark.parametrize("path", LAYER_BACKENDS)
def test_every_backend_layer_equals_transformers_output_and_gradients(path):
    torch.manual_seed(0)
    hf = random_hf_moe("v3", n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                       n_shared_experts=2)
    ours = moe_from_hf(hf)
    ours.backend = path
    for n_tokens in (1, 3, 40):  # 40 tokens x 4 > 2 x 16 experts: auto would not take the loop
        x = torch.randn(1, n_tokens, hf.config.hidden_size, requires_grad=True)
        got, want = ours(x), hf(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grad_out = torch.randn_like(want)
        got_g = torch.autograd.grad(got, [x, ours.w_gate_up, ours.w_down, ours.gate_weight], grad_out)
        want_g = torch.autograd.grad(want, [x, hf.experts.gate_up_proj, hf.experts.down_proj, hf.gate.weight],
                                     grad_out)
        for name, a, b in zip(["x", "w_gate_up", "w_down", "gate_weight"], got_g, want_g):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{path}, {n_tokens} tokens: {name}")


def test_auto_chooses_by_the_size_of_the_work():
    n_experts, macs = 64, 512 * 256  # H x I of the benchmark's layer
    auto = BACKENDS["auto"]
    loop_max = int(auto.loop_max_pairs_per_expert * n_experts)
    grouped_max = auto.grouped_max_macs_per_expert * n_experts // macs
    threads = torch.get_num_threads()
    assert auto.choose(6, n_experts, macs_per_pair=macs) == ("loop", 1)  # one token, top-6: this thread
    assert auto.choose(loop_max, n_experts, macs_per_pair=macs) == ("loop", 1)
    assert auto.choose(loop_max + 1, n_experts, macs_per_pair=macs) == ("grouped", threads)
    assert auto.choose(grouped_max, n_experts, macs_per_pair=macs) == ("grouped", threads)
    assert auto.choose(grouped_max + 1, n_experts, macs_per_pair=macs) == ("sorted", threads)
    # with autograd: never the loop; the grouped path while small, then the sorted dispatch
    assert auto.choose(6, n_experts, needs_grad=True, macs_per_pair=macs) == ("grouped", threads)
    assert auto.choose(grouped_max + 1, n_experts, needs_grad=True, macs_per_pair=macs) == ("sorted", threads)
    # where F.grouped_mm cannot run (float64, odd widths), or the size is unknown: the sorted dispatch
    for kwargs in (dict(grouped_ok=False, macs_per_pair=macs), {}):
        assert auto.choose(loop_max + 1, n_experts, **kwargs) == ("sorted", threads)
    assert Auto(pool_min_pairs_per_expert=8).choose(loop_max + 1, n_experts) == ("sorted", 1)  # below the pool bound
    assert auto.choose(6, n_experts, n_workers=3) == ("sorted", 3)  # a thread count means the pool
    assert auto.choose(0, n_experts) == ("sorted", 1)  # no pairs: an output that still has a backward


def test_auto_runs_the_loop_for_one_token_and_the_sorted_dispatch_for_many(monkeypatch):
    calls = []
    real = BACKENDS["loop"]
    monkeypatch.setitem(BACKENDS, "loop", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    layer = DeepSeekMoE(16, 8, 16, 2, n_shared_experts=1)
    with torch.no_grad():
        layer(torch.randn(1, 1, 16))  # 2 pairs <= 16 / 8
        layer(torch.randn(1, 64, 16))  # 128 pairs
    layer(torch.randn(1, 1, 16))  # with autograd: not the loop
    assert calls == [1]


def test_bad_path_and_bad_expert_ids_name_the_argument():
    x, weights, indices, w_gate_up, w_down = inputs(4)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch(x, weights, indices, w_gate_up, w_down, path="fast")
    for bad in (9, -1):
        with pytest.raises(ValueError, match=rf"expert ids in \[0, 6\), got {bad}"):
            dispatch(x, weights, indices.index_fill(1, torch.tensor([0]), bad), w_gate_up, w_down, path="loop")


def test_the_loop_path_keeps_the_input_dtype_and_handles_no_tokens():
    x, weights, indices, w_gate_up, w_down = inputs(3)
    got = dispatch(x.double(), weights, indices, w_gate_up.double(), w_down.double(), path="loop")
    assert got.dtype == torch.float64
    empty = dispatch(x[:0], weights[:0], indices[:0], w_gate_up, w_down, path="loop")
    assert empty.shape == (0, 8)


def test_tiny_config_layer_is_the_same_on_every_backend():
    torch.manual_seed(0)
    hf = random_hf_moe("v2")
    ours = moe_from_hf(hf)
    x = torch.randn(2, 3, hf.config.hidden_size)
    outs = []
    for path in LAYER_BACKENDS:
        ours.backend = path
        outs.append(ours(x))
    for out in outs[1:]:
        torch.testing.assert_close(outs[0], out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[0], hf(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_every_backend_gives_the_reference_gradients_in_float32(n_group, topk_group):
    torch.manual_seed(0)
    layer = DeepSeekMoE(16, 8, 8, 2, n_shared_experts=1, n_group=n_group, topk_group=topk_group)
    with torch.no_grad():
        layer.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 7, 16)
    results = {}
    for name in LAYER_BACKENDS:
        layer.backend = name
        x_g = x.clone().requires_grad_()
        y = layer(x_g)
        results[name] = (y, *torch.autograd.grad(y.square().sum(), [x_g, *layer.parameters()]))
    for name, got in results.items():
        for a, b in zip(got, results["reference"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_the_reference_backend_is_a_float64_layer_under_gradcheck():
    torch.manual_seed(0)
    layer = DeepSeekMoE(6, 3, 4, 2, n_shared_experts=1, n_group=2, topk_group=1, backend="reference").double()
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_the_compiled_backend_equals_the_reference_outputs_and_gradients():
    """Small on purpose: compiling takes tens of seconds on two cores (one shape, forward and backward)."""
    torch.manual_seed(0)
    layer = DeepSeekMoE(16, 8, 4, 2)
    x = torch.randn(1, 5, 16)
    results = {}
    for name in ("reference", "compiled"):
        layer.backend = name
        x_g = x.clone().requires_grad_()
        y = layer(x_g)
        results[name] = (y, *torch.autograd.grad(y.sum(), [x_g, layer.w_gate_up, layer.w_down, layer.gate_weight]))
    for a, b in zip(results["compiled"], results["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
