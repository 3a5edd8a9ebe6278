"""Commands validate every option before any work and never overwrite their input (issue 12).

Each row: (what the user typed, argv, words the error must contain). Argparse errors exit with status 2
and print the message on stderr; nothing is timed, trained or written.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest

from helpers.bench import main as bench_main
from helpers.mla.bench import summary
from helpers.model.train import main as train_main
from helpers.parallel.__main__ import main as parallel_main
from helpers.teaching.exercises import main as exercises_main
from helpers.teaching.site import main as site_main


def _refused(main, argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code) if info.value.code not in (None, 2) else capsys.readouterr().err
    assert info.value.code != 0
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


BENCH_BAD = [
    ("no suite", [], ["usage", "moe,mla,dsa,model"]),
    ("a mistyped suite", ["mo"], ["'mo'", "did you mean 'moe'"]),
    ("zero repeats", ["moe", "--repeats", "0"], ["--repeats", "positive integer", "0"]),
    ("negative tokens", ["moe", "--tokens", "-5"], ["--tokens", "-5"]),
    ("a word for a count", ["moe", "--tokens", "many"], ["--tokens", "'many'"]),
    ("a zero in the sweep", ["moe", "--sweep", "128", "0"], ["--sweep", "0"]),
    ("negative warm-up", ["moe", "--warmup", "-1"], ["--warmup", "non-negative"]),
    ("zero threads", ["moe", "--threads", "0"], ["--threads"]),
    ("an unknown --set field", ["moe", "--set", "experts=8"], ["--set", "n_routed_experts"]),
    ("an impossible layer", ["moe", "--set", "n_routed_experts=7", "--set", "n_group=2"],
     ["--set", "divisible by n_group"]),
    ("a save folder that does not exist", ["moe", "--save", "/no/such/folder/x.json"], ["--save", "does not exist"]),
    ("a plot path that is a folder", ["moe", "--plot", "."], ["--plot", "is a folder"]),
    ("zero contexts (mla)", ["mla", "--contexts", "0"], ["--contexts", "positive integer"]),
    ("negative repeats (mla)", ["mla", "--repeats", "-3"], ["--repeats"]),
    ("save folder missing (mla)", ["mla", "--save", "/no/such/x.json"], ["--save", "does not exist"]),
    ("zero top-k (dsa)", ["dsa", "--topk", "0"], ["--topk", "positive integer"]),
    ("a float context (dsa)", ["dsa", "--contexts", "1.5"], ["--contexts", "'1.5'"]),
    ("save folder missing (dsa)", ["dsa", "--save", "/no/such/x.json"], ["--save"]),
    ("zero batch (model)", ["model", "--batch", "0"], ["--batch", "positive integer"]),
    ("zero context (model)", ["model", "--contexts", "128", "0"], ["--contexts"]),
    ("negative new tokens (model)", ["model", "--new-tokens", "-1"], ["--new-tokens"]),
    ("save folder missing (model)", ["model", "--save", "/no/such/x.json"], ["--save", "does not exist"]),
]


@pytest.mark.parametrize(("what", "argv", "words"), BENCH_BAD, ids=[r[0] for r in BENCH_BAD])
def test_bench_refuses_before_timing(what, argv, words, capsys):
    _refused(bench_main, argv, words, capsys)


TRAIN_BAD = [
    ("zero steps", ["--steps", "0"], ["--steps", "positive integer"]),
    ("negative batch", ["--batch-size", "-8"], ["--batch-size", "-8"]),
    ("zero sequence length", ["--seq-len", "0"], ["--seq-len"]),
    ("negative seed", ["--seed", "-1"], ["--seed", "non-negative"]),
    ("zero vocabulary", ["--vocab-size", "0"], ["--vocab-size"]),
    ("zero eval interval", ["--eval-every", "0"], ["--eval-every"]),
    ("zero learning rate", ["--lr", "0"], ["--lr", "positive number"]),
    ("a word for the rate", ["--lr", "fast"], ["--lr", "'fast'"]),
    ("negative MTP weight", ["--mtp-lambda", "-0.3"], ["--mtp-lambda", "non-negative"]),
    ("negative gamma", ["--gamma", "-0.001"], ["--gamma"]),
    ("infinite balance weight", ["--seq-aux-loss-alpha", "inf"], ["--seq-aux-loss-alpha"]),
    ("zero threads", ["--threads", "0"], ["--threads"]),
    ("an export folder whose parent is missing", ["--out", "/no/such/parent/ckpt"], ["--out", "does not exist"]),
]


@pytest.mark.parametrize(("what", "argv", "words"), TRAIN_BAD, ids=[r[0] for r in TRAIN_BAD])
def test_train_refuses_before_training(what, argv, words, capsys):
    _refused(train_main, argv, words, capsys)


def test_train_refuses_a_file_as_export_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _refused(train_main, ["--out", str(tmp_path / "file")], ["--out", "not a folder"], capsys)


PARALLEL_BAD = [
    ("zero processes", ["check", "--nproc", "0"], SystemExit, ["--nproc", "positive integer"]),
    ("negative timeout", ["check", "--timeout", "-1"], SystemExit, ["--timeout", "positive number"]),
    ("zero steps", ["train-check", "--steps", "0"], SystemExit, ["--steps"]),
    ("no subcommand", [], SystemExit, ["check", "train-check"]),
    ("an unknown field", ["check", "--set", "experts=3"], ValueError, ["--set takes FIELD=INT", "n_routed_experts"]),
    ("a word for a field", ["check", "--set", "n_group=two"], ValueError, ["n_group", "'two'"]),
    ("experts not divisible by the processes", ["check", "--nproc", "5"], ValueError, ["n_routed_experts", "5"]),
    ("an impossible layer", ["check", "--set", "num_experts_per_tok=0"], ValueError, ["num_experts_per_tok"]),
    ("negative tokens", ["check", "--set", "tokens=-4"], ValueError, ["tokens", "-4"]),
    ("zero processes for training", ["train-check", "--nproc", "0"], SystemExit, ["--nproc"]),
]


@pytest.mark.parametrize(("what", "argv", "exc", "words"), PARALLEL_BAD, ids=[r[0] for r in PARALLEL_BAD])
def test_parallel_refuses_before_starting_processes(what, argv, exc, words, capsys):
    if exc is SystemExit:
        _refused(parallel_main, argv, words, capsys)
        return
    with pytest.raises(exc) as info:
        parallel_main(argv)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_site_refuses_missing_readme_and_file_as_folder(tmp_path, capsys):
    _refused(site_main, ["--readme", str(tmp_path / "nope.md")], ["--readme", "is not a file"], capsys)
    (tmp_path / "out").write_text("x")
    _refused(site_main, ["--out", str(tmp_path / "out")], ["--out", "not a folder"], capsys)


def test_mla_benchmark_never_says_met_for_a_goal_it_did_not_measure():
    rows = [dict(context=1024, variant=v, ms=1.0, bytes_per_token=96.0)
            for v in ("MHA", "GQA", "MLA naive", "MLA absorbed")]
    text = summary(rows, dict(kv_lora_rank=16, qk_rope_head_dim=8))
    assert "from 4096 on: faster at [], not measured (no context >= 4096)" in text


# ---- the exercise generator ------------------------------------------------------------------------------

def _notebook(folder: pathlib.Path, name: str, code: str, markdown: str = "# title") -> pathlib.Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), nbformat.v4.new_code_cell(code)]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name)
    return folder / name


GOOD = "def f(x):\n    # BEGIN SOLUTION\n    # HINT: double it\n    return 2 * x\n    # END SOLUTION\n"

EXERCISES_BAD = [
    ("destination equal to the source", "same", GOOD, None, ["dst", "same folder as src", "overwrite"]),
    ("destination inside the source", "inside", GOOD, None, ["dst", "inside src"]),
    ("source without notebooks", "empty", None, None, ["no notebooks"]),
    ("source that does not exist", "missing", None, None, ["src must be a folder"]),
    ("unclosed solution", "out", "# BEGIN SOLUTION\nx = 1\n", None, ["01_bad.ipynb, cell 1", "never closed"]),
    ("END without BEGIN", "out", "x = 1\n# END SOLUTION\n", None, ["01_bad.ipynb, cell 1, line 2", "without a"]),
    ("nested regions", "out", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", None, ["line 2", "nested"]),
    ("marker without its space", "out", "#BEGIN SOLUTION\nx = 1\n#END SOLUTION\n", None,
     ["01_bad.ipynb, cell 1, line 1", "malformed solution marker"]),
    ("lower-case marker", "out", "x = 0\n# begin solution\nx = 1\n", None, ["line 2", "malformed"]),
    ("code before the marker", "out", "x = 1  # BEGIN SOLUTION\n", None, ["line 1", "malformed"]),
    ("plural marker", "out", "# BEGIN SOLUTIONS\nx = 1\n# END SOLUTION\n", None, ["line 1", "malformed"]),
    ("unclosed answer key", "out", GOOD, "<!-- BEGIN ANSWER -->\nthe answer", ["01_bad.ipynb, cell 0", "never closed"]),
    ("malformed answer marker", "out", GOOD, "<!-- BEGIN ANSWER-->\nx\n<!-- END ANSWER -->",
     ["cell 0, line 1", "malformed answer marker"]),
    ("END ANSWER first", "out", GOOD, "<!-- END ANSWER -->\n<!-- BEGIN ANSWER -->", ["line 1", "without a"]),
]


@pytest.mark.parametrize(("what", "where", "code", "markdown", "words"), EXERCISES_BAD,
                         ids=[r[0] for r in EXERCISES_BAD])
def test_exercise_generator_refuses_and_writes_nothing(tmp_path, capsys, what, where, code, markdown, words):
    src = tmp_path / "notebooks"
    src.mkdir()
    before = {}
    if code is not None:
        _notebook(src, "00_good.ipynb", GOOD)
        _notebook(src, "01_bad.ipynb", code, markdown or "# title")
        before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = {"same": src, "inside": src / "exercises", "out": tmp_path / "exercises", "empty": tmp_path / "ex",
           "missing": tmp_path / "ex"}[where]
    source = tmp_path / "nowhere" if where == "missing" else src
    _refused(exercises_main, [str(source), str(dst)], words, capsys)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the solutions are untouched
    assert dst == src or not dst.exists()  # nothing written, not even the good notebook


def test_exercise_generator_converts_a_good_folder(tmp_path, capsys):
    src = tmp_path / "notebooks"
    _notebook(src, "00_good.ipynb", GOOD, "<!-- BEGIN ANSWER -->\nsecret\n<!-- END ANSWER -->")
    exercises_main([str(src), str(tmp_path / "exercises")])
    nb = nbformat.read(tmp_path / "exercises" / "00_good.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "NotImplementedError" in text and "2 * x" not in text and "secret" not in text
    assert "# HINT: double it" in text


def test_each_command_has_at_least_ten_bad_inputs():
    for table in (BENCH_BAD, TRAIN_BAD, PARALLEL_BAD, EXERCISES_BAD):
        assert len(table) >= 10
