"""The whole V4 model to and from ``transformers``' ``DeepseekV4ForCausalLM``; an export ``from_pretrained`` loads.

The pieces convert with the V4 tracks' functions (:mod:`helpers.v4.hf.attention`, :mod:`helpers.v4.hf.moe`,
:mod:`helpers.v4.hf.hyper`); this module adds what sits around them:

==================================  ==========================================================
ours (:class:`DeepSeekV4`)          ``transformers`` ``DeepseekV4ForCausalLM``
==================================  ==========================================================
``embed``                           ``model.embed_tokens``
``layers.i.attn_residual``          ``model.layers.i.attn_hc`` (``fn``, ``base``, ``scale``)
``layers.i.attn_norm``              ``model.layers.i.input_layernorm``
``layers.i.attn``                   ``model.layers.i.self_attn`` (table in :mod:`helpers.v4.hf.attention`)
``layers.i.ffn_residual``           ``model.layers.i.ffn_hc``
``layers.i.ffn_norm``               ``model.layers.i.post_attention_layernorm``
``layers.i.ffn``                    ``model.layers.i.mlp`` (table in :mod:`helpers.v4.hf.moe`; buffers ``tid2eid``,
                                    ``e_score_correction_bias`` included)
``hc_head``                         ``model.hc_head`` (``hc_fn``, ``hc_base``, ``hc_scale``)
``norm``, ``head``                  ``model.norm``, ``lm_head``
==================================  ==========================================================

The export writes ``transformers``' own tensor names (fused experts), which ``DeepseekV4ForCausalLM.from_pretrained``
loads with no missing or unexpected keys; V4 checkpoints carry no MTP weights ``transformers`` would use.
"""

from __future__ import annotations

import copy
import pathlib

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from helpers.v4.hf.attention import attention_from_hf, attention_to_hf
from helpers.v4.hf.hyper import head_from_hf, head_to_hf, hyper_from_hf, hyper_to_hf
from helpers.v4.hf.moe import v4_moe_from_hf, v4_moe_to_hf
from helpers.v4.model import DeepSeekV4, check_v4_config


def hf_v4_config(config: DeepseekV4Config) -> DeepseekV4Config:
    """A copy of ``config`` for ``transformers``' eager paths (the only attention V4 has; eager experts)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


@torch.no_grad()
def v4_model_from_hf(hf_model: DeepseekV4ForCausalLM) -> DeepSeekV4:
    """Our :class:`DeepSeekV4` with ``hf_model``'s weights, buffers and config, in its dtype and device, ``eval()``."""
    if not isinstance(hf_model, DeepseekV4ForCausalLM):
        raise ValueError(f"hf_model must be a DeepseekV4ForCausalLM, got {type(hf_model).__name__}")
    config = copy.deepcopy(hf_model.config)
    check_v4_config(config)
    weight = hf_model.lm_head.weight
    model = DeepSeekV4(config).to(device=weight.device, dtype=weight.dtype)
    model.embed.weight.copy_(hf_model.model.embed_tokens.weight)
    for i, (block, layer) in enumerate(zip(model.layers, hf_model.model.layers)):
        block.attn_residual.load_state_dict(hyper_from_hf(layer.attn_hc).state_dict())
        block.attn_norm.weight.copy_(layer.input_layernorm.weight)
        block.attn.load_state_dict(attention_from_hf(layer.self_attn, config, i).state_dict())
        block.ffn_residual.load_state_dict(hyper_from_hf(layer.ffn_hc).state_dict())
        block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
        block.ffn.load_state_dict(v4_moe_from_hf(layer.mlp, config, i).state_dict())
    model.hc_head.load_state_dict(head_from_hf(hf_model.model.hc_head).state_dict())
    model.norm.weight.copy_(hf_model.model.norm.weight)
    model.head.weight.copy_(hf_model.lm_head.weight)
    return model.eval()


@torch.no_grad()
def v4_model_to_hf(model: DeepSeekV4) -> DeepseekV4ForCausalLM:
    """A ``DeepseekV4ForCausalLM`` (eager attention and experts) with ``model``'s weights and buffers, ``eval()``."""
    if not isinstance(model, DeepSeekV4):
        raise TypeError(f"model must be our DeepSeekV4, got {type(model).__name__}: to convert a transformers "
                        "model the other way, use model_from_hf")
    config = hf_v4_config(model.config)
    weight = model.head.weight
    hf_model = DeepseekV4ForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    hf_model.model.embed_tokens.weight.copy_(model.embed.weight)
    for i, (block, layer) in enumerate(zip(model.layers, hf_model.model.layers)):
        layer.attn_hc.load_state_dict(hyper_to_hf(block.attn_residual, config).state_dict())
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        attention_to_hf(block.attn, layer.self_attn)
        layer.ffn_hc.load_state_dict(hyper_to_hf(block.ffn_residual, config).state_dict())
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        layer.mlp.load_state_dict(v4_moe_to_hf(block.ffn, config, i).state_dict())
    hf_model.model.hc_head.load_state_dict(head_to_hf(model.hc_head, config).state_dict())
    hf_model.model.norm.weight.copy_(model.norm.weight)
    hf_model.lm_head.weight.copy_(model.head.weight)
    return hf_model.eval()


@torch.no_grad()
def randomise(hf_model: DeepseekV4ForCausalLM, seed: int = 0) -> DeepseekV4ForCausalLM:
    """Every parameter and buffer of a ``DeepseekV4ForCausalLM`` random, in place; returned in ``eval()`` mode.

    ``_init_weights`` zeros the attention sinks, the compressors' position biases, the hyper-connection bases, the
    MoE biases and the hash tables: a conversion that skipped one could hide behind the zero. Norm weights and
    hyper-connection scales become ``U(0.5, 1.5)``, sinks, position biases and bases ``N(0, 1)``, other weights
    ``N(0, 0.1^2)``, MoE biases ``N(0, 0.1^2)``, each token's hash row ``num_experts_per_tok`` distinct experts.
    ``generation_config.eos_token_id`` is cleared, so ``generate`` makes exactly ``max_new_tokens``.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in hf_model.named_parameters():
        if "norm" in name or name.endswith("scale"):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif name.endswith(("sinks", "position_bias", "base")):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for name, b in hf_model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        elif name.endswith("tid2eid"):
            experts = torch.rand(b.shape[0], hf_model.config.n_routed_experts, generator=gen).argsort(-1)
            b.copy_(experts[:, :b.shape[1]])
    hf_model.generation_config.eos_token_id = None
    return hf_model.eval()


def export_v4_pretrained(model: DeepSeekV4, directory: str | pathlib.Path, tokenizer=None,
                         metadata: dict | None = None) -> pathlib.Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer: ``DeepseekV4ForCausalLM.from_pretrained``
    loads it offline with no missing or unexpected keys.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (saved as a ``PreTrainedTokenizerFast``) or ``None``.
        metadata: extra strings stored in the safetensors header (e.g. seed, validation loss).
    """
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_model = v4_model_to_hf(model)
    state = {k: v.detach().contiguous().cpu() for k, v in hf_model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"),
              metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    hf_model.config.save_pretrained(directory)
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def load_v4_pretrained(directory: str | pathlib.Path, dtype: torch.dtype = torch.float32) -> DeepSeekV4:
    """Our model from a directory :func:`export_v4_pretrained` wrote (through ``from_pretrained``), ``eval()``.

    Raises:
        FileNotFoundError: naming ``config.json`` or ``model.safetensors`` if one is missing.
    """
    directory = pathlib.Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist: export the model with "
                                    "helpers.v4.hf.export_v4_pretrained (or `python -m helpers.v4.train`)")
    hf_model = DeepseekV4ForCausalLM.from_pretrained(directory, dtype=dtype)
    return v4_model_from_hf(hf_model)
