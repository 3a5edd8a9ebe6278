import pytest

from helpers.bench import benchmark


def test_benchmark_interleaves_and_reports_medians_and_ratios():
    calls = []
    result = benchmark({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                       warmup=1, repeats=4, config={"tokens": 8})
    assert len(calls) == 2 * (1 + 4)
    timed = calls[2:]
    assert timed[:4] == ["a", "b", "b", "a"]  # round r starts at variant r mod n
    assert result.ratio("a") == pytest.approx(1.0)
    assert len(result.times["b"]) == 4
    table = result.table()
    assert "threads" in table and "tokens=8" in table and "x a" in table


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variants"):
        benchmark({})
    with pytest.raises(ValueError, match="baseline"):
        benchmark({"a": lambda: None}, baseline="z")
    with pytest.raises(ValueError, match="repeats"):
        benchmark({"a": lambda: None}, repeats=0)
