"""Training the miniature DeepSeek-V4 beside the miniature V3: same corpus, tokenizer, steps, batch, schedule.

The run is :mod:`helpers.model.train`'s (windows of the ``networkx`` sources, warm-up then cosine learning rate,
gradient clipping, validation every ``eval_every`` steps) with V4's model and two differences:

- **balancing**: V4's top-k MoE layers keep V3's auxiliary-loss-free bias (``b_i += gamma sign(mean - load_i)``
  after every step, V3 §2.1.2); the hash layers' experts are fixed by ``tid2eid``, so nothing is updated there.
  The loads are counted by :class:`RouterLoads` (a forward hook re-runs each layer's router on its input, under
  ``no_grad``), which also gives MaxVio per layer per step, hash layers included;
- **optimizer**: ``adamw`` (as V3) or ``muon`` (the V4 report, §2, trains most weights with Muon; here
  ``torch.optim.Muon``, 5 Newton-Schulz steps with fixed coefficients where V4 uses a 10-step hybrid schedule, for
  the 2-D weight matrices, with ``adjust_lr_fn="match_rms_adamw"`` so the same learning rate and weight decay apply;
  AdamW for the embedding, the output head, every 1-D parameter, the compressors' position biases and the fused
  3-D expert tensors, which ``torch.optim.Muon`` does not take).

Commands (the committed results were made by these, in this order)::

    python -m helpers.v4.train --threads 1 --steps 500 --eval-every 50 --out notebooks/results/tiny_deepseek_v4
    python -m helpers.v4.train --threads 1 --steps 500 --eval-every 50 --optimizer muon \
        --record notebooks/results/v4_muon_training.json
    python -m helpers.train --threads 1 --steps 500 --eval-every 50 --out /tmp/v3_500
    cp /tmp/v3_500/training.json notebooks/results/v4_v3_training.json
    python -m helpers.v4.train compare

The three training runs ran side by side, one thread each, on a shared 2-core machine. They are 500 steps, a
quarter of the committed V3 checkpoint's 2,000 (``python -m helpers.train``): the V3 miniature was retrained
for the same 500 steps (third command) so that all three curves share one schedule.

The first exports the AdamW-trained model (a ``DeepseekV4ForCausalLM`` checkpoint, a few MB) with its record
``training.json``; the second records the Muon run only; ``compare`` writes ``notebooks/results/v4_training.json``:
the V3 run's record (``notebooks/results/v4_v3_training.json``) beside both V4 runs, the activated parameters, and
the KV-cache bytes per token of both trained models measured from their cache tensors.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from helpers.model.data import batches, val_windows
from helpers.model.train import TrainSettings, _leave_text, evaluate, lr_at, prepare
from helpers.moe.balancing import max_violation, update_bias
from helpers.rules import require_choice
from helpers.utils import seed_everything
from helpers.v4.model import DeepSeekV4, tiny_v4_config
from helpers.v4.moe import V4MoE

OPTIMIZERS = ("adamw", "muon")
RESULTS = pathlib.Path("notebooks/results")


def model_config(vocab_size: int = 1024, **overrides):
    """The miniature V4 we train: 3 blocks (sliding window, CSA, HCA), MoE in each (hash, top-k, top-k: 8 routed
    top-2 + 1 shared of width 64, as the V3's MoE blocks), 4 residual streams; activated parameters within 10% of
    the miniature V3's (:func:`helpers.model.train.model_config`), measured in ``compare``."""
    fields = dict(vocab_size=vocab_size, hidden_size=96, moe_intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.5,
                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                  mlp_layer_types=["hash_moe", "moe", "moe"],
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                  hc_mult=4, sliding_window=32, o_groups=2, o_lora_rank=24, index_n_heads=6, index_head_dim=16,
                  index_topk=8, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    return tiny_v4_config(**fields)


class RouterLoads:
    """Tokens per expert of every V4 MoE layer during training, from a forward hook that re-runs its router.

    After each step: :meth:`max_vio` (MaxVio per layer, arXiv 2408.15664 eq. 4) and :meth:`update_biases` (the
    auxiliary-loss-free update of the top-k layers, V3 §2.1.2), which also clears the counts.
    """

    def __init__(self, layers: list[V4MoE]) -> None:
        self.layers = layers
        self.loads = [torch.zeros(layer.n_routed_experts) for layer in layers]
        self.handles = [layer.register_forward_hook(self._count(i)) for i, layer in enumerate(layers)]

    def _count(self, i: int):
        def hook(layer: V4MoE, args: tuple, output) -> None:
            if not layer.training:
                return
            x, ids = args[0], (args[1] if len(args) > 1 else None)
            with torch.no_grad():
                _, indices = layer.route(x.detach().reshape(-1, layer.hidden_size),
                                         None if ids is None else ids.reshape(-1))  # (T, k)
                self.loads[i] += torch.bincount(indices.flatten(), minlength=layer.n_routed_experts).float()
        return hook

    def max_vio(self) -> list[float]:
        return [max_violation(load).item() for load in self.loads]

    @torch.no_grad()
    def update_biases(self, gamma: float) -> None:
        for layer, load in zip(self.layers, self.loads):
            if not layer.is_hash:
                layer.bias.copy_(update_bias(layer.bias, load, gamma))
            load.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_optimizer(model: DeepSeekV4, name: str, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """AdamW alone (``"adamw"``, V3's groups: decay on matrices but the embedding), or Muon for the 2-D weight
    matrices plus AdamW for the rest (``"muon"``, see the module docstring)."""
    require_choice("optimizer", name, OPTIMIZERS)
    params = dict(model.named_parameters())
    muon = {n for n, p in params.items() if name == "muon" and p.dim() == 2
            and n not in ("embed.weight", "head.weight") and not n.endswith("position_bias")}
    decay = [p for n, p in params.items() if n not in muon and p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in params.items() if n not in muon and not (p.dim() >= 2 and "embed" not in n)]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95))]
    if muon:
        opts.append(torch.optim.Muon([params[n] for n in sorted(muon)], lr=settings.lr,
                                     weight_decay=settings.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return opts


def train(model: DeepSeekV4, train_ids: torch.Tensor, val_ids: torch.Tensor, settings: TrainSettings,
          optimizer: str = "adamw", progress: bool = True) -> dict:
    """Train ``model`` in place; the history has :func:`helpers.model.train.train`'s keys."""
    gen = seed_everything(settings.seed)
    opts = make_optimizer(model, optimizer, settings)
    windows = val_windows(val_ids, settings.seq_len, settings.eval_windows)
    loads = RouterLoads(model.moe_layers)
    hist: dict = {"step": [], "train_loss": [], "max_vio": [[] for _ in model.moe_layers], "val_step": [],
                  "val_loss": []}
    model.train()
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(settings.steps), desc=f"training V4 ({optimizer})", disable=not progress)
    for step in bar:
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
        x = batches(train_ids, settings.batch_size, settings.seq_len, gen)  # (B, T)
        loss = model.losses(x)["main"]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        for i, vio in enumerate(loads.max_vio()):
            hist["max_vio"][i].append(vio)
        loads.update_biases(settings.gamma)  # aux-loss-free balancing: every step
        tokens += x.numel()
        hist["step"].append(step)
        hist["train_loss"].append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            hist["val_step"].append(step)
            hist["val_loss"].append(evaluate(model, windows))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{hist['val_loss'][-1]:.3f}")
    bar.close()
    _leave_text(bar)
    loads.remove()
    hist["seconds"] = time.perf_counter() - start
    hist["tokens_per_s"] = tokens / hist["seconds"]
    model.eval()
    return hist


def record(settings: TrainSettings, hist: dict, optimizer: str, model: DeepSeekV4, command: str) -> dict:
    """What a run leaves behind: command, seed, time, final losses, settings, curves, parameters."""
    total, active = model.num_parameters()
    return {"command": command, "optimizer": optimizer, "seed": settings.seed, "seconds": round(hist["seconds"], 1),
            "threads": torch.get_num_threads(), "final_val_loss": hist["val_loss"][-1],
            "final_train_loss": hist["train_loss"][-1], "tokens_per_s": round(hist["tokens_per_s"], 1),
            "torch": torch.__version__, "settings": {k: v for k, v in asdict(settings).items() if k != "model"},
            "history": {k: hist[k] for k in ("val_step", "val_loss")},
            "train_loss_every_10": hist["train_loss"][::10], "max_vio_every_10": [m[::10] for m in hist["max_vio"]],
            "mlp_layer_types": list(model.config.mlp_layer_types), "layer_types": list(model.config.layer_types),
            "parameters": {"total": total, "activated": active}}


def readme_text(run: dict, name: str) -> str:
    """The checkpoint directory's README, every figure read from its record (``training.json``)."""
    s, p = run["settings"], run["parameters"]
    return "\n".join([
        f"# {name}: the DeepSeek-V4 miniature notebook 44 compares with V3",
        "",
        "Written by `helpers.v4.train` from `training.json` (the record of the run); do not edit by hand. Made by",
        "one command from the repository root (corpus and tokenizer of `helpers/model/data.py`):",
        "",
        f"    {run['command']}",
        "",
        "| field | value |",
        "|---|---|",
        f"| seed | {run['seed']} |",
        f"| optimizer | {run['optimizer']} |",
        f"| steps | {s['steps']} of {s['batch_size']} x {s['seq_len']} tokens, warm-up {s['warmup']}, "
        f"lr {s['lr']:g} -> {s['min_lr']:g} (cosine) |",
        f"| wall time | {run['seconds']:.0f} s on {run['threads']} thread(s), torch {run['torch']}, shared machine |",
        f"| final validation loss | {run['final_val_loss']:.3f} nats/token ({s['eval_windows']} fixed windows) |",
        f"| parameters | {p['total']:,} ({p['activated']:,} activated per token) |",
        "",
        "The directory is a `transformers` checkpoint: `DeepseekV4ForCausalLM.from_pretrained` loads it, and",
        "`helpers.v4.hf.load_v4_pretrained` loads it into our `DeepSeekV4`.",
        "",
    ])


def v4_settings(**overrides) -> TrainSettings:
    """V3's settings (:class:`helpers.model.train.TrainSettings`), without the MTP loss V4 does not train here."""
    return TrainSettings(**{"mtp_lambda": 0.0, **overrides})


@torch.no_grad()
def kv_bytes_per_token(model, n_tokens: int) -> float:
    """Bytes the model's decode caches hold per token after a prompt of ``n_tokens``, from the cache tensors."""
    caches = model.new_caches()
    model.hidden(torch.zeros(1, n_tokens, dtype=torch.long), caches)
    return sum(cache.nbytes() for cache in caches) / n_tokens


def compare(out: pathlib.Path = RESULTS / "v4_training.json") -> dict:
    """V3's record beside V4's two runs, activated parameters and KV bytes per token; written to ``out``."""
    from helpers.model.hf import load_pretrained
    from helpers.v4.hf import load_v4_pretrained

    v3_dir, v4_dir = RESULTS / "tiny_deepseek_v3", RESULTS / "tiny_deepseek_v4"
    runs = {"V3 AdamW": json.loads((RESULTS / "v4_v3_training.json").read_text()),
            "V4 AdamW": json.loads((v4_dir / "training.json").read_text()),
            "V4 Muon": json.loads((RESULTS / "v4_muon_training.json").read_text())}
    v3, v4 = load_pretrained(v3_dir), load_v4_pretrained(v4_dir)
    lengths = [128, 256, 512, 1024]
    summary = {
        "runs": {name: {k: r[k] for k in ("command", "seed", "seconds", "threads", "final_val_loss",
                                          "tokens_per_s", "history", "max_vio_every_10")}
                 | {"steps": r["settings"]["steps"], "optimizer": r.get("optimizer", "adamw")}
                 for name, r in runs.items()},
        "activated_parameters": {"V3": v3.num_parameters()[1], "V4": v4.num_parameters()[1]},
        "total_parameters": {"V3": v3.num_parameters()[0], "V4": v4.num_parameters()[0]},
        "kv_bytes_per_token": {"context": lengths,
                               "V3": [kv_bytes_per_token(v3, n) for n in lengths],
                               "V4": [kv_bytes_per_token(v4, n) for n in lengths]},
        "v4_mlp_layer_types": runs["V4 AdamW"]["mlp_layer_types"],
        "note": "All three runs: same corpus, tokenizer, seed, steps, batch, sequence length and learning-rate "
                "schedule; V3 trains its MTP module too (lambda 0.3, V3's default), V4 has none. The KV bytes are "
                "measured on the committed V3 checkpoint (tiny_deepseek_v3) and the V4 AdamW one. Wall times were "
                "measured with the runs side by side on a shared 2-core machine: they depend on its load.",
    }
    out.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.v4.train``: train the miniature V4 (see the module docstring)."""
    from helpers.inputs import non_negative_int, output_dir, output_path, positive_int

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["readme"]:  # rewrite a checkpoint's README from its training.json (no retraining)
        for d in map(pathlib.Path, argv[1:] or [RESULTS / "tiny_deepseek_v4"]):
            (d / "README.md").write_text(readme_text(json.loads((d / "training.json").read_text()), d.name))
            print("wrote", d / "README.md")
        return
    if argv[:1] == ["compare"]:
        summary = compare()
        print(json.dumps({k: summary[k] for k in ("activated_parameters", "kv_bytes_per_token")}, indent=1))
        return
    parser = argparse.ArgumentParser(prog="python -m helpers.v4.train", description=__doc__.split("\n\n")[0])
    defaults = v4_settings()
    for name in ("steps", "batch_size", "seq_len", "seed", "eval_every"):
        kind = non_negative_int if name == "seed" else positive_int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--out", type=output_dir, default=None, help="export the model and training.json here")
    parser.add_argument("--record", type=output_path, default=None, help="write only the run's record (JSON) here")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.record is None):
        parser.error("give exactly one of --out (export the model with its record) and --record (the record only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = v4_settings(**{k: v for k, v in vars(args).items() if k in TrainSettings.__dataclass_fields__})
    _, tokenizer, train_ids, val_ids = prepare(settings)
    seed_everything(settings.seed)
    model = DeepSeekV4(model_config(tokenizer.get_vocab_size()))
    settings.model = model.config.to_dict()
    total, active = model.num_parameters()
    print(f"model: {total:,} parameters ({active:,} activated per token); optimizer {args.optimizer}")
    hist = train(model, train_ids, val_ids, settings, args.optimizer)
    print(f"final validation loss {hist['val_loss'][-1]:.4f} nats, {hist['tokens_per_s']:.0f} tokens/s, "
          f"{hist['seconds']:.0f} s")
    run = record(settings, hist, args.optimizer, model, "python -m helpers.v4.train " + " ".join(argv))
    if args.out:
        from helpers.v4.hf import export_v4_pretrained

        out = pathlib.Path(args.out)
        export_v4_pretrained(model, out, tokenizer, metadata={"seed": settings.seed, "optimizer": args.optimizer,
                                                              "final_val_loss": f"{hist['val_loss'][-1]:.4f}"})
        (out / "training.json").write_text(json.dumps(run, indent=1))
        (out / "README.md").write_text(readme_text(run, out.name))
        print(f"wrote {out}/ (config.json, model.safetensors, tokenizer files, training.json, README.md)")
    else:
        pathlib.Path(args.record).write_text(json.dumps(run, indent=1))
        print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
