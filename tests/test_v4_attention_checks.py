"""The checkers of notebooks 41-42 pass the reference and name each known mistake with its own message."""

import pytest

from helpers.teaching.checks import CheckFailure
from helpers.v4.checks import attention as checks

CHECKERS = {
    "sink_attention": (checks.check_sink_attention, checks.reference_sink_attention),
    "hca_pool": (checks.check_hca_pool, checks.reference_hca_pool),
    "csa_pool": (checks.check_csa_pool, checks.reference_csa_pool),
    "visible_entries": (checks.check_visible_entries, checks.reference_visible_entries),
}


@pytest.mark.parametrize("name", list(CHECKERS))
def test_reference_passes_and_every_mistake_is_named(name):
    checker, reference = CHECKERS[name]
    checker(reference)
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert audit[mistake.name] is not None and mistake.message in audit[mistake.name], mistake.name
    assert len(set(audit.values())) == len(audit)


@pytest.mark.parametrize("overlap, checker", [(False, checks.check_hca_pool), (True, checks.check_csa_pool)])
def test_mistake_switches_default_to_the_reference(overlap, checker):
    for case in checker.cases():
        want = checker.reference(**case.kwargs)
        assert (checks._pool_with(**case.kwargs, overlap=overlap) - want).abs().max() < 1e-6


def test_an_unknown_error_is_described_not_guessed():
    def off_by_a_bit(**kw):
        return checks.reference_hca_pool(**kw) * 1.01
    with pytest.raises(CheckFailure, match="values differ"):
        checks.check_hca_pool(lambda kv, gate, position_bias, ratio: off_by_a_bit(
            kv=kv, gate=gate, position_bias=position_bias, ratio=ratio))
