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


def test_environment_line_names_the_openmp_wait_policy_when_set(monkeypatch):
    from helpers.bench import environment_line

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in environment_line()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert environment_line().endswith(", OMP_WAIT_POLICY=PASSIVE")


def test_the_saved_moe_benchmarks_ran_under_the_policies_they_compare():
    """notebooks/results/bench_moe*.json (notebook 11, O.4): the same layer and token counts, default and PASSIVE."""
    import pathlib

    from helpers.moe import bench as bench_moe

    results = pathlib.Path(__file__).parent.parent / "notebooks" / "results"
    default, passive = (bench_moe.load_saved(results / name) for name in ("bench_moe.json", "bench_moe_passive.json"))
    assert "OMP_WAIT_POLICY" not in default["environment"]
    assert passive["environment"].endswith("OMP_WAIT_POLICY=PASSIVE")
    assert default["layer"] == passive["layer"] == bench_moe.STANDARD
    assert sorted(default["sweep forward"]) == sorted(passive["sweep forward"])
    assert {"ours", "ours, loop", "ours, sorted", "transformers grouped_mm"} <= set(passive["sweep forward"][1])


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variants"):
        benchmark({})
    with pytest.raises(ValueError, match="baseline"):
        benchmark({"a": lambda: None}, baseline="z")
    with pytest.raises(ValueError, match="repeats"):
        benchmark({"a": lambda: None}, repeats=0)


def test_moe_bench_runs_end_to_end_and_its_saved_file_draws(tmp_path, capsys):
    from helpers.moe import bench as bench_moe

    saved_path, plot_path = tmp_path / "moe.json", tmp_path / "moe.png"
    small = ["--set", "hidden_size=32", "--set", "moe_intermediate_size=16", "--set", "n_routed_experts=8",
             "--set", "num_experts_per_tok=2", "--set", "n_shared_experts=1"]
    bench_moe.main([*small, "--tokens", "16", "--sweep", "4", "8", "--repeats", "1", "--warmup", "0",
                    "--naive-max-tokens", "4", "--save", str(saved_path), "--plot", str(plot_path)])
    printed = capsys.readouterr().out
    assert "pass=forward+backward" in printed and "sweep, forward, median ms" in printed
    saved = bench_moe.load_saved(saved_path)
    variants = {"dense SwiGLU", "ours", "transformers eager", "transformers grouped_mm"}
    assert set(saved["standard forward"]) == variants == set(saved["standard forward+backward range"])
    sweep = saved["sweep forward+backward"]
    assert sorted(sweep) == [4, 8, 16] and set(sweep[4]) == variants | {"naive loop"} and set(sweep[8]) == variants
    assert all(ms > 0 for row in sweep.values() for ms in row.values())
    assert bench_moe.sweep_table(sweep).splitlines()[2].split()[-1] == "-"  # no naive loop at 8 tokens
    assert plot_path.stat().st_size > 0
    assert len(bench_moe.plot_sweep(saved["sweep forward"], sweep).axes) == 2
    assert "x floor" in printed and "GFLOP/s" in printed
    assert saved["machine"]["gemm_flops_per_s"] > 0 and saved["machine"]["read_bytes_per_s"] > 0
    for label in ("forward", "forward+backward"):
        floors = saved[f"floor {label}"]
        assert sorted(floors) == [4, 8, 16] and all(set(floors[t]) == set(sweep[t]) for t in floors)
        assert all(ms > 0 for row in floors.values() for ms in row.values())
    fig = bench_moe.plot_sweep(saved["sweep forward"], sweep, saved["floor forward"], saved["floor forward+backward"])
    assert "floor of the MoE layer" in [line.get_label() for line in fig.axes[0].get_lines()]
    assert saved["layer"]["n_routed_experts"] == 8


@pytest.mark.parametrize("bad", ["top_k=2", "n_routed_experts=eight", "n_routed_experts"])
def test_moe_bench_rejects_unknown_or_non_integer_fields(bad, capsys):
    from helpers.moe import bench as bench_moe

    with pytest.raises(SystemExit):
        bench_moe.main(["--set", bad])
    assert "expected FIELD=INT" in capsys.readouterr().err


def test_mla_bench_runs_end_to_end_and_its_saved_file_draws(tmp_path, capsys):
    from helpers.mla import bench as bench_mla

    saved_path = tmp_path / "mla.json"
    bench_mla.main(["--small", "--contexts", "8", "16", "--repeats", "1", "--warmup", "0", "--threads", "1",
                    "--save", str(saved_path)])
    printed = capsys.readouterr().out
    assert "naive/absorbed" in printed and f"saved to {saved_path}" in printed
    saved = bench_mla.load_saved(saved_path)
    assert saved["contexts"] == [8, 16] and saved["threads"] == 1 and saved["attention"] == bench_mla.SMALL_ATTENTION
    assert set(saved["versions"]) == {"torch", "transformers", "python"} and "threads" in saved["environment"]
    assert set(saved["medians_ms"]) == set(bench_mla.VARIANTS) == set(saved["ranges_ms"])
    for variant in bench_mla.VARIANTS:
        assert sorted(saved["medians_ms"][variant]) == [8, 16]  # context lengths read back as ints
        for context, (low, high) in saved["ranges_ms"][variant].items():
            assert 0 < low <= saved["medians_ms"][variant][context] <= high
    att = bench_mla.SMALL_ATTENTION
    assert saved["bytes_per_token"]["MLA absorbed"] == (att["kv_lora_rank"] + att["qk_rope_head_dim"]) * 4
    assert saved["machine"]["read_bytes_per_s"] > 0 and "x floor" in printed
    assert set(saved["floors_ms"]) == set(bench_mla.VARIANTS)
    assert all(sorted(f) == [8, 16] and min(f.values()) > 0 for f in saved["floors_ms"].values())
    batch8 = saved["batched"][8]  # the default --batches 8: the absorbed MLA alone
    assert set(batch8["medians_ms"]) == {"MLA absorbed"} and sorted(batch8["floors_ms"]["MLA absorbed"]) == [8, 16]
    ax = bench_mla.plot_decode(saved, "test")
    assert "floor of the absorbed MLA step" in [line.get_label() for line in ax.get_lines()]
    assert len(ax.get_lines()) >= len(bench_mla.VARIANTS) and ax.get_xscale() == "log"
    assert set(bench_mla.VARIANTS) < {t.get_text() for t in ax.get_legend().get_texts()}


def test_the_saved_mla_benchmark_loads_and_measured_the_v2_lite_sizes():
    """notebooks/results/bench_mla.json (what notebook 23 plots) is a complete run at V2-Lite's sizes."""
    import pathlib

    from helpers.mla import bench as bench_mla

    saved = bench_mla.load_saved(pathlib.Path(__file__).parent.parent / "notebooks" / "results" / "bench_mla.json")
    assert saved["attention"] == bench_mla.V2_LITE_ATTENTION
    assert all(sorted(saved["medians_ms"][v]) == saved["contexts"] for v in bench_mla.VARIANTS)
    assert saved["contexts"][-1] >= 8192


def test_floors_are_the_larger_of_reading_and_computing():
    from helpers import machine

    probes = {"gemm_flops_per_s": 1e11, "read_bytes_per_s": 1e10}
    assert machine.floor_seconds(1e9, 1e9, probes) == pytest.approx(0.1)  # bound by reading
    assert machine.floor_seconds(1e6, 1e11, probes) == pytest.approx(1.0)  # bound by arithmetic
    with pytest.raises(ValueError, match="bytes_read and flops"):
        machine.floor_seconds(-1, 0, probes)
    measured = machine.probe(gemm_size=64, read_bytes=2**20, repeats=1)
    assert measured["matvec_bytes_per_s"] > 0 and measured["skinny_gemm_flops_per_s"] > 0
    assert measured["gemm_flops_per_s"] > 0 and measured["read_bytes_per_s"] > 0
    assert "GFLOP/s" in machine.describe(measured)


def test_moe_work_counts_the_chosen_experts_and_the_dense_weights():
    from helpers.moe import bench as bench_moe

    fields = dict(hidden_size=4, moe_intermediate_size=2, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1)
    read, flops = bench_moe.moe_work(fields, tokens=3, hit_experts=5)
    assert read == 4 * (8 * 4 + 3 * 4 * 2 * (1 + 5) + 2 * 3 * 4)
    assert flops == 2 * 3 * 8 * 4 + 6 * 3 * 4 * 2 * 3
    dense_read, dense_flops = bench_moe.moe_work(fields, tokens=3, hit_experts=5, dense=True)
    assert dense_read == 4 * (3 * 4 * 6 + 2 * 3 * 4) and dense_flops == 6 * 3 * 4 * 6
    assert bench_moe.moe_work(fields, 3, 5, backward=True) == (3 * read, 3 * flops)
