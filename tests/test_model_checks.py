"""The model track's exercise checkers: each known mistake is named by its own message, the reference agrees
with the model's own code, and an unknown mistake is described without a guessed cause."""

import pytest
import torch

from helpers.model.checks import (
    _mtp_cases,
    accept_draft,
    check_accept_draft,
    check_mtp_depth,
    mtp_depth,
)
from helpers.teaching.checks import CheckFailure


@pytest.mark.parametrize("checker", [check_mtp_depth, check_accept_draft], ids=lambda c: c.name)
def test_every_known_mistake_gets_its_own_message(checker):
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert audit[mistake.name] is not None, f"{mistake.name} passes the checker"
        assert mistake.message in audit[mistake.name], f"{mistake.name} got another message: {audit[mistake.name]}"
    messages = [m.message for m in checker.mistakes]
    assert len(set(messages)) == len(messages)


def test_the_named_mistakes_cover_shifts_norms_and_cache_offsets():
    assert {"shift by k - 1", "shift by k + 1", "shift by 2k", "norms swapped", "halves swapped",
            "hidden states cut at the wrong end"} <= {m.name for m in check_mtp_depth.mistakes}
    assert {"accepted without verifying", "verified against the wrong position", "bonus token dropped",
            "rejected: draft's cache entry kept", "rejected: cache cropped one short",
            "cache length restarted at zero"} <= {m.name for m in check_accept_draft.mistakes}


def test_references_pass_and_print_a_tick(capsys):
    check_mtp_depth(mtp_depth)
    check_accept_draft(accept_draft)
    out = capsys.readouterr().out
    assert "✓ mtp_depth" in out and "✓ accept_draft" in out


def test_mtp_reference_is_the_models_own_mtp_forward():
    """On the model's own modules, depth 1 of the reference equals DeepSeekV3.mtp_forward."""
    from helpers.configs import tiny_config
    from helpers.model import DeepSeekV3

    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(num_mtp_layers=1)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        h = model.hidden(ids)
        (want,) = model.mtp_forward(ids, h)
        _, got = mtp_depth(model.mtp[0], model.embed, model.head, model.norm(h), ids, 1)
    torch.testing.assert_close(got, want)


def test_mtp_cases_put_depth_two_first_so_the_shifts_differ():
    first = _mtp_cases()[0].kwargs
    k, t = first["k"], first["input_ids"].shape[1]
    assert k == 2 and len({t - (k - 1), t - (k + 1), t - 2 * k, t - k}) == 4


def test_an_unknown_mistake_is_described_without_a_cause():
    def doubled(choice, draft, cache_length):
        tokens, keep = accept_draft(choice, draft, cache_length)
        return tokens, 2 * keep

    with pytest.raises(CheckFailure, match="expected") as failure:
        check_accept_draft(doubled)
    assert not any(m.message in str(failure.value) for m in check_accept_draft.mistakes)


def test_the_stub_is_reported_with_its_nudge():
    def stub(choice, draft, cache_length):
        raise NotImplementedError("Exercise")

    with pytest.raises(CheckFailure, match="still the exercise stub") as failure:
        check_accept_draft(stub)
    assert "check_accept_draft.show_hint()" in str(failure.value)
