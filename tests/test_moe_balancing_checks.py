"""The checker of notebook 13's exercise (the auxiliary-loss-free bias update)."""

import pytest
import torch
from nbload import load_notebook

from helpers.moe import checks as moe_checks
from helpers.moe.checks.balancing import _bias_with

NB13 = "13_moe_load_balancing.ipynb"
STUB = "still the exercise stub"
CHECK = moe_checks.check_update_bias


@pytest.fixture(scope="module")
def nb13():
    return load_notebook(NB13)


def test_update_bias_solution_passes_and_stub_fails(nb13):
    assert CHECK.explain(nb13.update_bias) is None
    message = CHECK.explain(load_notebook(NB13, exercise=True).update_bias)
    assert STUB in message and "show_hint()" in message


def test_the_reference_with_no_switch_is_the_reference():
    for case in CHECK.cases():
        torch.testing.assert_close(_bias_with(**case.kwargs), CHECK.reference(**case.kwargs))


def test_every_known_mistake_gets_its_own_message():
    audit = CHECK.audit()
    assert len(audit) >= 6
    for mistake in CHECK.mistakes:
        assert audit[mistake.name] is not None, f"{mistake.name!r} passes the checker"
        assert mistake.message in audit[mistake.name], f"{mistake.name!r} got another message:\n{audit[mistake.name]}"
    assert len({m.message for m in CHECK.mistakes}) == len(CHECK.mistakes)


def test_update_bias_mistakes_written_by_hand():
    def fails_with(fn, fragment):
        message = CHECK.explain(fn)
        assert message is not None and fragment in message, message

    fails_with(lambda bias, load, gamma: bias - gamma * torch.sign(load.mean() - load), "wrong way")
    fails_with(lambda bias, load, gamma: bias + gamma * (load.mean() - load), "only its sign")
    fails_with(lambda bias, load, gamma: gamma * torch.sign(load.mean() - load), "returned the update")
    fails_with(lambda bias, load, gamma: bias + torch.sign(load.mean() - load), "gamma is missing")
    fails_with(lambda bias, load, gamma: bias + gamma * torch.where(load > load.mean(), -1.0, 1.0), "sign(0) = 0")
    fails_with(lambda bias, load, gamma: bias + gamma * torch.sign(load.max() - load), "largest load")


def test_update_bias_in_place_is_fine():
    def in_place(bias, load, gamma):
        bias += gamma * torch.sign(load.mean() - load)
        return bias
    assert CHECK.explain(in_place) is None


def test_an_unknown_mistake_is_described_not_guessed():
    def busiest_twice(bias, load, gamma):  # moves the busiest expert by 2 gamma: no known mistake
        step = torch.sign(load.mean() - load)
        step[load.argmax()] *= 2
        return bias + gamma * step
    message = CHECK.explain(busiest_twice)
    assert "1 of 8 biases moved by the wrong amount" in message and "expert 0 (load 40)" in message
    assert not any(m.message in message for m in CHECK.mistakes)


def test_show_hint_prints_the_full_hint(capsys):
    CHECK.show_hint()
    assert "torch.sign(load.mean() - load)" in capsys.readouterr().out
