"""The expert-parallel layer on 2 and 4 gloo processes equals the single-process DeepSeekMoE."""

import time

import pytest
import torch

from helpers.parallel import ExpertLayout, launch
from helpers.parallel.__main__ import main
from helpers.parallel.check import DEFAULT, TOLERANCE, bias_update_worker, compare_worker, summary_line
from helpers.parallel.faults import dying_worker, mismatched_config_worker, ready_worker

GROUPED = dict(DEFAULT, n_group=4, topk_group=2)  # 12 experts in 4 groups of 3, 2 groups per token
PLAIN = dict(DEFAULT, n_shared_experts=0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("config", [DEFAULT, PLAIN, GROUPED], ids=["shared", "no-shared", "group-limited"])
def test_equal_to_one_process(world, config):
    result = launch(compare_worker, world, config, timeout=120)
    assert all(r["out"] <= TOLERANCE and r["grad"] <= TOLERANCE for r in result)
    assert sum(r["recv"] for r in result) == world * config["tokens"] * config["num_experts_per_tok"]


@pytest.mark.parametrize("world", [2, 4])
def test_an_expert_and_a_rank_without_tokens(world):
    last = ExpertLayout.contiguous(12, world).slots[-1]  # every expert of the last rank, and expert 0
    result = launch(compare_worker, world, DEFAULT, None, (0, *last), timeout=120)
    assert result[-1]["recv"] == 0 and all(r["send"][-1] == 0 for r in result)
    assert max(result[0]["out"], result[0]["grad"]) <= TOLERANCE


def test_a_rank_with_no_tokens_of_its_own():
    result = launch(compare_worker, 2, GROUPED, None, (), [7, 0], timeout=120)
    assert sum(result[1]["send"]) == 0 and result[1]["recv"] > 0
    assert max(result[0]["out"], result[0]["grad"]) <= TOLERANCE


def test_replicated_layout_gives_the_same_output():
    # 12 experts on 2 ranks of 8 slots: experts 0-3 have two copies, one on each rank
    slots = ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3, 8, 9, 10, 11))
    result = launch(compare_worker, 2, DEFAULT, slots, timeout=120)
    assert max(result[0]["out"], result[0]["grad"]) <= TOLERANCE
    assert all(r["recv"] > 0 for r in result)


def test_world_size_must_divide_the_experts():
    with pytest.raises(ValueError, match="n_routed_experts"):
        ExpertLayout.contiguous(10, 4)
    with pytest.raises(ValueError, match="n_routed_experts"):
        main(["check", "--nproc", "5"])


def test_layout_that_drops_an_expert_is_refused():
    with pytest.raises(ValueError, match="slots.*experts \\[3\\]"):
        ExpertLayout(4, ((0, 1), (2, 1)))
    with pytest.raises(ValueError, match="slots"):
        ExpertLayout(4, ((0, 1, 2), (3,)))


def test_mismatched_configs_across_ranks():
    with pytest.raises(ValueError, match="num_experts_per_tok differs across ranks"):
        launch(mismatched_config_worker, 2, DEFAULT, "num_experts_per_tok", 2, timeout=60)


def test_a_dead_rank_stops_the_run_within_seconds():
    assert launch(ready_worker, 2) == [0, 1]  # the first launch of a process starts the fork server
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 died \\(exit code 3\\)"):
        launch(dying_worker, 2, pg_timeout=60, timeout=60)
    assert time.monotonic() - start < 5  # the process group's timeout is 60 s


def test_check_command_prints_one_line(capsys):
    assert main(["check", "--nproc", "2", "--set", "n_group=3", "--set", "topk_group=2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("expert-parallel check: 2 processes, max|out diff| = ")
    with pytest.raises(ValueError, match="--set takes FIELD=INT"):
        main(["check", "--set", "experts=3"])


def test_summary_line_format():
    assert summary_line(3, 0.0, 1.5e-6) == ("expert-parallel check: 3 processes, max|out diff| = 0.00e+00, "
                                            "max|grad diff| = 1.50e-06")


def test_assign_slots_splits_a_hot_expert_between_its_copies():
    layout = ExpertLayout(3, ((0, 1), (0, 2)))  # expert 0 on both ranks
    slots = layout.assign_slots(torch.tensor([[0], [0], [1], [0], [2], [0]]))
    assert slots.tolist() == [0, 2, 1, 0, 3, 2]


def test_bias_update_uses_the_load_of_all_ranks():
    assert launch(bias_update_worker, 4, DEFAULT, timeout=60) == [0.0] * 4


def test_capstone_training_sharded_gives_the_same_losses():
    from helpers.parallel.training import compare_training_worker

    curves = launch(compare_training_worker, 2, 2, timeout=300)[0]
    assert len(curves["one process"]) == 2
    for a, b in zip(curves["one process"], curves["expert parallel"]):
        assert abs(a - b) <= TOLERANCE


def test_bad_input_is_refused_before_any_collective():
    from helpers.moe import DeepSeekMoE
    from helpers.parallel.layer import ExpertParallelMoE

    layer = ExpertParallelMoE.from_moe(DeepSeekMoE(16, 8, 4, 2))  # one process: no process group needed
    before = layer.load_since_update.clone()
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(3, 32))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((3, 16), float("nan")))
    torch.testing.assert_close(layer.load_since_update, before)
