"""YaRN in miniature: train short, read long (DeepSeek-V3 §4.3's recipe on a tiny model).

A small DeepSeek-V3 (dense blocks, MLA with decoupled RoPE) is trained from scratch on windows of
``train_len`` tokens of the corpus of :mod:`helpers.model.data`. It is then evaluated on windows of
``eval_len = factor * train_len`` tokens, and the next-token loss is recorded at every position, three ways:

1. ``plain``: the same weights with plain RoPE, read past the length they were trained on;
2. ``yarn``: the same weights with YaRN (``factor``, ``original_max_position_embeddings = train_len``,
   ``beta_fast = 32``, ``beta_slow = 1``, ``mscale = mscale_all_dim = 1`` as in V3's config), no training;
3. ``yarn_finetuned``: the YaRN model after ``finetune_steps`` more steps on ``eval_len``-token windows, with
   as many tokens per step as in pre-training (V3 extends 4K -> 32K -> 128K with 1000 steps per phase; here
   one phase of a tenth of the pre-training steps and tokens).

And, so that the fine-tune's gain is not credited to YaRN alone, ``plain_finetuned``: the plain-RoPE model
fine-tuned the same way. Every run starts from the same seed; the JSON records seed, steps, settings, time.

Command line (one thread, seeded; about 3 minutes, 197 s on a busy 2-core machine)::

    python -m helpers.mla.yarn_experiment --out notebooks/results/yarn_experiment.json
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from helpers.model.data import val_windows
from helpers.model.model import DeepSeekV3
from helpers.model.train import TrainSettings, model_config, prepare, train
from helpers.utils import seed_everything


@dataclass
class ExperimentSettings:
    """Everything that determines the experiment (saved in the JSON)."""

    train_len: int = 64
    factor: int = 4
    steps: int = 600
    finetune_steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    vocab_size: int = 512
    eval_windows: int = 64
    seed: int = 0

    @property
    def eval_len(self) -> int:
        return self.factor * self.train_len


def small_config(s: ExperimentSettings, yarn: bool):
    """A two-block dense DeepSeek-V3 (MLA with ``d_h^R = 16``), plain RoPE or YaRN stretched ``s.factor`` times."""
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = dict(rope, rope_type="yarn", factor=float(s.factor), original_max_position_embeddings=s.train_len,
                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    return model_config(s.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        first_k_dense_replace=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_mtp_layers=0,
                        max_position_embeddings=s.eval_len, rope_parameters=rope)


def with_rope(model: DeepSeekV3, s: ExperimentSettings, yarn: bool) -> DeepSeekV3:
    """The same weights under another RoPE: YaRN has no parameters of its own, only frequencies and a scale."""
    other = DeepSeekV3(small_config(s, yarn))
    other.load_state_dict(model.state_dict())
    return other.eval()


@torch.no_grad()
def loss_by_position(model: DeepSeekV3, windows: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Mean next-token cross-entropy (nats) at each position ``0 .. T-2`` of ``windows (N, T)``."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1)
    for i in range(0, len(windows), batch_size):
        ids = windows[i: i + batch_size]  # (b, T)
        logits = model(ids)[:, :-1]  # (b, T-1, V)
        total += F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(0)  # (T-1,)
    return (total / len(windows)).tolist()


def run(s: ExperimentSettings, progress: bool = False) -> dict:
    """Train, evaluate the four variants; return the record the notebook plots."""
    start = time.perf_counter()
    _, _, train_ids, val_ids = prepare(TrainSettings(vocab_size=s.vocab_size), verbose=progress)
    base = TrainSettings(steps=s.steps, batch_size=s.batch_size, seq_len=s.train_len, lr=s.lr, min_lr=s.lr / 10,
                         warmup=s.steps // 20, mtp_lambda=0.0, vocab_size=s.vocab_size, eval_every=s.steps,
                         eval_windows=8, seed=s.seed)
    seed_everything(s.seed)
    model = DeepSeekV3(small_config(s, yarn=False))
    pre = train(model, train_ids, val_ids, base, progress=progress)
    windows = val_windows(val_ids, s.eval_len, s.eval_windows)  # (N, eval_len): the same windows for every curve
    tune = TrainSettings(**dict(asdict(base), steps=s.finetune_steps, seq_len=s.eval_len, lr=s.lr / 3,
                                batch_size=max(1, s.batch_size * s.train_len // s.eval_len),  # same tokens per step
                                warmup=max(1, s.finetune_steps // 10), eval_every=s.finetune_steps))
    curves, seconds = {}, {"pretrain": pre["seconds"]}
    for name, yarn in (("plain", False), ("yarn", True)):
        variant = with_rope(model, s, yarn)
        curves[name] = loss_by_position(variant, windows)
        tuned = copy.deepcopy(variant)
        seconds[f"{name}_finetune"] = train(tuned, train_ids, val_ids, tune, progress=progress)["seconds"]
        curves[f"{name}_finetuned"] = loss_by_position(tuned, windows)
    return {"command": "", "seed": s.seed, "settings": dict(asdict(s), eval_len=s.eval_len),
            "model": {k: v for k, v in small_config(s, yarn=True).to_dict().items()
                      if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                               "qk_nope_head_dim", "qk_rope_head_dim", "rope_parameters", "vocab_size")},
            "tokens": {"pretrain": s.steps * base.batch_size * base.seq_len,
                       "finetune": s.finetune_steps * tune.batch_size * tune.seq_len},
            "pretrain_final_val_loss": pre["val_loss"][-1], "loss_by_position": curves,
            "seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                        "total": round(time.perf_counter() - start, 1)},
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.mla.yarn_experiment --out notebooks/results/yarn_experiment.json``."""
    from helpers.inputs import non_negative_int, positive_int

    parser = argparse.ArgumentParser(prog="python -m helpers.mla.yarn_experiment",
                                     description=__doc__.split("\n\n")[0])
    defaults = ExperimentSettings()
    for name in ("train_len", "factor", "steps", "finetune_steps", "batch_size", "eval_windows", "seed"):
        kind = non_negative_int if name == "seed" else positive_int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: the same numbers every run)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("notebooks/results/yarn_experiment.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ExperimentSettings(**{k: v for k, v in vars(args).items() if k in ExperimentSettings.__dataclass_fields__})
    record = run(settings, progress=True)
    record["command"] = ("python -m helpers.mla.yarn_experiment " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    args.out.write_text(json.dumps(record, indent=1))
    curves, t = record["loss_by_position"], settings.train_len
    for name, losses in curves.items():
        short, long = sum(losses[:t - 1]) / (t - 1), sum(losses[t - 1:]) / len(losses[t - 1:])
        print(f"{name:16s} loss at positions < {t}: {short:.3f}   at positions >= {t}: {long:.3f}")
    print(f"wrote {args.out} ({record['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
