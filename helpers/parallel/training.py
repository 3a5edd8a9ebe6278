"""The capstone model (:mod:`helpers.model`) trained with its experts sharded over N processes.

:func:`shard_experts` swaps every :class:`helpers.moe.DeepSeekMoE` of a model (main blocks and MTP
blocks) for this rank's :class:`~helpers.parallel.layer.ExpertParallelMoE`. A training step is then
expert parallelism for the routed experts and data parallelism for everything else: each rank takes
``B/N`` of the batch's windows, back-propagates ``loss / N``, sums the gradients of the replicated
parameters over the ranks (the routed experts' already hold every rank's tokens), clips by the
*global* gradient norm, steps AdamW, and updates the bias from the load of all ranks. The losses
equal those of one process on the whole batch (:func:`compare_training_worker`).

Not covered: the auxiliary losses (``seq_aux_loss_alpha`` must be 0; the default training uses the
bias alone) and evaluation/export of a sharded model (gather the experts first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.moe import Balancing, DeepSeekMoE
from helpers.parallel.layer import ExpertParallelMoE
from helpers.parallel.layout import ExpertLayout


def shard_experts(model: torch.nn.Module, rank: int, world: int, group=None) -> torch.nn.Module:
    """Replace every DeepSeekMoE in ``model`` by this rank's expert-parallel part, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DeepSeekMoE):
                if child.aux_loss_alpha or child.seq_aux_loss_alpha:
                    raise ValueError("seq_aux_loss_alpha and aux_loss_alpha must be 0 for expert-parallel training "
                                     "(the auxiliary losses are not sharded); balance with the bias (gamma)")
                layout = ExpertLayout.contiguous(child.n_routed_experts, world)
                setattr(module, name, ExpertParallelMoE.from_moe(child, layout, rank, group))
    return model


def _is_sharded(name: str) -> bool:
    return name.endswith((".ffn.w_gate_up", ".ffn.w_down"))


def sync_and_clip(model: torch.nn.Module, world: int, max_norm: float = 1.0) -> float:
    """Sum the replicated parameters' gradients over the ranks, then clip all by the global norm."""
    squares = torch.zeros(2, dtype=torch.float64)  # replicated, sharded
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if world > 1 and not _is_sharded(name):
            dist.all_reduce(p.grad)
        squares[int(_is_sharded(name))] += p.grad.double().pow(2).sum()
    if world > 1:
        sharded = squares[1:].clone()
        dist.all_reduce(sharded)
        squares[1] = sharded[0]
    norm = squares.sum().sqrt().item()
    scale = min(1.0, max_norm / (norm + 1e-6))  # what torch.nn.utils.clip_grad_norm_ does
    if scale < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def train_steps(model, windows: torch.Tensor, rank: int, world: int, steps: int, settings) -> list[float]:
    """``steps`` training steps on this rank's share of each batch; the main loss of each step (all ranks).

    Args:
        windows: (steps, B, T) token windows, the same on every rank.
        settings: a :class:`helpers.model.train.TrainSettings` (lr schedule, weight decay, MTP weight).
    """
    from helpers.model.train import lr_at

    per = windows.shape[1] // world
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        out = model.losses(windows[step, rank * per:(rank + 1) * per], settings.mtp_lambda)
        opt.zero_grad(set_to_none=True)
        (out["total"] / world).backward()
        sync_and_clip(model, world)
        opt.step()
        model.update_bias()
        main = out["main"].detach().clone()
        if world > 1:
            dist.all_reduce(main)
        losses.append(main.item() / world)
    return losses


def compare_training_worker(rank: int, world: int, steps: int = 3, batch_size: int = 4, seq_len: int = 32,
                            seed: int = 0) -> dict:
    """The miniature model trained ``steps`` steps in one process and sharded over the ranks, from the same
    seed and random token windows: both loss curves (every rank computes the one-process curve itself)."""
    from helpers.model.model import DeepSeekV3
    from helpers.model.train import TrainSettings, model_config

    settings = TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, warmup=2, seed=seed)
    config = model_config(vocab_size=256)
    windows = torch.randint(0, 256, (steps, batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    curves = {}
    for name, n in (("one process", 1), ("expert parallel", world)):
        torch.manual_seed(seed)
        model = DeepSeekV3(config, Balancing(gamma=settings.gamma))
        if n > 1:
            shard_experts(model, rank, n)
        curves[name] = train_steps(model, windows, rank if n > 1 else 0, n, steps, settings)
    return curves
