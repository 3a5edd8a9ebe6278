"""Every path the size-based choice of helpers.moe.experts.dispatch can take computes the same layer.

The paths are forced with ``experts.FORCE_PATH`` (monkeypatched) or ``dispatch(path=...)``; outputs and
gradients are compared with the definition (one token, one expert at a time) and with transformers.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers.moe import DeepSeekMoE, dispatch, experts
from helpers.moe.hf import moe_from_hf
from tests.test_moe_hf import random_hf_moe

# (path, n_workers): every way auto can go
PATHS = [("loop", 1), ("loop", 2), ("sorted", 1), ("sorted", 2)]
IDS = ["loop", "loop, thread pool", "sorted, one part", "sorted, thread pool"]
FORWARD_PATHS, FORWARD_IDS = PATHS + [("grouped", None)], IDS + ["grouped"]  # F.grouped_mm has no float64


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


@pytest.mark.parametrize("path", ["loop", "grouped", "sorted"])
def test_forced_path_layer_equals_transformers_output_and_gradients(path, monkeypatch):
    monkeypatch.setattr(experts, "FORCE_PATH", path)
    torch.manual_seed(0)
    hf = random_hf_moe("v3", n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                       n_shared_experts=2)
    ours = moe_from_hf(hf)
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


def test_auto_chooses_by_the_size_of_the_work(monkeypatch):
    n_experts, macs = 64, 512 * 256  # H x I of the benchmark's layer
    loop_max = int(experts.LOOP_MAX_PAIRS_PER_EXPERT * n_experts)
    grouped_max = experts.GROUPED_MAX_MACS_PER_EXPERT * n_experts // macs
    threads = torch.get_num_threads()
    assert experts.choose_path(6, n_experts, macs_per_pair=macs) == ("loop", 1)  # one token, top-6: this thread
    assert experts.choose_path(loop_max, n_experts, macs_per_pair=macs) == ("loop", 1)
    assert experts.choose_path(loop_max + 1, n_experts, macs_per_pair=macs) == ("grouped", threads)
    assert experts.choose_path(grouped_max, n_experts, macs_per_pair=macs) == ("grouped", threads)
    assert experts.choose_path(grouped_max + 1, n_experts, macs_per_pair=macs) == ("sorted", threads)
    # with autograd: never the loop; the grouped path while small, then the sorted dispatch
    assert experts.choose_path(6, n_experts, needs_grad=True, macs_per_pair=macs) == ("grouped", threads)
    assert experts.choose_path(grouped_max + 1, n_experts, needs_grad=True, macs_per_pair=macs) == ("sorted", threads)
    # where F.grouped_mm cannot run (float64, odd widths), or the size is unknown: the sorted dispatch
    for kwargs in (dict(grouped_ok=False, macs_per_pair=macs), {}):
        assert experts.choose_path(loop_max + 1, n_experts, **kwargs) == ("sorted", threads)
    monkeypatch.setattr(experts, "POOL_MIN_PAIRS_PER_EXPERT", 8)
    assert experts.choose_path(loop_max + 1, n_experts) == ("sorted", 1)  # below the pool bound: one part
    assert experts.choose_path(6, n_experts, "sorted") == ("sorted", threads)
    assert experts.choose_path(10**6, n_experts, "loop") == ("loop", threads)
    assert experts.choose_path(6, n_experts, n_workers=3) == ("sorted", 3)  # a thread count means the pool
    monkeypatch.setattr(experts, "FORCE_PATH", "sorted")
    assert experts.choose_path(6, n_experts, "loop")[0] == "sorted"  # the module switch wins


def test_auto_runs_the_loop_for_one_token_and_the_sorted_dispatch_for_many(monkeypatch):
    calls = []
    real = experts.loop_dispatch
    monkeypatch.setattr(experts, "loop_dispatch", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    layer = DeepSeekMoE(16, 8, 16, 2, n_shared_experts=1)
    with torch.no_grad():
        layer(torch.randn(1, 1, 16))  # 2 pairs <= 16 / 8
        layer(torch.randn(1, 64, 16))  # 128 pairs
    layer(torch.randn(1, 1, 16))  # with autograd: not the loop
    assert calls == [1]


def test_bad_path_and_bad_expert_ids_name_the_argument():
    x, weights, indices, w_gate_up, w_down = inputs(4)
    with pytest.raises(ValueError, match="path must be one of"):
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


def test_tiny_config_layer_is_the_same_on_every_path(monkeypatch):
    torch.manual_seed(0)
    hf = random_hf_moe("v2")
    ours = moe_from_hf(hf)
    x = torch.randn(2, 3, hf.config.hidden_size)
    outs = []
    for path in ("loop", "grouped", "sorted"):
        monkeypatch.setattr(experts, "FORCE_PATH", path)
        outs.append(ours(x))
    for out in outs[1:]:
        torch.testing.assert_close(outs[0], out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[0], hf(x), atol=1e-5, rtol=1e-5)
