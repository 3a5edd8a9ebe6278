"""``python -m helpers.parallel check --nproc N [--set FIELD=INT ...]``: the expert-parallel layer on N
processes against the single-process layer; ends with one line and exits 1 if a difference exceeds 1e-5.

``python -m helpers.parallel train-check --nproc N --steps S``: the capstone model (``helpers.model``)
trained S steps with its experts sharded over N processes against one process (the same losses).

On one machine it starts the N processes itself. Under ``torchrun`` it joins the group torchrun made
(``--nproc`` is then ignored), on one machine or several::

    torchrun --standalone --nproc-per-node 4 -m helpers.parallel check
    # on each of 2 machines (the same command; HOST:29500 reachable from both):
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id moe-check -m helpers.parallel check
"""

from __future__ import annotations

import argparse
import sys

from helpers.inputs import positive_float, positive_int
from helpers.parallel.check import TOLERANCE, compare_worker, parse_sets, summary_line, validate
from helpers.parallel.launch import init_from_env, launch, under_torchrun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.parallel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare the expert-parallel layer with the single-process layer")
    check.add_argument("--nproc", type=positive_int, default=2, help="local processes (ignored under torchrun)")
    check.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                       help="override a config field, e.g. --set n_routed_experts=16 --set n_group=4")
    check.add_argument("--timeout", type=positive_float, default=120.0, help="seconds before the workers are stopped")
    train = sub.add_parser("train-check", help="train the capstone model sharded over N processes against one")
    train.add_argument("--nproc", type=positive_int, default=2, help="local processes (ignored under torchrun)")
    train.add_argument("--steps", type=positive_int, default=3)
    train.add_argument("--timeout", type=positive_float, default=600.0)
    args = parser.parse_args(argv)
    if args.command == "train-check":
        return train_check(args)
    config = parse_sets(args.set)  # ValueError naming the field; validate() below runs before any process starts
    if under_torchrun():
        import torch.distributed as dist
        rank, world = init_from_env()
        validate(config, world)
        result = compare_worker(rank, world, config)
        dist.destroy_process_group()
        if rank != 0:
            return 0 if max(result["out"], result["grad"]) <= TOLERANCE else 1
    else:
        world = args.nproc
        validate(config, world)
        result = launch(compare_worker, world, config, timeout=args.timeout)[0]
    print(summary_line(world, result["out"], result["grad"]))
    return 0 if max(result["out"], result["grad"]) <= TOLERANCE else 1


def train_check(args) -> int:
    """Print the main loss of each step for one process and for N; exit 1 if they differ by more than 1e-5."""
    from helpers.parallel.training import compare_training_worker

    if under_torchrun():
        import torch.distributed as dist
        rank, world = init_from_env()
        curves = compare_training_worker(rank, world, args.steps)
        dist.destroy_process_group()
    else:
        rank, world = 0, args.nproc
        curves = launch(compare_training_worker, world, args.steps, timeout=args.timeout)[0]
    one, sharded = curves["one process"], curves["expert parallel"]
    worst = max(abs(a - b) for a, b in zip(one, sharded))
    if rank == 0:
        for step, (a, b) in enumerate(zip(one, sharded)):
            print(f"step {step}: loss one process {a:.6f}, {world} processes {b:.6f}")
        print(f"expert-parallel training: {world} processes, {len(one)} steps, max|loss diff| = {worst:.2e}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
