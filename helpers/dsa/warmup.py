"""The indexer's dense warm-up (DeepSeek-V3.2-Exp report, "dense warm-up stage" of continued pre-training).

Everything but the indexer is frozen and attention stays dense. The target for query ``t`` is the main
attention's distribution summed over heads and L1-normalised, ``p_{t,:}``; the loss is
``sum_t KL(p_{t,:} || Softmax(I_{t,:}))``, so the indexer learns to put its largest scores where the heads
put their attention mass. The indexer's inputs are detached: its loss trains only the indexer.
:func:`topk_recall` measures what the warm-up is for: the share of the attention mass the top-k keeps
(:func:`recall_curve`: for every k at once).

The second half runs the warm-up on the trained capstone model (notebooks 30-32): for each of its attention
layers, :func:`sparse_from_mla` builds a :class:`SparseLatentAttention` with the layer's trained MLA weights and
a fresh indexer, :func:`warm_up` trains the indexer alone on the hidden states that feed that layer when the
dense capstone reads training text, and :func:`capstone_warmup` measures recall before and after and the whole
model's validation loss with sparse attention (:func:`with_sparse_attention`) against dense. The saved run::

    python -m helpers.dsa.warmup --out notebooks/results/dsa_warmup.json    # seeded, one thread, a few minutes
"""

from __future__ import annotations

import pathlib

import torch
from torch import Tensor

from helpers.dsa.layer import SparseLatentAttention
from helpers.mla.cache import causal_mask


def attention_distribution(layer: SparseLatentAttention, x: Tensor) -> Tensor:
    """The main (dense) attention of ``x (B, T, H)`` from positions ``0..``, summed over heads, L1-normalised:
    ``(B, T, S=T)``; no gradient."""
    with torch.no_grad():
        q_nope, q_rope, c_kv, k_rope, _ = layer.attention_inputs(x)
        w_uk, _ = layer.up_projections()
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, n_h, d_c)
        scores = (torch.einsum("bthc,bsc->bths", q_latent, c_kv)
                  + torch.einsum("bthr,bsr->bths", q_rope, k_rope)) * layer.softmax_scale  # (B, T, n_h, S)
        visible = causal_mask(x.shape[1], x.shape[1], 0, x.device)  # (T, S)
        p = torch.softmax(scores.masked_fill(~visible[None, :, None], float("-inf")), dim=-1).sum(dim=2)  # (B, T, S)
        return p / p.sum(dim=-1, keepdim=True)


def indexer_log_probs(layer: SparseLatentAttention, x: Tensor, q_latent: Tensor | None = None) -> Tensor:
    """``log Softmax(I_{t,:})`` over the visible tokens, ``(B, T, S)``; differentiable in the indexer only.

    ``q_latent``: the compressed query ``c^Q (B, T, q_lora_rank)`` if already computed (it is frozen)."""
    x = x.detach()
    if q_latent is None:
        with torch.no_grad():
            q_latent = layer.q_norm(layer.wq_a(x))
    scores, _ = layer.indexer(x, q_latent.detach())  # (B, T, S)
    visible = causal_mask(x.shape[1], x.shape[1], 0, x.device)
    return torch.log_softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)


def indexer_kl_loss(layer: SparseLatentAttention, x: Tensor) -> Tensor:
    """Mean over queries of ``KL(p_{t,:} || Softmax(I_{t,:}))`` (V3.2 report, dense warm-up loss)."""
    return kl_to_target(attention_distribution(layer, x), indexer_log_probs(layer, x))


def kl_to_target(p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over queries of ``KL(p_{t,:} || q_{t,:})`` from ``p (B, T, S)`` and ``log q (B, T, S)``."""
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p)).sum(dim=-1)  # (B, T)
    return kl.mean()


def topk_recall(layer: SparseLatentAttention, x: Tensor, topk: int | None = None) -> float:
    """Share of the main attention's mass (summed over heads) on the indexer's top-k, averaged over the queries
    that see more than ``k`` tokens (the others keep everything)."""
    k = layer.index_topk if topk is None else topk
    p = attention_distribution(layer, x)  # (B, T, S)
    with torch.no_grad():
        log_q = indexer_log_probs(layer, x)
    idx = log_q.topk(min(k, x.shape[1]), dim=-1).indices  # (B, T, k)
    kept = p.gather(-1, idx).sum(dim=-1)  # (B, T)
    rows = torch.arange(x.shape[1], device=x.device) >= k  # queries that see more than k tokens
    return float(kept[:, rows].mean()) if rows.any() else 1.0


def recall_curve(p: Tensor, order: Tensor) -> Tensor:
    """Top-k recall for every ``k = 1..S`` at once: ``(S,)``, entry ``k - 1`` as :func:`topk_recall` gives it.

    Args:
        p: ``(B, T, S)`` the main attention's distribution (:func:`attention_distribution`), 0 on the future.
        order: ``(B, T, S)`` each query's tokens in the order a selector keeps them (best first), e.g.
            ``indexer_log_probs(...).argsort(-1, descending=True)``.
    """
    kept = p.gather(-1, order).cumsum(dim=-1)  # (B, T, S): mass kept by the first k of the order
    t, s = p.shape[1], p.shape[2]
    rows = torch.arange(t, device=p.device)[:, None] >= torch.arange(1, s + 1, device=p.device)[None, :]  # (T, k)
    per_k = (kept * rows).sum(dim=(0, 1)) / (rows.sum(dim=0) * p.shape[0]).clamp_min(1)  # (S,)
    return torch.where(rows.any(dim=0), per_k, torch.ones_like(per_k))  # k >= T: every query keeps everything


def recent_order(t: int, s: int, start_pos: int = 0) -> Tensor:
    """``(T, S)``: each query's visible tokens from the most recent back (the sliding window's order), then the
    future; query ``t`` sits at position ``start_pos + t``."""
    back = (start_pos + torch.arange(t))[:, None] - torch.arange(s)[None, :]  # (T, S) how far back s is
    return torch.where(back >= 0, back, s + back.abs()).argsort(dim=-1)


# ---------------------------------------------------------------- the warm-up on the trained capstone model
# ``python -m helpers.dsa.warmup --out notebooks/results/dsa_warmup.json`` (module :func:`main`): for every
# attention layer of the capstone (notebooks 30-32, ``notebooks/results/tiny_deepseek_v3``), our
# SparseLatentAttention with the layer's trained MLA weights and a fresh indexer; the indexer alone is trained
# with :func:`indexer_kl_loss` on the hidden states that feed that layer when the dense capstone reads
# training text; then recall before/after and the validation loss of the whole model with sparse attention.

INDEXER = dict(index_n_heads=4, index_head_dim=32)  # a small V3.2-like indexer for the capstone (d_I >= d_h^R 16)
TOPKS = (8, 16, 32, 64)


def sparse_from_mla(mla, index_topk: int, index_n_heads: int, index_head_dim: int,
                    seed: int = 0) -> SparseLatentAttention:
    """A :class:`SparseLatentAttention` holding ``mla``'s weights (a copy) and a fresh indexer (seeded).

    Raises ``ValueError`` naming ``q_lora_rank`` if ``mla`` has no query compression (the indexer reads ``c^Q``).
    """
    if mla.q_lora_rank is None:
        raise ValueError("mla.q_lora_rank is None: the lightning indexer reads the compressed query c^Q; "
                         "only an MLA layer with query compression can get an indexer")
    torch.manual_seed(seed)
    layer = SparseLatentAttention(
        mla.hidden_size, mla.n_heads, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
        mla.v_head_dim, mla.q_lora_rank, index_topk, index_n_heads, index_head_dim, rope_theta=mla.rope_theta,
        rope_interleave=mla.rope_interleave, rms_norm_eps=mla.rms_norm_eps).to(mla.wkv_a.weight.dtype)
    missing, unexpected = layer.load_state_dict(mla.state_dict(), strict=False)
    if unexpected or any(not name.startswith("indexer.") for name in missing):
        raise ValueError(f"mla's weights do not fit the sparse layer: missing {missing}, unexpected {unexpected}")
    return layer.requires_grad_(False)


class SparseBlockAttention(torch.nn.Module):
    """Stands in for a :class:`~helpers.model.DecoderBlock`'s ``attn`` (called ``attn(x, cache=, absorb=)``).

    ``mode``: ``"sparse"`` (the indexer's top-``k``), ``"dense"`` (the same layer, every visible token), or
    ``"recent"`` (the ``k`` most recent tokens, a sliding window: a control that needs no indexer).
    """

    def __init__(self, layer: SparseLatentAttention, mode: str = "sparse") -> None:
        super().__init__()
        if mode not in ("sparse", "dense", "recent"):
            raise ValueError(f"mode must be 'sparse', 'dense' or 'recent', got {mode!r}")
        self.layer, self.mode = layer, mode

    def forward(self, x: Tensor, cache=None, absorb: bool | None = None) -> Tensor:
        if cache is not None:
            raise ValueError("SparseBlockAttention runs whole windows only (cache=None): it measures the loss")
        if self.mode != "recent":
            return self.layer(x, sparse=self.mode == "sparse")
        from helpers.dsa.attention import sparse_absorbed_attention

        b, t, _ = x.shape
        k = min(self.layer.index_topk, t)
        idx = torch.arange(t, device=x.device)[:, None] - torch.arange(k, device=x.device)[None, :]  # (T, k)
        indices, valid = idx.clamp_min(0).expand(b, t, k), (idx >= 0).expand(b, t, k)  # (B, T, k) each
        q_nope, q_rope, c_kv, k_rope, _ = self.layer.attention_inputs(x)
        o = sparse_absorbed_attention(q_nope, q_rope, c_kv, k_rope, *self.layer.up_projections(),
                                      self.layer.softmax_scale, indices, valid)  # (B, T, n_h, d_v)
        return self.layer.wo(o.reshape(b, t, -1))  # (B, T, H)


def with_sparse_attention(model, layers: list[SparseLatentAttention], topk: int, mode: str = "sparse"):
    """A copy of the capstone ``model`` whose blocks attend through ``layers`` (one per block) at ``topk``."""
    import copy

    if len(layers) != len(model.layers):
        raise ValueError(f"layers has {len(layers)} entries, the model has {len(model.layers)} blocks: "
                         "give one SparseLatentAttention per block")
    sparse = copy.deepcopy(model)
    for block, layer in zip(sparse.layers, layers):
        layer = copy.deepcopy(layer)
        layer.index_topk = topk
        block.attn = SparseBlockAttention(layer, mode)
    return sparse


@torch.no_grad()
def attention_inputs_of(model, windows: Tensor) -> list[Tensor]:
    """``x (B, T, H)`` each block's attention receives (after its ``attn_norm``) when ``model`` reads ``windows``."""
    captured: list[Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
             for block in model.layers]
    try:
        model.hidden(windows)
    finally:
        for h in hooks:
            h.remove()
    return captured


def recent_recall(layer: SparseLatentAttention, x: Tensor, topk: int) -> float:
    """Like :func:`topk_recall`, for the ``topk`` most recent tokens instead of the indexer's choice."""
    p = attention_distribution(layer, x)  # (B, T, S)
    t = x.shape[1]
    dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # (T, S) how far back s is from t
    kept = (p * ((dist >= 0) & (dist < topk))).sum(-1)  # (B, T)
    rows = torch.arange(t) >= topk
    return float(kept[:, rows].mean()) if rows.any() else 1.0


def warm_up(layer: SparseLatentAttention, train_x: Tensor, steps: int, batch_size: int = 8, lr: float = 3e-3,
            seed: int = 0) -> list[float]:
    """Train ``layer.indexer`` alone with :func:`indexer_kl_loss` (Adam) on random batches of ``train_x (N, T, H)``.

    Returns the loss of every step.
    """
    layer.requires_grad_(False)
    with torch.no_grad():  # the frozen parts, once: the targets p (N, T, S) and the compressed queries c^Q
        targets = torch.cat([attention_distribution(layer, chunk) for chunk in train_x.split(32)])
        q_latent = layer.q_norm(layer.wq_a(train_x))  # (N, T, q_lora_rank)
    layer.indexer.requires_grad_(True)
    opt = torch.optim.Adam(layer.indexer.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(train_x), (batch_size,), generator=g)  # (b,) windows of this step
        opt.zero_grad()
        loss = kl_to_target(targets[i], indexer_log_probs(layer, train_x[i], q_latent[i]))  # = indexer_kl_loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    layer.indexer.requires_grad_(False)
    return losses


@torch.no_grad()
def validation_loss(model, windows: Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``windows (N, T)``."""
    import torch.nn.functional as F

    total = 0.0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w)  # (b, T, V)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return total / (len(windows) * (windows.shape[1] - 1))


def capstone_warmup(model, train_windows: Tensor, val_windows: Tensor, steps: int = 300, topks=TOPKS,
                    indexer: dict | None = None, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
                    verbose: bool = True) -> dict:
    """The whole experiment (see the comment above :data:`INDEXER`); a JSON-ready dict.

    Recall is measured on the validation windows' hidden states (the dense model's), for every layer and ``k``:
    the fresh indexer, the trained one, and the ``k`` most recent tokens. The validation loss is the whole
    model's with every layer sparse at ``k``: trained indexers, fresh (random) indexers, the most recent ``k``.
    """
    import time

    indexer = dict(INDEXER if indexer is None else indexer)
    model.eval()
    start = time.perf_counter()
    train_x, val_x = attention_inputs_of(model, train_windows), attention_inputs_of(model, val_windows)
    fresh = [sparse_from_mla(block.attn, max(topks), seed=seed + i, **indexer) for i, block in enumerate(model.layers)]
    trained = [sparse_from_mla(block.attn, max(topks), seed=seed + i, **indexer)
               for i, block in enumerate(model.layers)]
    layers = []
    for i, layer in enumerate(trained):
        losses = warm_up(layer, train_x[i], steps, batch_size, lr, seed + i)
        with torch.no_grad():
            kl = {"before": indexer_kl_loss(fresh[i], val_x[i]).item(), "after": indexer_kl_loss(layer, val_x[i]).item()}
        recall = {name: {str(k): fn(k) for k in topks} for name, fn in (
            ("before", lambda k, i=i: topk_recall(fresh[i], val_x[i], k)),
            ("after", lambda k, i=i, layer=layer: topk_recall(layer, val_x[i], k)),
            ("recent", lambda k, i=i: recent_recall(fresh[i], val_x[i], k)))}
        layers.append({"layer": i, "train_loss": losses, "val_kl": kl, "recall": recall})
        if verbose:
            print(f"layer {i}: KL on validation {kl['before']:.3f} -> {kl['after']:.3f}; recall at k="
                  + ", ".join(f"{k}: {recall['before'][str(k)]:.3f} -> {recall['after'][str(k)]:.3f}"
                              for k in topks), flush=True)
    loss = {"dense": validation_loss(model, val_windows)}
    for name, (source, mode) in {"trained": (trained, "sparse"), "random": (fresh, "sparse"),
                                 "recent": (fresh, "recent")}.items():
        loss[name] = {str(k): validation_loss(with_sparse_attention(model, source, k, mode), val_windows)
                      for k in topks}
    if verbose:
        print(f"validation loss: dense {loss['dense']:.4f}; " + "; ".join(
            f"k={k}: trained {loss['trained'][str(k)]:.4f}, random {loss['random'][str(k)]:.4f}, "
            f"recent {loss['recent'][str(k)]:.4f}" for k in topks))
    return {"indexer": indexer, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "topks": list(topks), "train_windows": list(train_windows.shape), "val_windows": list(val_windows.shape),
            "layers": layers, "val_loss": loss, "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads()}


CHECKPOINT = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "results" / "tiny_deepseek_v3"


def capstone_text(checkpoint: str | pathlib.Path = CHECKPOINT, seq_len: int = 128, n_train: int = 256,
                  n_val: int = 16, seed: int = 0, train_files: int | None = None) -> tuple[Tensor, Tensor]:
    """Token windows for the warm-up, encoded with the checkpoint's tokenizer: ``n_train`` windows at seeded random
    offsets of the training files (the first ``train_files`` of them, or all), and the ``n_val`` fixed validation
    windows the capstone's training evaluated on (:func:`helpers.model.data.val_windows`). Both ``(n, seq_len)``."""
    from tokenizers import Tokenizer

    from helpers.model.data import batches, encode, load_corpus, val_windows

    tokenizer = Tokenizer.from_file(str(pathlib.Path(checkpoint) / "tokenizer.json"))
    corpus = load_corpus()
    train_ids = encode(tokenizer, list(corpus.train.values())[:train_files])
    train = batches(train_ids, n_train, seq_len, torch.Generator().manual_seed(seed))
    return train, val_windows(encode(tokenizer, corpus.val.values()), seq_len, n_val)


def main(argv: list[str] | None = None) -> None:
    """``python -m helpers.dsa.warmup [--steps N] [--out FILE]``: the warm-up on the capstone checkpoint."""
    import argparse
    import json

    from helpers.model.hf import load_pretrained, pretrained_metadata

    checkpoint = CHECKPOINT
    parser = argparse.ArgumentParser(prog="python -m helpers.dsa.warmup", description=main.__doc__)
    parser.add_argument("--checkpoint", default=str(checkpoint))
    parser.add_argument("--steps", type=int, default=300, help="warm-up steps per layer")
    parser.add_argument("--train-windows", type=int, default=256, help="training windows of --seq-len tokens")
    parser.add_argument("--val-windows", type=int, default=16, help="validation windows (16, as training)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 (default): these tensors are too small to share")
    parser.add_argument("--out", default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pretrained(args.checkpoint)
    train, val = capstone_text(args.checkpoint, args.seq_len, args.train_windows, args.val_windows, args.seed)
    result = capstone_warmup(model, train, val, steps=args.steps, seed=args.seed)
    result["checkpoint"] = {"path": "notebooks/results/tiny_deepseek_v3", **pretrained_metadata(args.checkpoint)}
    result["command"] = "python -m helpers.dsa.warmup " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
