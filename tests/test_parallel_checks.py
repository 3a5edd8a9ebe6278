"""Notebook 14's exercise checker: the solution passes, the stub fails with a nudge, every known mistake is named
by its own message, position mistakes (where an expert lives) are named as such, an unknown mistake is described."""

import pytest
import torch
from nbload import load_notebook

from helpers.parallel.checks import check_send_counts, send_counts

NB14 = "14_moe_expert_parallelism.ipynb"


def test_every_known_mistake_gets_its_own_message():
    assert len(check_send_counts.mistakes) >= 6
    audit = check_send_counts.audit()
    for mistake in check_send_counts.mistakes:
        assert audit[mistake.name] is not None and mistake.message in audit[mistake.name], mistake.name


def test_reference_passes_and_case_sizes_differ():
    assert check_send_counts.explain(send_counts) is None
    for case in check_send_counts.cases():
        t, k = case.kwargs["indices"].shape
        e, n = case.kwargs["n_experts"], case.kwargs["n_ranks"]
        assert len({t, k, e, n}) == 4 and e // n != n, case.description


def test_counts_by_hand():
    indices = torch.tensor([[0, 1], [1, 4], [5, 2]])  # 6 experts on 3 ranks: rank r holds 2r, 2r+1
    assert send_counts(indices, 6, 3, once_per_rank=False).tolist() == [3, 1, 2]
    assert send_counts(indices, 6, 3, once_per_rank=True).tolist() == [2, 1, 2]


def test_position_mistakes_written_by_hand_are_named():
    def round_robin(indices, n_experts, n_ranks, once_per_rank):
        rank = indices % n_ranks
        if once_per_rank:
            return torch.stack([(rank == r).any(1).sum() for r in range(n_ranks)])
        return torch.bincount(rank.flatten(), minlength=n_ranks)

    def bucketize_left(indices, n_experts, n_ranks, once_per_rank):
        starts = torch.arange(1, n_ranks) * (n_experts // n_ranks)
        rank = torch.bucketize(indices, starts)  # right=False: expert r*E/N lands on rank r - 1
        if once_per_rank:
            return torch.stack([(rank == r).any(1).sum() for r in range(n_ranks)])
        return torch.bincount(rank.flatten(), minlength=n_ranks)

    assert "round-robin" in check_send_counts.explain(round_robin)
    assert "was sent to rank r - 1" in check_send_counts.explain(bucketize_left)


def test_an_unknown_mistake_is_described_without_a_cause():
    def off(indices, n_experts, n_ranks, once_per_rank):
        return send_counts(indices, n_experts, n_ranks, once_per_rank) + (torch.arange(n_ranks) == 1)

    message = check_send_counts.explain(off)
    assert "the counts differ for rank 1" in message and "add up to" in message
    assert not any(m.message in message for m in check_send_counts.mistakes)


def test_notebook_solution_passes_and_stub_fails_with_a_nudge():
    check_send_counts(load_notebook(NB14).send_counts)
    stub = load_notebook(NB14, exercise=True).send_counts
    message = check_send_counts.explain(stub)
    assert "still the exercise stub" in message and check_send_counts.nudge in message


def test_show_hint_prints_the_full_hint(capsys):
    check_send_counts.show_hint()
    assert check_send_counts.hint in capsys.readouterr().out


@pytest.mark.parametrize("once", [False, True])
def test_counts_add_up(once):
    indices = torch.rand(50, 16).topk(4, dim=-1).indices
    counts = send_counts(indices, 16, 4, once)
    assert counts.shape == (4,)
    assert counts.sum() == (len({(t, int(e) // 4) for t, row in enumerate(indices) for e in row}) if once else 200)
