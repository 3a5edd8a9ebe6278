"""Write the README's benchmark figures from the saved results, so the README cannot drift from them.

``python -m helpers.teaching.readme README.md`` (run by ``make bench``) replaces each block between
``<!-- BEGIN name -->`` and ``<!-- END name -->`` with the text :data:`BLOCKS` builds from
``notebooks/results/``; a test checks that the committed README equals what this would write.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "results"
MOE_NAMES = {"dense SwiGLU": "dense SwiGLU (baseline)", "ours": "ours, `helpers.moe.DeepSeekMoE`",
             "transformers eager": "`transformers` `DeepseekV3MoE`, eager experts",
             "transformers grouped_mm": "`transformers` `DeepseekV3MoE`, `grouped_mm`",
             "naive loop": "naive loop (one token, one expert at a time)"}


def moe_block(saved: dict[str, Any]) -> str:
    """The MoE benchmark's configuration line, ratio table and sweep sentence."""
    layer = saved["layer"]
    fwd, bwd = saved["standard forward"], saved.get("standard forward+backward", {})
    tokens = max(int(t) for t in saved["sweep forward"]) if "sweep forward" in saved else None
    width = (layer["num_experts_per_tok"] + layer["n_shared_experts"]) * layer["moe_intermediate_size"]
    lines = [f"Hidden {layer['hidden_size']}, {layer['n_routed_experts']} routed experts of width "
             f"{layer['moe_intermediate_size']}, top-{layer['num_experts_per_tok']}, {layer['n_shared_experts']} "
             f"shared, {tokens} tokens, fp32; {saved['environment']}; medians of {saved['repeats']} interleaved "
             f"rounds after {saved['warmup']} warm-up. Time relative to the dense SwiGLU of width {width} (the "
             "same activated parameters and FLOPs per token):", "",
             "| variant | forward | forward+backward |", "|---|---:|---:|"]
    base_f, base_b = fwd["dense SwiGLU"], bwd.get("dense SwiGLU")
    for name, label in MOE_NAMES.items():
        if name not in fwd:
            continue
        f = f"{fwd[name] / base_f:.2f}x" + (f" ({fwd[name]:.0f} ms)" if name == "dense SwiGLU" else "")
        b = (f"{bwd[name] / base_b:.2f}x" + (f" ({bwd[name]:.0f} ms)" if name == "dense SwiGLU" else "")
             if name in bwd and base_b else "-")
        lines.append(f"| {label} | {f} | {b} |")
    sweep = {int(t): row for t, row in saved.get("sweep forward", {}).items()}
    if sweep:
        k, n_exp = layer["num_experts_per_tok"], layer["n_routed_experts"]
        parts = [f"{t} tokens ({t * k / n_exp:.0f} rows per expert on average): {row['ours'] / row['dense SwiGLU']:.2f}x"
                 for t, row in sorted(sweep.items())]
        lines += ["", "Ours against the dense SwiGLU, forward, across the sweep: " + "; ".join(parts) + "."]
    return "\n".join(lines)


def mla_block(saved: dict[str, Any]) -> str:
    """The MLA decode benchmark's configuration line and table (milliseconds per decode step)."""
    att, medians = saved["attention"], saved["medians_ms"]
    names = list(medians)
    lines = [f"Attention of hidden {att['hidden_size']}, {att['n_heads']} heads, d_c = {att['kv_lora_rank']}, "
             f"d_h = {att['qk_nope_head_dim']}, d_h^R = {att['qk_rope_head_dim']} (GQA with {saved['gqa_kv_heads']} "
             f"key/value heads), batch {saved['batch']}, {saved['dtype']}; {saved['environment']}; medians of "
             f"{saved['repeats']} interleaved rounds ({max(3, saved['repeats'] // 2)} from 8k tokens on) after "
             f"{saved['warmup']} warm-up. Milliseconds per decode step "
             "(one new token against a cache of `context` tokens):", "",
             "| context | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for context in saved["contexts"]:
        lines.append(f"| {context} | " + " | ".join(f"{medians[n][str(context)]:.1f}" for n in names) + " |")
    return "\n".join(lines)


BLOCKS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "moe-bench": ("bench_moe.json", moe_block),
    "mla-bench": ("bench_mla.json", mla_block),
}


def render(text: str, results: pathlib.Path = RESULTS) -> str:
    """``text`` with every block whose results file exists rewritten from it."""
    for name, (filename, build) in BLOCKS.items():
        path = results / filename
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(\n<!-- END {name} -->)", re.S)
        if path.exists() and pattern.search(text):
            body = build(json.loads(path.read_text()))
            text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=pathlib.Path)
    args = parser.parse_args(argv)
    args.readme.write_text(render(args.readme.read_text()))


if __name__ == "__main__":
    main()
