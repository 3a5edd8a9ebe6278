"""Balancing: statistics, auxiliary losses, the auxiliary-loss-free bias."""

import pytest
import torch

from helpers.moe import (
    DeepSeekMoE,
    expert_level_aux_loss,
    expert_load,
    max_violation,
    sequence_wise_aux_loss,
    update_bias,
)


def test_statistics_by_hand():
    indices = torch.tensor([[0, 3], [3, 2], [3, 1]])
    load = expert_load(indices, 5)
    assert load.tolist() == [1.0, 1.0, 1.0, 3.0, 0.0]
    torch.testing.assert_close(max_violation(load), torch.tensor((3 - 1.2) / 1.2))
    bias = update_bias(torch.zeros(5), load, 0.1)
    torch.testing.assert_close(bias, torch.tensor([0.1, 0.1, 0.1, -0.1, 0.1]))


def test_expert_level_aux_loss_by_hand():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1]])
    indices = torch.tensor([[0, 1], [1, 0], [0, 2]])
    n_e, k, t = 4, 2, 3
    f = [n_e / (k * t) * sum(int(i in row) for row in indices.tolist()) for i in range(n_e)]  # V2 eq. 24
    p = [sum(scores[j, i].item() for j in range(t)) / t for i in range(n_e)]  # V2 eq. 25
    want = 0.01 * sum(fi * pi for fi, pi in zip(f, p))  # V2 eq. 23
    torch.testing.assert_close(expert_level_aux_loss(scores, indices, n_e, 0.01), torch.tensor(want))


def test_sequence_wise_aux_loss_by_hand():
    torch.manual_seed(0)
    b, t, n_e, k = 2, 5, 4, 2
    scores = torch.rand(b, t, n_e)
    indices = torch.stack([torch.stack([torch.randperm(n_e)[:k] for _ in range(t)]) for _ in range(b)])
    losses = []
    for seq in range(b):
        loss = 0.0
        for i in range(n_e):
            f = n_e / (k * t) * sum(int(i in indices[seq, j].tolist()) for j in range(t))  # V3 eq. 18
            p = sum((scores[seq, j, i] / scores[seq, j].sum()).item() for j in range(t)) / t  # V3 eq. 19-20
            loss += f * p
        losses.append(0.001 * loss)  # V3 eq. 17
    got = sequence_wise_aux_loss(scores, indices, n_e, 0.001)
    torch.testing.assert_close(got, torch.tensor(sum(losses) / b))


def test_aux_losses_do_not_change_the_output():
    torch.manual_seed(0)
    plain = DeepSeekMoE(16, 8, 8, 2, scoring_func="softmax", norm_topk_prob=False)
    with_losses = DeepSeekMoE(16, 8, 8, 2, scoring_func="softmax", norm_topk_prob=False,
                              aux_loss_alpha=0.01, seq_aux_loss_alpha=0.001)
    with_losses.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(with_losses(x), plain(x))
    assert plain.aux_loss.item() == 0.0
    scores = torch.softmax(x.reshape(-1, 16) @ plain.gate_weight.T, dim=-1)
    idx = with_losses.last_stats.indices
    want = (expert_level_aux_loss(scores, idx, 8, 0.01)
            + sequence_wise_aux_loss(scores.view(3, 4, 8), idx.view(3, 4, 2), 8, 0.001))
    torch.testing.assert_close(with_losses.aux_loss, want)
    with_losses.aux_loss.backward()
    assert with_losses.gate_weight.grad.abs().sum() > 0  # the loss trains the router


def test_bias_gets_no_gradient():
    torch.manual_seed(0)
    layer = DeepSeekMoE(8, 4, 4, 2, gamma=0.1, seq_aux_loss_alpha=0.1)
    assert "bias" not in dict(layer.named_parameters()) and not layer.bias.requires_grad
    out = layer(torch.randn(2, 3, 8))
    (out.sum() + layer.aux_loss).backward()
    assert layer.bias.grad is None and layer.gate_weight.grad is not None


def test_update_bias_accumulates_training_load_then_restarts():
    torch.manual_seed(0)
    layer = DeepSeekMoE(8, 4, 4, 1, gamma=0.25)
    with pytest.raises(RuntimeError, match="forward"):
        layer.update_bias()
    x1, x2 = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    layer(x1)
    load = layer.last_stats.load
    layer(x2)
    load = load + layer.last_stats.load
    layer.eval()
    layer(torch.randn(1, 50, 8))  # eval-mode forwards do not count
    layer.update_bias()
    torch.testing.assert_close(layer.bias, 0.25 * torch.sign(load.mean() - load))
    assert not layer.load_since_update.any()


def test_expert_level_loss_normalises_sigmoid_scores_by_hand():
    torch.manual_seed(1)
    t, n_e, k = 6, 5, 2
    scores = torch.rand(t, n_e)  # sigmoid-like: rows do not sum to 1
    indices = torch.rand(t, n_e).topk(k, dim=-1).indices
    f = [n_e / (k * t) * sum(int(i in row) for row in indices.tolist()) for i in range(n_e)]  # V2 eq. 24
    p = [sum((scores[j, i] / scores[j].sum()).item() for j in range(t)) / t for i in range(n_e)]  # V3 eq. 19-20
    want = 0.1 * sum(fi * pi for fi, pi in zip(f, p))
    torch.testing.assert_close(expert_level_aux_loss(scores, indices, n_e, 0.1), torch.tensor(want))


def test_no_auxiliary_loss_rewards_shrinking_every_score():
    torch.manual_seed(2)
    scores = torch.rand(2, 7, 6)
    indices = torch.rand(2, 7, 6).topk(2, dim=-1).indices
    for loss in (expert_level_aux_loss, sequence_wise_aux_loss):
        torch.testing.assert_close(loss(0.01 * scores, indices, 6, 1.0), loss(scores, indices, 6, 1.0))


def test_normalising_softmax_scores_changes_neither_value_nor_gradient():
    torch.manual_seed(3)
    logits = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    indices = logits.detach().topk(2, dim=-1).indices
    ours = expert_level_aux_loss(logits.softmax(-1), indices, 6, 0.5)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    f = expert_load(indices, 6).double() * 6 / (2 * 9)
    v2 = 0.5 * (f * logits.softmax(-1).mean(0)).sum()  # V2 eq. 23-25 on the raw softmax scores
    (grad_v2,) = torch.autograd.grad(v2, logits)
    torch.testing.assert_close(ours, v2)
    torch.testing.assert_close(grad_ours, grad_v2)


def test_expert_level_loss_of_one_sequence_is_the_sequence_wise_loss():
    torch.manual_seed(4)
    scores, indices = torch.rand(11, 8), torch.rand(11, 8).topk(3, dim=-1).indices
    torch.testing.assert_close(expert_level_aux_loss(scores, indices, 8, 0.2),
                               sequence_wise_aux_loss(scores, indices, 8, 0.2))


@pytest.mark.parametrize("field", ["aux_loss_alpha", "seq_aux_loss_alpha"])
def test_sigmoid_layer_losses_use_normalised_scores(field):
    torch.manual_seed(5)
    layer = DeepSeekMoE(16, 8, 8, 2, scoring_func="sigmoid", **{field: 0.3})
    x = torch.randn(3, 4, 16)
    layer(x)
    s = torch.sigmoid(x.reshape(-1, 16) @ layer.gate_weight.T)  # (T, E) raw sigmoid scores
    s_norm = s / s.sum(dim=-1, keepdim=True)  # V3 eq. 19
    idx = layer.last_stats.indices
    f = expert_load(idx, 8) * 8 / (2 * 12)
    if field == "aux_loss_alpha":  # all 12 tokens pooled
        want = 0.3 * (f * s_norm.mean(0)).sum()
    else:  # per sequence of 4 tokens, then the mean
        want = sequence_wise_aux_loss(s_norm.view(3, 4, 8), idx.view(3, 4, 2), 8, 0.3)
    torch.testing.assert_close(layer.aux_loss, want)
    raw = 0.3 * (f * s.mean(0)).sum()
    assert not torch.isclose(layer.aux_loss, raw)  # not V2's formula on raw sigmoid scores
    layer.aux_loss.backward()
    assert layer.gate_weight.grad.abs().sum() > 0
