"""The miniature DeepSeek-V3 trained in simulated FP8 against the same run in FP32 (V3 §3.3, Appendix B.1).

Three runs from the same seed, the same initial weights and the same batches (``helpers.model.train.train``):

- ``fp32``: every GEMM in FP32 (the baseline);
- ``fp8``: V3's recipe (:func:`helpers.fp8.linear.to_fp8`): every linear layer's Fprop, Dgrad and Wgrad in E4M3
  with ``1 x b`` / ``b x b`` scales, experts included; embedding, head, router, norms and attention in FP32;
- ``fp8_router``: the same, with the router's ``u^T e_i`` also in FP8 (:class:`helpers.fp8.linear.GateInFP8`).

V3 reports the relative loss error of its FP8 runs against BF16 "consistently below 0.25%" (§3.3, Appendix
B.1, about 1T tokens). Ours is a few hundred steps of a model with 0.9M parameters, so it shows the size of the
effect at this scale, not V3's. Command (the committed JSON was made by the default command)::

    python -m helpers.fp8.train --out notebooks/results/fp8_training.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from contextlib import nullcontext

import torch

from helpers.fp8.linear import DEFAULT_BLOCK, GateInFP8, to_fp8
from helpers.model.model import DeepSeekV3
from helpers.model.train import TrainSettings, model_config, prepare, train
from helpers.moe import Balancing
from helpers.utils import seed_everything

RUNS = ("fp32", "fp8", "fp8_router")
DEFAULTS = dict(steps=300, batch_size=8, seq_len=128, warmup=30, eval_every=50, eval_windows=8, seed=0)
"""The committed run: 300 steps of 8 x 128 tokens (the capstone's schedule, shortened), validation every 50."""


def run(kind: str, settings: TrainSettings, train_ids: torch.Tensor, val_ids: torch.Tensor,
        block: int = DEFAULT_BLOCK) -> dict:
    """Train one fresh model of ``kind`` (one of :data:`RUNS`) from ``settings.seed``; return its history."""
    seed_everything(settings.seed)  # the same initial weights in every run
    model = DeepSeekV3(model_config(settings.vocab_size), Balancing(gamma=settings.gamma))
    if kind != "fp32":
        to_fp8(model, block)
    with GateInFP8(model, block) if kind == "fp8_router" else nullcontext():
        return train(model, train_ids, val_ids, settings, progress=False)


def relative_difference(loss: list[float], baseline: list[float]) -> list[float]:
    """``|L - L_fp32| / L_fp32`` step by step (the same batches in both runs)."""
    return [abs(a - b) / b for a, b in zip(loss, baseline)]


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.fp8.train``: the three runs, written to one JSON file."""
    from helpers.inputs import positive_int

    parser = argparse.ArgumentParser(prog="python -m helpers.fp8.train", description=__doc__.split("\n\n")[0])
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int if name != "seed" else int,
                            default=value)
    parser.add_argument("--block", type=positive_int, default=DEFAULT_BLOCK, help="FP8 tile width b")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--out", default="notebooks/results/fp8_training.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(**{k: getattr(args, k) for k in DEFAULTS})
    _, _, train_ids, val_ids = prepare(settings, verbose=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    hists = {}
    for kind in RUNS:
        hists[kind] = run(kind, settings, train_ids, val_ids, args.block)
        print(f"{kind:>10}: final train loss {hists[kind]['train_loss'][-1]:.4f}, validation "
              f"{hists[kind]['val_loss'][-1]:.4f}, {hists[kind]['seconds']:.0f} s")
    base = hists["fp32"]
    record = {
        "command": "python -m helpers.fp8.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": settings.seed, "steps": settings.steps, "batch_size": settings.batch_size,
        "seq_len": settings.seq_len, "block": args.block, "threads": args.threads, "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "settings": {k: v for k, v in vars(settings).items() if k != "model"},
        "runs": {kind: {"train_loss": h["train_loss"], "val_step": h["val_step"], "val_loss": h["val_loss"],
                        "seconds": round(h["seconds"], 1),
                        "relative_difference": relative_difference(h["train_loss"], base["train_loss"]),
                        "val_relative_difference": relative_difference(h["val_loss"], base["val_loss"])}
                 for kind, h in hists.items()},
    }
    path = pathlib.Path(args.out)
    path.write_text(json.dumps(record, indent=1))
    for kind in RUNS[1:]:
        diff = record["runs"][kind]["relative_difference"]
        tail = diff[len(diff) // 2:]
        print(f"{kind}: mean relative train-loss difference over the second half {100 * sum(tail) / len(tail):.3f}%, "
              f"final validation {100 * record['runs'][kind]['val_relative_difference'][-1]:.3f}%")
    print(f"wrote {path} ({record['seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s of CPU)")


if __name__ == "__main__":
    main()
