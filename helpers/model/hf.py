"""The whole model to and from ``transformers``, and an export directory ``from_pretrained`` loads offline.

``model_from_hf`` / ``model_to_hf`` take or give a ``DeepseekV3ForCausalLM`` (MLA blocks) or a
``DeepseekV32ForCausalLM`` (sparse-attention blocks). They reuse the layer conversions of the tracks
(:func:`helpers.mla.hf.mla_from_hf`, :func:`helpers.dsa.hf.dsa_from_hf`, :func:`helpers.moe.hf.moe_from_hf`, ...),
chosen by the same name as the block's attention (:data:`ATTENTION_FROM_HF`), and add the pieces around them:

==================================  ==========================================================
ours                                ``transformers`` ``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM``
==================================  ==========================================================
``embed``                           ``model.embed_tokens``
``layers.i.attn_norm``              ``model.layers.i.input_layernorm``
``layers.i.attn``                   ``model.layers.i.self_attn`` (tables in :mod:`helpers.mla.hf`, :mod:`helpers.dsa.hf`)
``layers.i.ffn_norm``               ``model.layers.i.post_attention_layernorm``
``layers.i.ffn`` (SwiGLU)           ``model.layers.i.mlp`` (``gate_proj``, ``up_proj``, ``down_proj``)
``layers.i.ffn`` (DeepSeekMoE)      ``model.layers.i.mlp`` (table in :mod:`helpers.moe.hf`)
``norm``, ``head``                  ``model.norm``, ``lm_head``
``mtp.k``                           ``model.layers.{L+k}``: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``
                                    and the block's own names (export only; ``L`` = ``num_hidden_layers``)
==================================  ==========================================================

The export writes DeepSeek's checkpoint layout: one tensor per expert
(``mlp.experts.E.gate_proj.weight``, ...), which ``transformers`` fuses on load, and the MTP module as
the layer after the last decoder layer.

**MTP at another depth.** ``transformers`` 5.23 finds MTP weights only through the class attribute
``DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected`` (``[r"model\\.layers\\.61.*"]``, the real
V3 depth): ``from_pretrained`` ignores keys matching it, and ``generate(use_mtp=True)`` loads exactly those
keys into its MTP model. :func:`register_mtp_depth` appends the pattern for our depth to that list (once;
61 stays), which is the hook ``transformers`` itself reads. Without it the exported MTP keys would be
reported as unexpected and ``use_mtp=True`` would find no MTP weights. :func:`load_pretrained` and
:func:`export_pretrained` call it.
"""

from __future__ import annotations

import copy
import json
import pathlib

import torch
from torch import Tensor, nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

from helpers.dsa.hf import dsa_from_hf, dsa_to_hf
from helpers.mla.hf import mla_from_hf, mla_to_hf
from helpers.model.blocks import attention_kind
from helpers.model.model import DeepSeekV3, MTPModule
from helpers.moe import DeepSeekMoE
from helpers.moe.hf import moe_from_hf, moe_to_hf
from helpers.rules import check_config

DENSE = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
HF_MODELS = {"deepseek_v3": DeepseekV3ForCausalLM, "deepseek_v32": DeepseekV32ForCausalLM}
"""The ``transformers`` model class of each config ``model_type`` our model is built from."""
ATTENTION_FROM_HF = {"mla": mla_from_hf, "dsa": dsa_from_hf}
ATTENTION_TO_HF = {"mla": mla_to_hf, "dsa": dsa_to_hf}


def register_mtp_depth(num_hidden_layers: int) -> str:
    """Let ``transformers`` find MTP weights saved at ``model.layers.{num_hidden_layers}`` (see module docstring).

    Returns:
        The pattern added to ``DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected``.
    """
    pattern = rf"model\.layers\.{int(num_hidden_layers)}\..*"
    patterns = DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected
    if pattern not in patterns:
        DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [*patterns, pattern]
    return pattern


def hf_config(config: DeepseekV3Config) -> DeepseekV3Config:
    """A copy of ``config`` for ``transformers``' eager paths (the ones our numbers are compared with)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


@torch.no_grad()
def model_from_hf(hf_model: DeepseekV3ForCausalLM | DeepseekV32ForCausalLM) -> DeepSeekV3:
    """Our :class:`DeepSeekV3` with ``hf_model``'s weights, MoE biases and config (no MTP: it has none).

    A ``DeepseekV32ForCausalLM`` gives our model with sparse attention (V3.2's lightning indexer) in every block.
    The returned model is in ``hf_model``'s dtype and device, in ``eval()`` mode.
    """
    if not isinstance(hf_model, tuple(HF_MODELS.values())):
        raise ValueError(f"hf_model must be a DeepseekV3ForCausalLM or DeepseekV32ForCausalLM, got "
                         f"{type(hf_model).__name__}")
    config = copy.deepcopy(hf_model.config)
    check_config(config)
    config.num_mtp_layers = 0
    weight = hf_model.lm_head.weight
    model = DeepSeekV3(config).to(device=weight.device, dtype=weight.dtype)
    model.embed.weight.copy_(hf_model.model.embed_tokens.weight)
    for block, layer in zip(model.layers, hf_model.model.layers):
        _block_from_hf(block, layer)
    model.norm.weight.copy_(hf_model.model.norm.weight)
    model.head.weight.copy_(hf_model.lm_head.weight)
    return model.eval()


def _block_from_hf(block: nn.Module, layer: nn.Module) -> None:
    block.attn_norm.weight.copy_(layer.input_layernorm.weight)
    block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
    block.attn.load_state_dict(ATTENTION_FROM_HF[attention_kind(layer.self_attn.config)](layer.self_attn).state_dict())
    if isinstance(block.ffn, DeepSeekMoE):
        block.ffn.load_state_dict(moe_from_hf(layer.mlp).state_dict())
    else:
        for ours, theirs in DENSE.items():
            getattr(block.ffn, ours).weight.copy_(getattr(layer.mlp, theirs).weight)


@torch.no_grad()
def model_to_hf(model: DeepSeekV3) -> DeepseekV3ForCausalLM | DeepseekV32ForCausalLM:
    """A ``DeepseekV3ForCausalLM`` (``DeepseekV32ForCausalLM`` for a V3.2 config; eager attention and experts)
    with ``model``'s main weights, in ``eval()`` mode.

    The MTP modules have no place in ``DeepseekV3ForCausalLM``; :func:`export_pretrained` writes them to disk.
    """
    if not isinstance(model, DeepSeekV3):
        raise TypeError(f"model must be our DeepSeekV3, got {type(model).__name__}: to convert a transformers "
                        "model the other way, use model_from_hf")
    config = hf_config(model.config)
    weight = model.head.weight
    hf_model = HF_MODELS[config.model_type](config).to(device=weight.device, dtype=weight.dtype)
    hf_model.model.embed_tokens.weight.copy_(model.embed.weight)
    for i, (block, layer) in enumerate(zip(model.layers, hf_model.model.layers)):
        _block_to_hf(block, layer, config, i)
    hf_model.model.norm.weight.copy_(model.norm.weight)
    hf_model.lm_head.weight.copy_(model.head.weight)
    return hf_model.eval()


def _block_to_hf(block: nn.Module, layer: nn.Module, config: DeepseekV3Config, idx: int) -> None:
    layer.input_layernorm.weight.copy_(block.attn_norm.weight)
    layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
    layer.self_attn.load_state_dict(ATTENTION_TO_HF[attention_kind(config)](block.attn, config, idx).state_dict())
    if isinstance(block.ffn, DeepSeekMoE):
        layer.mlp.load_state_dict(moe_to_hf(block.ffn, config).state_dict())
    else:
        for ours, theirs in DENSE.items():
            getattr(layer.mlp, theirs).weight.copy_(getattr(block.ffn, ours).weight)


def _per_expert(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Unfuse ``experts.gate_up_proj (E, 2I, H)`` / ``experts.down_proj (E, H, I)`` into DeepSeek's per-expert keys."""
    out = {}
    for key, value in state.items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return out


@torch.no_grad()
def _mtp_state(module: MTPModule, config: DeepseekV3Config, idx: int) -> dict[str, Tensor]:
    """MTP module ``module`` under DeepSeek's checkpoint names at ``model.layers.{idx}``."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    mtp_config = copy.deepcopy(config)
    mtp_config.first_k_dense_replace = 0
    layer = DeepseekV3DecoderLayer(mtp_config, idx).to(module.eh_proj.weight.dtype)
    _block_to_hf(module.block, layer, mtp_config, idx)
    state = {f"model.layers.{idx}.{k}": v for k, v in layer.state_dict().items()}
    for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("post_norm", "shared_head.norm")):
        state[f"model.layers.{idx}.{theirs}.weight"] = getattr(module, ours).weight
    return state


def export_pretrained(model: DeepSeekV3, directory: str | pathlib.Path, tokenizer=None,
                      metadata: dict | None = None) -> pathlib.Path:
    """Write ``config.json``, ``model.safetensors`` (main model + MTP) and the tokenizer to ``directory``.

    ``DeepseekV3ForCausalLM.from_pretrained(directory)`` then loads it offline with no missing or unexpected
    keys (after :func:`register_mtp_depth`, which this calls) and ``generate(use_mtp=True)`` uses the MTP module.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (saved as a ``PreTrainedTokenizerFast``) or ``None``.
        metadata: extra strings stored in the safetensors header (e.g. seed, validation loss).
    """
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.config)
    config.num_mtp_layers = len(model.mtp)
    register_mtp_depth(config.num_hidden_layers)
    hf_model = model_to_hf(model)
    state = {k: v for k, v in hf_model.state_dict().items()}
    for k, module in enumerate(model.mtp):
        state.update(_mtp_state(module, config, config.num_hidden_layers + k))
    state = {k: v.detach().contiguous().cpu() for k, v in _per_expert(state).items()}
    save_file(state, str(directory / "model.safetensors"),
              metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    config.save_pretrained(directory)
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def load_pretrained(directory: str | pathlib.Path, dtype: torch.dtype = torch.float32) -> DeepSeekV3:
    """Our model (MTP modules included) from a directory :func:`export_pretrained` wrote, in ``eval()`` mode.

    Raises:
        FileNotFoundError: naming ``config.json`` or ``model.safetensors`` if one is missing.
        ValueError: naming the tensor (and its shapes) that does not match the config, or the missing keys.
    """
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist: export the model with "
                                    "helpers.model.hf.export_pretrained (or `python -m helpers.train`)")
    config = DeepseekV3Config.from_pretrained(directory)
    check_config(config)
    register_mtp_depth(config.num_hidden_layers)
    state = load_file(str(directory / "model.safetensors"))
    template = export_state(DeepSeekV3(hf_config(config)))
    missing = sorted(set(template) - set(state))
    if missing:
        raise ValueError(f"{directory / 'model.safetensors'} lacks {len(missing)} tensors that config.json "
                         f"implies, e.g. {missing[:3]}")
    for key, want in template.items():
        if state[key].shape != want.shape:
            raise ValueError(f"{directory / 'model.safetensors'}: {key} has shape {tuple(state[key].shape)} but "
                             f"config.json implies {tuple(want.shape)}")
    hf_model = DeepseekV3ForCausalLM(hf_config(config))
    hf_model.load_state_dict(_fuse({k: v for k, v in state.items()
                                    if not _is_mtp(k, config.num_hidden_layers)}))
    model = model_from_hf(hf_model).to(dtype)
    model.config.num_mtp_layers = config.num_mtp_layers
    model.mtp = nn.ModuleList([MTPModule(model.config) for _ in range(config.num_mtp_layers)]).to(dtype)
    with torch.no_grad():
        for k, module in enumerate(model.mtp):
            _mtp_from_state(module, state, config, config.num_hidden_layers + k)
    return model.eval()


def export_state(model: DeepSeekV3) -> dict[str, Tensor]:
    """The tensors :func:`export_pretrained` would write for ``model`` (names and shapes; for checking a file)."""
    config = hf_config(model.config)
    state = dict(model_to_hf(model).state_dict())
    for k, module in enumerate(model.mtp):
        state.update(_mtp_state(module, config, config.num_hidden_layers + k))
    return _per_expert(state)


def _is_mtp(key: str, n_layers: int) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= n_layers


def _fuse(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`_per_expert`."""
    out, experts = {}, {}
    for key, value in state.items():
        if ".experts." in key:
            prefix, rest = key.split(".experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = value
        else:
            out[key] = value
    for prefix, projs in experts.items():
        n = len(projs["gate_proj"])
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in range(n)])
        out[f"{prefix}.experts.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])
    return out


@torch.no_grad()
def _mtp_from_state(module: MTPModule, state: dict[str, Tensor], config: DeepseekV3Config, idx: int) -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    prefix = f"model.layers.{idx}."
    mine = _fuse({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                         ("post_norm", "shared_head.norm")):
        getattr(module, ours).weight.copy_(mine.pop(f"{theirs}.weight"))
    mtp_config = hf_config(config)
    mtp_config.first_k_dense_replace = 0
    layer = DeepseekV3DecoderLayer(mtp_config, idx)
    layer.load_state_dict(mine)
    _block_from_hf(module.block, layer)


def pretrained_metadata(directory: str | pathlib.Path) -> dict[str, str]:
    """The metadata strings stored in an exported ``model.safetensors`` header."""
    from safetensors import safe_open

    with safe_open(str(pathlib.Path(directory) / "model.safetensors"), framework="pt") as f:
        return dict(f.metadata() or {})


def read_json(path: str | pathlib.Path) -> dict:
    """A JSON file as a dict (used for the training record beside a checkpoint)."""
    return json.loads(pathlib.Path(path).read_text())
