"""Training the miniature DeepSeek-V3 on the corpus of :mod:`helpers.model.data`, and its command line.

One step: a batch of random windows, the next-token loss plus ``lambda`` times the MTP loss (V3 eq. 25)
plus the optional sequence-wise balance loss (V3 eq. 17-20), AdamW, a linear warm-up then cosine decay
of the learning rate, and after every step the auxiliary-loss-free bias update of every MoE layer
(V3 §2.1.2). Logged: train loss, validation loss every ``eval_every`` steps, tokens/s, MaxVio per MoE layer.
Deterministic given the seed (one thread order of operations on a CPU; see :func:`helpers.utils.seed_everything`).

Command line (the committed checkpoint was made by the default command)::

    python -m helpers.train --out notebooks/results/tiny_deepseek_v3
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from helpers.model.data import batches, encode, load_corpus, train_tokenizer, val_windows
from helpers.model.model import DeepSeekV3
from helpers.moe import Balancing
from helpers.utils import seed_everything


def model_config(vocab_size: int = 1024, **overrides):
    """The miniature DeepSeek-V3 we train: 3 blocks (1 dense, 2 MoE: 8 routed top-2 + 1 shared), 1 MTP module."""
    from helpers.configs import tiny_config

    fields = dict(vocab_size=vocab_size, hidden_size=96, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
                  qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  first_k_dense_replace=1, max_position_embeddings=1024, num_mtp_layers=1,
                  bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    return tiny_config(**fields)


@dataclass
class TrainSettings:
    """Everything that determines a run (saved beside the checkpoint)."""

    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    mtp_lambda: float = 0.3
    gamma: float = 1e-3
    seq_aux_loss_alpha: float = 0.0
    vocab_size: int = 1024
    eval_every: int = 100
    eval_windows: int = 16
    seed: int = 0
    model: dict = field(default_factory=dict)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up over ``s.warmup`` steps, then cosine decay from ``s.lr`` to ``s.min_lr``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: DeepSeekV3, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows."""
    was_training = model.training
    model.eval()
    losses = [model.losses(windows[i: i + batch_size], mtp_lambda=0.0)["main"].item()
              for i in range(0, len(windows), batch_size)]
    model.train(was_training)
    return sum(losses) / len(losses)


def prepare(settings: TrainSettings, verbose: bool = True):
    """Corpus, tokenizer and token streams: ``(corpus, tokenizer, train_ids, val_ids)``."""
    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus.train.values(), settings.vocab_size)
    train_ids, val_ids = encode(tokenizer, corpus.train.values()), encode(tokenizer, corpus.val.values())
    if verbose:
        print(corpus.summary())
        print(f"tokenizer: byte-level BPE, {tokenizer.get_vocab_size()} tokens; "
              f"{len(train_ids):,} train tokens, {len(val_ids):,} validation tokens")
    return corpus, tokenizer, train_ids, val_ids


def train(model: DeepSeekV3, train_ids: torch.Tensor, val_ids: torch.Tensor, settings: TrainSettings,
          progress: bool = True) -> dict:
    """Train ``model`` in place; return the history (losses, lr, MaxVio per MoE layer, tokens/s).

    History keys: ``step``, ``train_loss``, ``mtp_loss``, ``max_vio`` (a list per MoE layer, per step),
    ``val_step``, ``val_loss``, ``tokens_per_s``, ``seconds``.
    """
    gen = seed_everything(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    windows = val_windows(val_ids, settings.seq_len, settings.eval_windows)
    moe = model.moe_layers
    hist: dict = {"step": [], "train_loss": [], "mtp_loss": [], "max_vio": [[] for _ in moe],
                  "val_step": [], "val_loss": []}
    model.train()
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(settings.steps), desc="training", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        x = batches(train_ids, settings.batch_size, settings.seq_len, gen)  # (B, T)
        out = model.losses(x, settings.mtp_lambda)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_bias()  # aux-loss-free balancing: every step
        tokens += x.numel()
        hist["step"].append(step)
        hist["train_loss"].append(out["main"].item())
        hist["mtp_loss"].append(out["mtp"].item())
        for i, layer in enumerate(moe):
            hist["max_vio"][i].append(layer.last_stats.max_vio.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            hist["val_step"].append(step)
            hist["val_loss"].append(evaluate(model, windows))
            bar.set_postfix(loss=f"{out['main'].item():.3f}", val=f"{hist['val_loss'][-1]:.3f}")
    bar.close()
    _leave_text(bar)
    hist["seconds"] = time.perf_counter() - start
    hist["tokens_per_s"] = tokens / hist["seconds"]
    model.eval()
    return hist


def _leave_text(bar) -> None:
    """In a notebook, replace the progress widget (whose saved text is its first state) by the finished bar."""
    try:
        from IPython import get_ipython
        from IPython.display import clear_output
    except ImportError:
        return
    if get_ipython() is not None and getattr(bar, "container", None) is not None:
        clear_output()
        print(str(bar))


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.train``: train the miniature model and export it (a ``from_pretrained`` directory)."""
    from helpers.inputs import non_negative_float, non_negative_int, output_dir, positive_float, positive_int

    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.split("\n\n")[0])
    defaults = TrainSettings()
    for name in ("steps", "batch_size", "seq_len", "seed", "vocab_size", "eval_every"):
        kind = non_negative_int if name == "seed" else positive_int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    for name in ("lr", "mtp_lambda", "gamma", "seq_aux_loss_alpha"):
        kind = positive_float if name == "lr" else non_negative_float
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--out", type=output_dir, default="notebooks/results/tiny_deepseek_v3",
                        help="export directory (its parent must exist)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in TrainSettings.__dataclass_fields__})
    _, tokenizer, train_ids, val_ids = prepare(settings)
    seed_everything(settings.seed)
    config = model_config(tokenizer.get_vocab_size())
    model = DeepSeekV3(config, Balancing(gamma=settings.gamma, seq_aux_loss_alpha=settings.seq_aux_loss_alpha))
    settings.model = config.to_dict()
    total, active = model.num_parameters(include_mtp=True)
    print(f"model: {total:,} parameters ({active:,} activated per token), MTP included")
    hist = train(model, train_ids, val_ids, settings)
    print(f"final validation loss {hist['val_loss'][-1]:.4f} nats, {hist['tokens_per_s']:.0f} tokens/s, "
          f"{hist['seconds']:.0f} s")
    command = "python -m helpers.train " + " ".join(sys.argv[1:] if argv is None else argv)
    save(model, tokenizer, settings, hist, args.out, argv_line=command)


def save(model, tokenizer, settings: TrainSettings, hist: dict, out: str | pathlib.Path, argv_line: str) -> None:
    """Export ``model`` (with tokenizer) and write ``training.json`` (settings, seed, time, losses) beside it."""
    from helpers.model.hf import export_pretrained

    out = pathlib.Path(out)
    export_pretrained(model.eval(), out, tokenizer,
                      metadata={"seed": settings.seed, "final_val_loss": f"{hist['val_loss'][-1]:.4f}"})
    record = {"command": argv_line.strip(), "seed": settings.seed, "seconds": round(hist["seconds"], 1),
              "threads": torch.get_num_threads(), "final_val_loss": hist["val_loss"][-1],
              "tokens_per_s": round(hist["tokens_per_s"], 1), "torch": torch.__version__,
              "settings": {k: v for k, v in asdict(settings).items() if k != "model"},
              "history": {k: hist[k] for k in ("val_step", "val_loss")},
              "train_loss_every_10": hist["train_loss"][::10],
              "max_vio_every_10": [m[::10] for m in hist["max_vio"]],
              "parameters": parameter_counts(model)}
    (out / "training.json").write_text(json.dumps(record, indent=1))
    write_readme(out)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, training.json, README.md)")


def parameter_counts(model: DeepSeekV3) -> dict[str, int]:
    """Total and activated-per-token parameters, with and without the MTP modules (recorded in training.json)."""
    total, active = model.num_parameters(include_mtp=True)
    total_main, active_main = model.num_parameters(include_mtp=False)
    return {"total_with_mtp": total, "activated_with_mtp": active, "total": total_main, "activated": active_main}


def readme_text(directory: str | pathlib.Path) -> str:
    """The README of a checkpoint directory, every figure read from its ``training.json`` (and ``config.json``).

    A record without ``parameters`` (written before they were recorded) gets them counted from the
    directory's model (:func:`helpers.model.hf.load_pretrained`).
    """
    directory = pathlib.Path(directory)
    path = directory / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: write the checkpoint with `python -m helpers.train --out "
                                f"{directory}` (it records the run there)")
    record = json.loads(path.read_text())
    counts = record.get("parameters")
    if counts is None:
        from helpers.model.hf import load_pretrained
        counts = parameter_counts(load_pretrained(directory))
    s = record["settings"]
    minutes = record["seconds"] / 60
    tokens = s["steps"] * s["batch_size"] * s["seq_len"]
    return "\n".join([
        f"# {directory.name}: the checkpoint notebooks 31 and 32 load",
        "",
        "Written by `helpers.model.train.write_readme` from `training.json` (the record of the run); do not edit by",
        "hand. Made by one command from the repository root (the corpus is the `networkx` sources, see",
        "`helpers/model/data.py`):",
        "",
        f"    {record['command']}",
        "",
        "| field | value |",
        "|---|---|",
        f"| seed | {record['seed']} |",
        f"| steps | {s['steps']} of {s['batch_size']} x {s['seq_len']} tokens ({tokens:,} tokens), "
        f"warm-up {s['warmup']}, lr {s['lr']:g} -> {s['min_lr']:g} (cosine) |",
        f"| balancing | bias update every step, gamma {s['gamma']:g}; sequence-wise loss alpha "
        f"{s['seq_aux_loss_alpha']:g}; MTP lambda {s['mtp_lambda']:g} |",
        f"| wall time | {record['seconds']:.0f} s ({minutes:.1f} min) on {record['threads']} "
        f"thread{'s' if record['threads'] != 1 else ''}, "
        f"torch {record['torch']} |",
        f"| throughput | {record['tokens_per_s']:.0f} tokens/s (training steps and validation) |",
        f"| final validation loss | {record['final_val_loss']:.3f} nats/token ({s['eval_windows']} fixed windows of "
        f"{s['seq_len']} tokens from the held-out files) |",
        f"| parameters | {counts['total_with_mtp']:,} with the MTP module ({counts['activated_with_mtp']:,} "
        f"activated per token); {counts['total']:,} without ({counts['activated']:,} activated) |",
        "",
        "`training.json` holds the whole record (command, settings, validation loss every "
        f"{s['eval_every']} steps, training loss and MaxVio",
        "per MoE layer every 10 steps); `model.safetensors` repeats the seed and the final validation loss in its",
        "header. The directory is a `transformers` checkpoint: `DeepseekV3ForCausalLM.from_pretrained` loads it",
        "(call `helpers.model.hf.register_mtp_depth(n_layers)` first so the MTP layer is recognised), and",
        "`helpers.model.hf.load_pretrained` loads it into our model with its MTP module. Floating-point results of",
        "a re-run can differ in the last digits on another machine or thread count; the wall time depends on the",
        "machine and its load.",
        "",
    ])


def write_readme(directory: str | pathlib.Path) -> pathlib.Path:
    """Write ``README.md`` of an existing checkpoint directory from its ``training.json`` (no retraining).

    ``python -m helpers.model.train readme notebooks/results/tiny_deepseek_v3`` does the same from a shell.
    """
    path = pathlib.Path(directory) / "README.md"
    path.write_text(readme_text(directory))
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["readme"]:
        for d in sys.argv[2:] or ["notebooks/results/tiny_deepseek_v3"]:
            print("wrote", write_readme(d))
    else:
        main()
