"""The checker of notebook 13's exercise (the auxiliary-loss-free bias update)."""

import pytest
import torch
from nbload import load_notebook

from helpers.moe import checks as moe_checks

NB13 = "13_moe_load_balancing.ipynb"
STUB = "still the exercise stub"


def fails_with(checker, fn, *fragments):
    message = checker.explain(fn)
    assert message is not None, f"{checker.name} accepted a wrong function"
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in:\n{message}"


@pytest.fixture(scope="module")
def nb13():
    return load_notebook(NB13)



def test_update_bias_solution_passes_and_stub_fails(nb13):
    assert moe_checks.check_update_bias.explain(nb13.update_bias) is None
    fails_with(moe_checks.check_update_bias, load_notebook(NB13, exercise=True).update_bias, STUB)



def test_update_bias_mistakes():
    check = moe_checks.check_update_bias
    fails_with(check, lambda bias, load, gamma: bias - gamma * torch.sign(load.mean() - load), "wrong way")
    fails_with(check, lambda bias, load, gamma: bias + gamma * (load.mean() - load), "only its sign")
    fails_with(check, lambda bias, load, gamma: gamma * torch.sign(load.mean() - load), "returned the update")
    fails_with(check, lambda bias, load, gamma: bias + torch.sign(load.mean() - load), "gamma is missing")



def test_update_bias_in_place_is_fine():
    def in_place(bias, load, gamma):
        bias += gamma * torch.sign(load.mean() - load)
        return bias
    assert moe_checks.check_update_bias.explain(in_place) is None
