"""Pictures and measurements for notebooks 30-32: training curves, MaxVio, expert specialisation.

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

from helpers.teaching.plotting import axes

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


def plot_specialisation(counts: torch.Tensor) -> None:
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
        ax.set_title(f"MoE layer {i + 1}: share of routings")
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
