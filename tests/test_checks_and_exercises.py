import pathlib

import nbformat
import pytest
import torch

from helpers.teaching.checks import Case, Checker, CheckFailure, Mistake, describe_difference
from helpers.teaching.exercises import make_exercise_notebook, strip_answers, strip_solutions

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _softmax_rows(x):
    return x.softmax(dim=-1)


check_softmax = Checker(
    name="softmax_rows",
    cases=lambda: [Case("3x4 logits", {"x": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))})],
    reference=_softmax_rows,
    mistakes=[Mistake("wrong dim", lambda x: x.softmax(dim=0), "normalised over the wrong dimension: use dim=-1")],
    diagnose=lambda got, want, kw: f"row 0 sums to {got[0].sum():.2f}" if abs(got[0].sum() - 1) > 1e-3 else None,
    nudge="every row must sum to 1",
    hint="x.softmax(dim=-1)",
)


def test_checker_passes_a_correct_function(capsys):
    assert check_softmax(lambda x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)) is None  # no stray output
    assert "✓ softmax_rows" in capsys.readouterr().out


def test_checker_names_a_known_mistake():
    with pytest.raises(CheckFailure, match="wrong dimension"):
        check_softmax(lambda x: x.softmax(dim=0))


def test_checker_uses_the_diagnosis_then_the_difference():
    with pytest.raises(CheckFailure, match="row 0 sums to"):
        check_softmax(lambda x: x.exp())
    with pytest.raises(CheckFailure, match="largest difference"):
        check_softmax(lambda x: x.softmax(-1).flip(-1))  # rows sum to 1, values misplaced
    with pytest.raises(CheckFailure, match=r"shape \(3,\), expected \(3, 4\)"):
        check_softmax(lambda x: x.sum(-1))


def test_checker_reports_stub_and_crash():
    def stub(x):
        raise NotImplementedError("Exercise")
    with pytest.raises(CheckFailure, match=r"(?s)still the exercise stub.*First hint: every row.*show_hint") as info:
        check_softmax(stub)
    assert "x.softmax" not in str(info.value), "the stub message must not give the answer away"
    with pytest.raises(CheckFailure, match="raised ZeroDivisionError"):
        check_softmax(lambda x: 1 / 0)


def test_describe_difference_on_nested_outputs():
    a = (torch.ones(2), torch.tensor([1, 2]))
    assert describe_difference(a, (torch.ones(2), torch.tensor([1, 2]))) is None
    assert "output 1" in describe_difference(a, (torch.ones(2), torch.tensor([1, 3])))
    assert "returned 1 value" in describe_difference((torch.ones(2),), a)


SOLVED = """def f(x):
    y = 1
    # BEGIN SOLUTION
    # HINT: double it
    z = 2 * x
    # END SOLUTION
    return z"""


def test_answer_keys_are_removed_from_markdown():
    text = "Why?\n\n<!-- BEGIN ANSWER -->\n<details><summary>Answer</summary>Because.</details>\n<!-- END ANSWER -->\nNext."
    out, n = strip_answers(text)
    assert n == 1 and "Because" not in out and "full notebook" in out and out.endswith("Next.")
    with pytest.raises(ValueError, match="cell 2"):
        strip_answers("<!-- BEGIN ANSWER --> no end", where="demo.ipynb, cell 2")


def test_strip_solutions_keeps_hint_and_raises():
    out, n = strip_solutions(SOLVED)
    assert n == 1
    assert "2 * x" not in out and "# HINT: double it" in out
    assert "    raise NotImplementedError('Exercise: replace this line with your code')" in out
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="Exercise"):
        namespace["f"](3)


@pytest.mark.parametrize(("source", "problem"), [
    ("# BEGIN SOLUTION\nx = 1", "never closed"),
    ("# END SOLUTION", "without a"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION", "nested"),
])
def test_strip_solutions_rejects_broken_markers(source, problem):
    with pytest.raises(ValueError, match=problem):
        strip_solutions(source, where="demo.ipynb, cell 3")


def test_exercise_versions_of_every_notebook(tmp_path):
    """Every notebook converts; exercise notebooks have no outputs and no solution left."""
    notebooks = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    assert notebooks, "no notebooks found"
    total = 0
    for src in notebooks:
        total += make_exercise_notebook(src, tmp_path / src.name)
        nb = nbformat.read(tmp_path / src.name, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert not any("# BEGIN SOLUTION" in c.source or "BEGIN ANSWER" in c.source for c in nb.cells)
    if len(notebooks) > 1:
        assert total > 0, "the tracks should carry exercises"


def test_full_hint_on_request_and_short_display(capsys):
    check_softmax.show_hint()
    assert "x.softmax(dim=-1)" in capsys.readouterr().out
    failure = CheckFailure("softmax_rows is not right yet\n  rows do not sum to 1")
    (line,) = failure._render_traceback_()  # what Jupyter shows instead of a traceback
    assert "rows do not sum to 1" in line and "Traceback" not in line


def test_difference_names_nan_rows_and_differing_rows():
    want = torch.zeros(4, 3)
    got = want.clone()
    got[2] = float("nan")
    assert "NaN where the expected output is finite, in 1 of 4 entries along the first axis (2)" in \
        describe_difference(got, want)
    got = want.clone()
    got[1, 0], got[3, 2] = 1.0, -2.0
    message = describe_difference(got, want)
    assert "values differ in 2 of 4 entries along the first axis (1, 3)" in message
    assert "largest difference is 2 at index (3, 2)" in message


def test_audit_names_each_mistake():
    audit = check_softmax.audit()
    assert set(audit) == {m.name for m in check_softmax.mistakes}
    for mistake in check_softmax.mistakes:
        assert mistake.message in audit[mistake.name]


def test_exercise_folder_carries_what_the_notebooks_read(tmp_path):
    from helpers.teaching.exercises import main

    main([str(NOTEBOOKS), str(tmp_path / "exercises")])
    assert (tmp_path / "exercises" / "GLOSSARY.md").exists()
    for saved in (NOTEBOOKS / "results").glob("*.json"):
        assert (tmp_path / "exercises" / "results" / saved.name).read_text() == saved.read_text()
