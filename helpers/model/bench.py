"""``python -m helpers.bench model``: the assembled model against ``transformers`` (training step and decode).

- training throughput: forward + backward + AdamW step, tokens/s, of our model, ``DeepseekV3ForCausalLM`` with
  eager and ``grouped_mm`` experts (eager attention, its best on a CPU), and a dense model with the same
  activated FFN width (``first_k_dense_replace = num_hidden_layers``, ``intermediate_size = (N_s + K_r) I``);
- decode: ms per new token (greedy, 32 new tokens) after prompts of the given lengths, ours absorbed and naive
  against ``transformers`` ``generate`` on the same weights; cache bytes per token from the tensors.

Variants are interleaved after warm-ups (:func:`helpers.bench.benchmark`); medians and ratios are printed
and optionally saved as JSON. Never a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from helpers.bench import benchmark, environment_line

ISSUE_CONFIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2,
                    n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, vocab_size=1024,
                    max_position_embeddings=20000, num_mtp_layers=0)
SMALL_CONFIG = dict(ISSUE_CONFIG, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, vocab_size=256)


def _step(model, ids, opt, hf: bool):
    def run():
        logits = model(ids).logits if hf else model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def training_benchmark(fields: dict, batch: int, seq: int, repeats: int, warmup: int):
    """Tokens/s of one training step for each variant; returns the :class:`helpers.bench.BenchResult`."""
    from transformers import DeepseekV3ForCausalLM

    from helpers.configs import tiny_config
    from helpers.model import DeepSeekV3
    from helpers.model.hf import model_to_hf

    torch.manual_seed(0)
    config = tiny_config(**fields)
    ours = DeepSeekV3(config).train()
    hf_eager = model_to_hf(ours).train()
    grouped_config = copy.deepcopy(hf_eager.config)
    grouped_config._experts_implementation = "grouped_mm"
    hf_grouped = DeepseekV3ForCausalLM(grouped_config).train()
    hf_grouped.load_state_dict(hf_eager.state_dict())
    dense_width = (config.n_shared_experts + config.num_experts_per_tok) * config.moe_intermediate_size
    dense = DeepSeekV3(tiny_config(**dict(fields, first_k_dense_replace=fields["num_hidden_layers"],
                                          intermediate_size=dense_width))).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    models = {"ours": (ours, False), "transformers eager": (hf_eager, True),
              "transformers grouped_mm": (hf_grouped, True), "dense, same activated": (dense, False)}
    variants = {name: _step(m, ids, torch.optim.AdamW(m.parameters(), lr=1e-4), hf) for name, (m, hf) in models.items()}
    return benchmark(variants, repeats=repeats, warmup=warmup,
                     config=dict(fields, batch=batch, seq=seq, step="forward+backward+AdamW"))


def decode_benchmark(fields: dict, contexts: list[int], new_tokens: int, repeats: int, warmup: int):
    """ms per new token for each prompt length: ``{context: BenchResult}``."""
    from helpers.configs import tiny_config
    from helpers.model import DeepSeekV3
    from helpers.model.hf import model_to_hf

    torch.manual_seed(0)
    ours = DeepSeekV3(tiny_config(**fields)).eval()
    hf = model_to_hf(ours)
    hf.generation_config.eos_token_id = None
    results = {}
    for context in contexts:
        ids = torch.randint(0, fields["vocab_size"], (1, context))
        variants = {"ours absorbed": lambda ids=ids: ours.generate(ids, new_tokens),
                    "ours naive": lambda ids=ids: ours.generate(ids, new_tokens, absorb=False),
                    "transformers": lambda ids=ids: hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)}
        with torch.no_grad():
            results[context] = benchmark(variants, baseline="transformers", repeats=repeats, warmup=warmup,
                                         config=dict(context=context, new_tokens=new_tokens))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench model", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer, hidden-64 config, for a quick look")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save", default=None, help="write the medians as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = SMALL_CONFIG if args.small else ISSUE_CONFIG
    print(environment_line())
    train = training_benchmark(fields, args.batch, args.seq, args.repeats, args.warmup)
    print(train)
    tokens = args.batch * args.seq
    for row in train.rows():
        print(f"{row['variant']:24s} {tokens / (row['median_ms'] / 1e3):10.0f} tokens/s")
    decode = decode_benchmark(fields, args.contexts, args.new_tokens, args.repeats, args.warmup)
    for context, result in decode.items():
        print(f"\nprompt {context} tokens, ms per new token:")
        for row in result.rows():
            print(f"  {row['variant']:14s} {row['median_ms'] / args.new_tokens:8.2f}  "
                  f"({1 / row['ratio']:.2f}x transformers' speed)")
    if args.save:
        out = {"environment": environment_line(), "config": fields,
               "train": {r["variant"]: {"median_ms": r["median_ms"], "tokens_per_s": tokens / (r["median_ms"] / 1e3)}
                         for r in train.rows()},
               "decode": {str(c): {r["variant"]: r["median_ms"] / args.new_tokens for r in res.rows()}
                          for c, res in decode.items()}}
        with open(args.save, "w") as f:
            json.dump(out, f, indent=1)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
