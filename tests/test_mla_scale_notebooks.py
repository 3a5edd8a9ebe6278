"""Notebooks 23 and 24: the cache-size exercise and its checker, and what the notebooks read and claim."""

import json

import pytest
from nbload import NOTEBOOKS, load_notebook

from helpers.accounting import kv_cache_bytes, kv_cache_elements, kv_cache_elements_of
from helpers.configs import deepseek_v2, deepseek_v2_lite, deepseek_v3
from helpers.mla.checks.scale import _cases, check_sequence_cache_bytes, sequence_cache_bytes
from helpers.teaching.checks import CheckFailure
from helpers.teaching.exercises import strip_answers

NB23, NB24 = "23_mla_weight_absorption.ipynb", "24_mla_at_real_scale.ipynb"


def _sources(name: str, cell_type: str) -> list[str]:
    return [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == cell_type]


def test_reference_equals_the_accounting_helpers_on_real_configs():
    v3 = deepseek_v3()
    assert sequence_cache_bytes(v3, "MLA", 131072, "bf16", 8) == kv_cache_bytes(
        kv_cache_elements_of(v3), n_layers=61, tokens=131072, dtype="bf16")
    assert sequence_cache_bytes(v3, "MHA", 1, "fp32", 8) == 2 * 128 * 128 * 61 * 4
    assert sequence_cache_bytes(deepseek_v2(), "GQA", 3, "fp8", 8) == kv_cache_elements("GQA", n_kv_heads=8, head_dim=128) * 60 * 3
    assert sequence_cache_bytes(deepseek_v2_lite(), "MLA", 1, "bf16", 8) == 576 * 27 * 2


def test_notebook_24_solution_passes_and_its_stub_is_reported(capsys):
    assert check_sequence_cache_bytes(load_notebook(NB24).sequence_cache_bytes) is None
    assert "✓ sequence_cache_bytes passes all 4 checks" in capsys.readouterr().out
    with pytest.raises(CheckFailure, match="still the exercise stub") as failure:
        check_sequence_cache_bytes(load_notebook(NB24, exercise=True).sequence_cache_bytes)
    assert "check_sequence_cache_bytes.show_hint()" in str(failure.value)


def test_notebook_24_solution_equals_the_reference_on_real_configs():
    mine = load_notebook(NB24).sequence_cache_bytes
    for config in (deepseek_v3(), deepseek_v2(), deepseek_v2_lite()):
        for kind in ("MHA", "GQA", "MLA"):
            for dtype in ("fp32", "bf16", "fp8"):
                assert mine(config, kind, 4096, dtype, 8) == sequence_cache_bytes(config, kind, 4096, dtype, 8)


def test_every_cache_size_mistake_gets_its_own_message():
    audit = check_sequence_cache_bytes.audit()
    assert len(check_sequence_cache_bytes.mistakes) >= 6
    for mistake in check_sequence_cache_bytes.mistakes:
        assert audit[mistake.name] is not None, f"{mistake.name} passes the checker"
        assert mistake.message in audit[mistake.name], f"{mistake.name} got another message: {audit[mistake.name]}"
    names = {m.name for m in check_sequence_cache_bytes.mistakes}
    assert {"keys without values", "RoPE key per head", "RoPE key forgotten", "MLA as per-head keys and values",
            "n_h d_h instead of kv_lora_rank", "always fp32 bytes", "layers counted twice"} <= names


def test_cache_size_cases_have_sizes_that_all_differ():
    for case in _cases():
        c, kw = case.kwargs["config"], case.kwargs
        sizes = [c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank,
                 c.num_hidden_layers, kw["tokens"], kw["n_groups"]]
        assert len(set(sizes)) == len(sizes), case.description
        assert c.num_key_value_heads == c.num_attention_heads  # as in DeepSeek's configs
    assert len({case.kwargs["dtype"] for case in _cases()}) == 3 and {case.kwargs["kind"] for case in _cases()} == {
        "MHA", "GQA", "MLA"}


def test_exercise_nudges_give_no_code():
    for name, function in ((NB23, "def absorbed_attention"), (NB24, "def sequence_cache_bytes")):
        (source,) = [s for s in _sources(name, "code") if function in s]
        hints = [line for line in source.splitlines() if line.strip().startswith("# HINT:")]
        assert hints, name
        assert not any(token in line for line in hints for token in ("einsum", "=", "torch.", "BYTES_PER_ELEMENT["))


@pytest.mark.parametrize("name", [NB23, NB24])
def test_open_questions_have_answer_keys(name):
    text = "\n".join(_sources(name, "markdown"))
    stripped, regions = strip_answers(text)
    assert regions >= (2 if name == NB23 else 3)
    assert "Answer (instructors)" not in stripped


def test_notebook_23_plots_the_saved_benchmark_and_types_no_timing():
    code = "\n".join(_sources(NB23, "code"))
    assert 'load_saved("results/bench_mla.json")' in code and "plot_decode(saved" in code
    assert "FULL_RUN" not in code  # the full run is read from the saved file, not typed in
    markdown = "\n".join(_sources(NB23, "markdown"))
    assert "7x fewer" not in markdown and "7× fewer" not in markdown and "45x" not in markdown
    assert "576" in markdown and "multi-query" in markdown and "compute-bound" in markdown


def test_one_kv_cache_against_context_plot_lives_in_notebook_24():
    assert any("KV cache of one sequence against the context" in s for s in _sources(NB24, "code"))
    for name in ("00_why_deepseek_is_cheap.ipynb", NB23):
        code = "\n".join(_sources(name, "code"))
        assert "context length (tokens" not in code or "decode step" in code, name
        assert "KV cache of one sequence" not in code, name


def test_an_unknown_wrong_count_is_described_by_its_factor_without_a_cause():
    def three_times(config, kind, tokens, dtype, n_groups):
        return 3 * sequence_cache_bytes(config, kind, tokens, dtype, n_groups)

    with pytest.raises(CheckFailure, match="yours is 3 times the expected count") as failure:
        check_sequence_cache_bytes(three_times)
    assert not any(m.message in str(failure.value) for m in check_sequence_cache_bytes.mistakes)


def test_position_and_offset_mistakes_of_the_absorbed_attention_are_named_apart():
    """Positions restarting at zero, an offset applied twice and no mask agree on some cases: each is still named."""
    from helpers.mla.checks import check_absorbed_attention

    audit = check_absorbed_attention.audit()
    named = {m.name: m.message for m in check_absorbed_attention.mistakes}
    for name in ("causal offset ignored", "causal offset applied twice", "no causal mask", "mask off by one"):
        assert named[name] in audit[name], (name, audit[name])
