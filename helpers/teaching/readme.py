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
    floor_f = saved.get("floor forward", {}).get(str(tokens), {})  # the standard table's floors
    lines = [f"Hidden {layer['hidden_size']}, {layer['n_routed_experts']} routed experts of width "
             f"{layer['moe_intermediate_size']}, top-{layer['num_experts_per_tok']}, {layer['n_shared_experts']} "
             f"shared, {tokens} tokens, fp32; {saved['environment']}; medians of {saved['repeats']} interleaved "
             f"rounds after {saved['warmup']} warm-up. Time relative to the dense SwiGLU of width {width} (the "
             "same activated parameters and FLOPs per token):", "",
             "| variant | forward | forward+backward |" + (" forward, x floor |" if floor_f else ""),
             "|---|---:|---:|" + ("---:|" if floor_f else "")]
    base_f, base_b = fwd["dense SwiGLU"], bwd.get("dense SwiGLU")
    for name, label in MOE_NAMES.items():
        if name not in fwd:
            continue
        f = f"{fwd[name] / base_f:.2f}x" + (f" ({fwd[name]:.0f} ms)" if name == "dense SwiGLU" else "")
        b = (f"{bwd[name] / base_b:.2f}x" + (f" ({bwd[name]:.0f} ms)" if name == "dense SwiGLU" else "")
             if name in bwd and base_b else "-")
        x_floor = (f" {fwd[name] / floor_f[name]:.2f}x |" if name in floor_f else " - |") if floor_f else ""
        lines.append(f"| {label} | {f} | {b} |" + x_floor)
    sweep = {int(t): row for t, row in saved.get("sweep forward", {}).items()}
    if sweep:
        k, n_exp = layer["num_experts_per_tok"], layer["n_routed_experts"]
        parts = [f"{t} tokens ({t * k / n_exp:.0f} rows per expert on average): {row['ours'] / row['dense SwiGLU']:.2f}x"
                 for t, row in sorted(sweep.items())]
        lines += ["", "Ours against the dense SwiGLU, forward, across the sweep: " + "; ".join(parts) + "."]
    floors = {int(t): row for t, row in saved.get("floor forward", {}).items()}
    if sweep and floors:
        lines += ["", machine_line(saved["machine"]) + " Forward, median ms and (in brackets) the ratio to the "
                  "floor of the MoE layer's work:", "",
                  "| tokens | floor ms | " + " | ".join(MOE_SWEEP) + " |", "|---:|---:|" + "---:|" * len(MOE_SWEEP)]
        for t, row in sorted(sweep.items()):
            floor = floors.get(t, {}).get("ours")
            cells = [f"{row[n]:.2f} ({row[n] / floor:.1f}x)" if n in row and floor else "-" for n in MOE_SWEEP]
            lines.append(f"| {t} | {floor:.2f} | " + " | ".join(cells) + " |" if floor else f"| {t} | - |")
    return "\n".join(lines)


MOE_SWEEP = ("ours", "transformers eager", "transformers grouped_mm", "dense SwiGLU")


def machine_line(probes: dict[str, Any]) -> str:
    """The measured limits, and what a floor is."""
    return (f"Measured in the same run: fp32 GEMM {probes['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s "
            f"({probes['gemm_size']}^3), read bandwidth {probes['read_bytes_per_s'] / 1e9:.1f} GB/s; the floor of "
            "a piece of work is max(bytes it must read / bandwidth, FLOPs / GEMM rate).")


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
    floors = saved.get("floors_ms", {}).get("MLA absorbed", {})
    if floors:
        lines[-2] += " MLA absorbed, x floor |"
        lines[-1] += "---:|"
    for context in saved["contexts"]:
        x_floor = (f" {medians['MLA absorbed'][str(context)] / floors[str(context)]:.1f}x |"
                   if str(context) in floors else "")
        lines.append(f"| {context} | " + " | ".join(f"{medians[n][str(context)]:.1f}" for n in names) + " |" + x_floor)
    for batch, tables in saved.get("batched", {}).items():
        ms, fl = tables["medians_ms"]["MLA absorbed"], tables["floors_ms"].get("MLA absorbed", {})
        parts = [f"{c}: {ms[c]:.1f} ms ({ms[c] / fl[c]:.1f}x floor)" if c in fl else f"{c}: {ms[c]:.1f} ms" for c in ms]
        lines += ["", f"MLA absorbed at batch {batch}, per decode step by context: " + "; ".join(parts) + "."]
    if "machine" in saved:
        lines += ["", machine_line(saved["machine"]) + " For a decode step: every weight of the layer and the "
                  "whole cache must be read (`helpers.mla.bench.decode_work`)."]
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
