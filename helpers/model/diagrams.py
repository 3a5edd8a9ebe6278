"""Pictures and measurements for notebooks 30-32: the model's block diagram, training curves, MaxVio, expert
specialisation (and how much the token class tells about the expert: :func:`class_expert_information`).

Expert specialisation: every BPE token of some Python source gets the class that Python's own
``tokenize`` module gives the character it starts with (``NAME``, ``keyword``, ``OP``, ``STRING``,
``COMMENT``, ``NUMBER``, ``whitespace``: newlines and indentation); the model routes the text, and for
each MoE layer we count how often each class goes to each routed expert.
"""

from __future__ import annotations

import io
import keyword
import token as token_module
import tokenize

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from helpers.teaching.plotting import axes

# Box colours: activations, weights (layers), the shared embedding and head, the MTP module's own layers.
_ACT, _LAYER, _SHARED, _MTP = "#ffffff", "#d7e3f4", "#f6c453", "#c9e7c4"


def _box(ax: plt.Axes, x: float, y: float, text: str, color: str, width: float = 2.6, height: float = 0.5) -> None:
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.03",
                                facecolor=color, edgecolor="black", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, linewidth=0.9, color="0.15"))


def draw_model(config) -> None:
    """The model's block diagram (left) and its MTP chain (right), drawn from ``config`` (V3 §2.1, §2.2).

    Left: embedding, ``num_hidden_layers`` pre-norm blocks (MLA, then a dense SwiGLU in the first
    ``first_k_dense_replace`` blocks and DeepSeekMoE after, each inside a residual), final RMSNorm, output head.
    Right: MTP module ``k`` (eq. 21-23): ``RMSNorm(Emb(t_{i+k}))`` and ``RMSNorm(h_i^{k-1})`` concatenated,
    projected by ``M_k``, one DeepSeekMoE block, a final RMSNorm and the shared head, predicting ``t_{i+k+1}``;
    ``h^k`` feeds depth ``k + 1``. Gold: the embedding and head that the MTP modules share with the main model.
    """
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6.2))
    for ax in (a, b):
        ax.set_xlim(0, 10)
        ax.set_ylim(-0.6, 11.2)
        ax.axis("off")
    dense, layers = config.first_k_dense_replace, config.num_hidden_layers
    a.set_title(f"main model: {layers} decoder blocks ({dense} dense, {layers - dense} MoE)")
    ys = [0, 1.2, 2.4, 3.4, 4.6, 5.6, 6.6, 7.6, 8.8, 9.8, 10.8]
    texts = ["token ids t_1 .. t_T", "Embedding (shared with MTP)", "RMSNorm (attn_norm)",
             "MLA (latent cache c^KV, k^R)", "RMSNorm (ffn_norm)",
             f"FFN: SwiGLU (blocks < {dense})\nor DeepSeekMoE (the rest)", "", "", "RMSNorm (norm)",
             "OutHead (head, shared)", "logits: P(t_{i+1})"]
    colors = [_ACT, _SHARED, _LAYER, _LAYER, _LAYER, _LAYER, _ACT, _ACT, _LAYER, _SHARED, _ACT]
    for i, (y, text, color) in enumerate(zip(ys, texts, colors)):
        if text:
            _box(a, 4.2, y, text, color, width=4.0, height=0.7 if "\n" in text else 0.5)
        if i and texts[i - 1] and text:
            _arrow(a, (4.2, ys[i - 1] + 0.3), (4.2, y - 0.3))
    _arrow(a, (4.2, 6.05), (4.2, 8.5))
    for top, bottom, label in ((3.65, 1.6, "+ residual"), (6.05, 4.1, "+ residual")):  # h = x + Attn(norm(x)), ...
        a.plot([4.2, 7.0, 7.0, 4.2], [bottom, bottom, top + 0.2, top + 0.2], color="0.4", lw=0.9)
        a.text(7.1, (top + bottom) / 2, label, fontsize=8, va="center")
    a.add_patch(FancyBboxPatch((1.9, 1.85), 6.9, 4.55, boxstyle="round,pad=0.05", fill=False, linestyle="--",
                               edgecolor="0.3"))
    a.text(2.0, 6.2, f"x {layers} blocks", fontsize=9, fontweight="bold")
    b.set_title("MTP module k (depth k of D): predicts t_{i+k+1}")
    _box(b, 2.2, 0, "h_i^{k-1}  (k = 1: main model\nafter its final norm)", _ACT, width=3.4, height=0.75)
    _box(b, 7.4, 0, "token t_{i+k}  (shifted by k)", _ACT, width=3.2)
    _box(b, 7.4, 1.2, "Embedding (shared)", _SHARED, width=3.2)
    _box(b, 2.2, 2.4, "RMSNorm (hnorm)", _MTP, width=3.0)
    _box(b, 7.4, 2.4, "RMSNorm (enorm)", _MTP, width=3.0)
    _box(b, 4.8, 3.8, "concat [emb half; hidden half]\n-> M_k (eh_proj, 2H -> H)   eq. 21", _MTP, width=5.0,
         height=0.75)
    _box(b, 4.8, 5.3, "TRM_k: one block (MLA + DeepSeekMoE)   eq. 22", _MTP, width=5.0)
    _box(b, 4.8, 6.6, "RMSNorm (post_norm)", _MTP, width=3.0)
    _box(b, 4.8, 7.9, "OutHead (shared)   eq. 23", _SHARED, width=3.0)
    _box(b, 4.8, 9.2, "P^k_i: logits for t_{i+k+1}", _ACT, width=3.6)
    _box(b, 8.3, 8.6, "h^k_i -> depth k + 1", _ACT, width=2.6)
    for start, end in (((2.2, 0.4), (2.2, 2.1)), ((7.4, 0.3), (7.4, 0.9)), ((7.4, 1.5), (7.4, 2.1)),
                       ((2.2, 2.7), (3.6, 3.4)), ((7.4, 2.7), (6.0, 3.4)), ((4.8, 4.2), (4.8, 5.0)),
                       ((4.8, 5.6), (4.8, 6.3)), ((4.8, 6.9), (4.8, 7.6)), ((4.8, 8.2), (4.8, 8.9)),
                       ((6.3, 6.6), (8.3, 8.3))):
        _arrow(b, start, end)
    fig.tight_layout()
    plt.show()


CLASSES = ("NAME", "keyword", "OP", "STRING", "COMMENT", "NUMBER", "whitespace")


def char_classes(source: str) -> list[str]:
    """The ``tokenize`` class of every character of ``source`` (``whitespace`` between tokens)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    classes = ["whitespace"] * len(source)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            name = token_module.tok_name[tok.type]
            if name == "NAME" and keyword.iskeyword(tok.string):
                name = "keyword"
            if name not in CLASSES:
                continue
            a = starts[tok.start[0] - 1] + tok.start[1]
            b = starts[tok.end[0] - 1] + tok.end[1]
            classes[a:b] = [name] * (b - a)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return classes


@torch.no_grad()
def expert_by_class(model, tokenizer, sources: list[str], max_tokens: int = 512) -> torch.Tensor:
    """``(n_moe_layers, len(CLASSES), n_routed_experts)`` counts: tokens of each class routed to each expert."""
    moe = model.moe_layers
    counts = torch.zeros(len(moe), len(CLASSES), model.config.n_routed_experts)
    model.eval()
    for source in sources:
        enc = tokenizer.encode(source)
        ids, offsets = enc.ids[:max_tokens], enc.offsets[:max_tokens]
        chars = char_classes(source)
        labels = []
        for a, b in offsets:
            span = [chars[i] for i in range(a, min(b, len(chars))) if not source[i].isspace()]
            labels.append(CLASSES.index(span[0]) if span else CLASSES.index("whitespace"))
        model(torch.tensor([ids]))
        label = torch.tensor(labels)
        for i, layer in enumerate(moe):
            chosen = layer.last_stats.indices  # (T, k)
            for j in range(chosen.shape[1]):
                counts[i].index_put_((label, chosen[:, j]), torch.ones(len(label)), accumulate=True)
    return counts


def class_expert_information(counts: torch.Tensor) -> list[float]:
    """Per MoE layer, the mutual information (bits) between a routing's token class and its expert.

    ``counts`` is :func:`expert_by_class`'s ``(layers, classes, experts)``. 0 means the expert tells nothing about
    the class (every class spread alike); its ceiling is ``log2`` of the number of classes or experts, whichever is
    smaller. Estimated from finite counts, it is above 0 even for routing that ignores the class: compare models.
    """
    out = []
    for c in counts:
        p = c / c.sum()  # (classes, experts) joint distribution of the routings
        independent = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
        terms = torch.where(p > 0, p * (p / independent.clamp(min=1e-30)).log2(), torch.zeros_like(p))
        out.append(terms.sum().item())
    return out


def plot_specialisation(counts: torch.Tensor, title: str = "") -> None:
    """One heatmap per MoE layer: share of each token class's routings that go to each expert."""
    n = counts.shape[0]
    fig, axs = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for i, ax in enumerate(axs[0]):
        share = counts[i] / counts[i].sum(dim=1, keepdim=True).clamp(min=1)
        im = ax.imshow(share, cmap="viridis", vmin=0, vmax=max(0.5, share.max().item()))
        ax.grid(False)
        ax.set_xticks(range(counts.shape[2]))
        ax.set_yticks(range(len(CLASSES)), CLASSES if i == 0 else [""] * len(CLASSES))
        ax.set_xlabel("routed expert")
        ax.set_title(f"{title}MoE layer {i + 1}: share of routings")
    fig.colorbar(im, ax=axs[0].tolist(), shrink=0.8, label="fraction of the class's routings")
    plt.show()


def plot_curves(steps, train_loss, val_steps, val_loss, max_vio, title: str) -> None:
    """Train and validation loss (nats) beside MaxVio per MoE layer, against the training step."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    a.plot(steps, train_loss, lw=1, label="train (batch)")
    a.plot(val_steps, val_loss, "o-", label="validation")
    a.set(title=f"{title}: loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    a.legend()
    for i, m in enumerate(max_vio):
        b.plot(steps[: len(m)], m, lw=1, label=f"MoE layer {i + 1}")
    b.set(title=f"{title}: MaxVio per MoE layer", xlabel="step", ylabel="MaxVio (0 = balanced)")
    b.legend()
    fig.tight_layout()
    plt.show()


def plot_speed(labels, ms_per_token, title: str) -> None:
    """A bar per decoding variant: median milliseconds per new token."""
    ax = axes(title=title, xlabel="decoding variant", ylabel="ms per new token (median)")
    ax.bar(labels, ms_per_token, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(labels)])
    plt.show()


def plot_benchmark(record: dict) -> None:
    """The saved ``python -m helpers.bench model`` record: decode split per context, training tokens/s.

    Left: ms per new token against the prompt length, one stacked bar (attention, MoE, rest) per variant
    and length. Right: training tokens/s per variant (forward + backward + AdamW step).
    """
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    contexts = list(record["decode"])
    variants = list(record["decode"][contexts[0]]["split_ms_per_token"])
    width = 0.8 / len(variants)
    parts = (("attention", "tab:blue"), ("moe", "tab:orange"), ("rest", "tab:gray"))
    for v, name in enumerate(variants):
        xs = [c + (v - (len(variants) - 1) / 2) * width for c in range(len(contexts))]
        bottom = [0.0] * len(contexts)
        for part, color in parts:
            heights = [max(0.0, record["decode"][c]["split_ms_per_token"][name][part]) for c in contexts]
            a.bar(xs, heights, width * 0.95, bottom=bottom, color=color, edgecolor="black", linewidth=0.4,
                  hatch=("", "//", "..")[v % 3], label=part if v == 0 else None)
            bottom = [x + h for x, h in zip(bottom, heights)]
        for x, top in zip(xs, bottom):
            a.text(x, top, name.replace("ours ", "").replace("transformers", "HF"), ha="center", va="bottom",
                   fontsize=7, rotation=90)
    a.set_xticks(range(len(contexts)), [f"{int(c):,}" for c in contexts])
    axes(title=f"decode: ms per new token ({record['new_tokens']} new tokens)", xlabel="prompt length (tokens)",
         ylabel="ms per new token (median)", ax=a)
    a.legend(title="time in", loc="upper left")
    names = list(record["train"])
    b.bar(range(len(names)), [record["train"][n]["tokens_per_s"] for n in names],
          color=["tab:blue", "tab:red", "tab:pink", "tab:green"][: len(names)])
    b.set_xticks(range(len(names)), [n.replace("transformers ", "HF\n").replace(", ", "\n") for n in names],
                 fontsize=8)
    batch, seq = record["train_batch"]
    axes(title=f"training step, {batch} x {seq} tokens", xlabel="variant", ylabel="tokens/s (median)", ax=b)
    fig.tight_layout()
    plt.show()


_V4_KINDS = {"sliding_attention": "sliding window", "compressed_sparse_attention": "CSA",
             "heavily_compressed_attention": "HCA"}


def draw_v4_model(config) -> None:
    """DeepSeek-V4's model (left) and one hyper-connection around a sub-layer (right), from ``config`` (V4 §2).

    Left: embedding, copied into ``hc_mult`` streams; ``num_hidden_layers`` blocks, each an attention (its kind from
    ``layer_types``) and an MoE (hash or top-k from ``mlp_layer_types``), each inside its own hyper-connection;
    the hyper head collapses the streams; final RMSNorm; output head. Right: ``X' = B X + C F(RMSNorm(A X))``
    with the three maps computed from the streams themselves (§2.2).
    """
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax in (a, b):
        ax.set_xlim(0, 10)
        ax.set_ylim(-0.6, 11.4)
        ax.axis("off")
    n, layers = config.hc_mult, config.num_hidden_layers
    a.set_title(f"DeepSeek-V4: {layers} blocks on {n} residual streams")
    schedule = "\n".join(f"block {i}: {_V4_KINDS[t]} + {'hash' if m == 'hash_moe' else 'top-k'} MoE"
                         for i, (t, m) in enumerate(zip(config.layer_types, config.mlp_layer_types)))
    rows = [(0, "token ids t_1 .. t_T", _ACT), (1.1, "Embedding", _SHARED),
            (2.2, f"copy into n_hc = {n} streams  (B, T, {n}, H)", _ACT),
            (3.5, "mHC( RMSNorm -> attention )", _LAYER), (4.8, "mHC( RMSNorm -> MoE(x, token ids) )", _LAYER),
            (7.9, "HyperHead: collapse the streams", _LAYER), (9.0, "RMSNorm (norm)", _LAYER),
            (10.1, "OutHead (head) -> logits", _SHARED)]
    for i, (y, text, color) in enumerate(rows):
        _box(a, 4.2, y, text, color, width=4.6)
        if i:
            _arrow(a, (4.2, rows[i - 1][0] + 0.3 + (1.1 if i == 5 else 0)), (4.2, y - 0.3))
    a.add_patch(FancyBboxPatch((1.7, 3.0), 5.0, 2.35, boxstyle="round,pad=0.05", fill=False, linestyle="--",
                               edgecolor="0.3"))
    a.text(1.8, 5.55, f"x {layers} blocks", fontsize=9, fontweight="bold")
    a.text(6.95, 4.15, schedule, fontsize=7.5, va="center", family="monospace")
    b.set_title("one hyper-connection:  X' = B X + C F(RMSNorm(A X))")
    for x in [1.0 + 0.5 * j for j in range(min(n, 4))]:
        b.plot([x, x], [0.2, 9.2], color="0.6", lw=2, zorder=0)
    b.text(0.6, -0.3, f"{n} streams X (each H wide)", fontsize=8.5)
    _box(b, 5.6, 1.3, "maps from vec(X): A = sigmoid(.) (pre),\nC = 2 sigmoid(.) (post), B = Sinkhorn(.) (comb)",
         _LAYER, width=6.0, height=0.8)
    _box(b, 4.2, 3.0, "collapse: A X  (B, T, H)", _ACT, width=3.4)
    _box(b, 4.2, 4.4, "RMSNorm, then F =\nattention or MoE", _LAYER, width=3.4, height=0.75)
    _box(b, 4.2, 5.9, "spread: C F (c_j on stream j)", _ACT, width=3.4)
    _box(b, 8.0, 5.9, "mix: B X (doubly\nstochastic)", _LAYER, width=2.6, height=0.75)
    _box(b, 6.1, 7.7, "add: X' = B X + C F  (B, T, n_hc, H)", _ACT, width=4.6)
    for start, end in (((3.3, 1.7), (3.6, 2.7)), ((4.2, 3.3), (4.2, 4.0)), ((4.2, 4.8), (4.2, 5.6)),
                       ((7.6, 1.7), (8.0, 5.5)), ((4.2, 6.2), (5.4, 7.4)), ((8.0, 6.3), (6.9, 7.4))):
        _arrow(b, start, end)
    fig.tight_layout()
    plt.show()


def plot_v4_training(summary: dict) -> None:
    """Validation loss of the V3 and V4 runs (left) and MaxVio of V4's MoE layers (right), from the saved record
    (``notebooks/results/v4_training.json``, written by ``python -m helpers.v4.train compare``)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    axes("validation loss, same data, steps and schedule", "step", "cross-entropy (nats/token)", ax=a)
    for name, run in summary["runs"].items():
        a.plot([s + 1 for s in run["history"]["val_step"]], run["history"]["val_loss"], marker=".", label=name)
    a.legend()
    axes("V4's MoE balance during training (AdamW run)", "step", "MaxVio (0 = balanced)", ax=b)
    run = summary["runs"]["V4 AdamW"]
    for i, (vio, kind) in enumerate(zip(run["max_vio_every_10"], summary["v4_mlp_layer_types"])):
        b.plot(range(0, 10 * len(vio), 10), vio, label=f"layer {i} ({'hash' if kind == 'hash_moe' else 'top-k'})")
    b.legend()
    fig.tight_layout()
    plt.show()


def plot_kv_bytes(summary: dict) -> None:
    """Decode-cache bytes per token of the trained V3 and V4 miniatures against the context length (measured from
    the cache tensors, ``notebooks/results/v4_training.json``)."""
    kv = summary["kv_bytes_per_token"]
    ax = axes("decode cache per token, measured", "context (tokens)", "bytes per token (all layers)")
    for name in ("V3", "V4"):
        ax.plot(kv["context"], kv[name], marker="o", label=f"{name} miniature")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.legend()
    plt.show()
