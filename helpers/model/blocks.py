"""What a decoder block is made of, chosen by name from the config: attention, feed-forward, residual.

Three registries map a name to a builder that takes the ``transformers`` config and the block's depth (and, for the
FFN, the training-only :class:`helpers.moe.Balancing`). The model asks the config which name each block gets; adding
a variant is one function here and one new row in the equivalence tests (``CONTRIBUTING.md``).

==============  ==========================  ======================================================================
registry        names                       chosen by
==============  ==========================  ======================================================================
``ATTENTIONS``  ``mla``, ``dsa``,           :func:`attention_kind`: for a ``DeepseekV4Config`` its
                ``swa``, ``csa``, ``hca``   ``layer_types[i]`` (sliding window, compressed sparse, heavily
                                            compressed: V4 §2.3); else ``dsa`` when the config has a lightning
                                            indexer (``index_topk``, a ``DeepseekV32Config``), else ``mla``
``FFNS``        ``dense``, ``moe``,         :func:`ffn_kind`: V4's ``mlp_layer_types[i]`` (``hash_moe``, or
                ``hash_moe``, ``v4_moe``    ``moe`` -> ``v4_moe``); V3.2's ``mlp_layer_types`` (``dense``/
                                            ``sparse``); else the first ``first_k_dense_replace`` blocks are dense
``RESIDUALS``   ``plain``, ``hyper``        :func:`residual_kind`: ``hyper`` (``hc_mult`` streams mixed by
                                            manifold-constrained hyper-connections, V4 §2.2) for V4, else one
                                            residual stream (V2, V3, V3.2)
==============  ==========================  ======================================================================

A residual's ``forward(x, sublayer)`` takes the block's stream(s) and a callable ``(B, T, H) -> (B, T, H)``
(norm + attention or norm + FFN); the plain one adds, the hyper one collapses the ``hc_mult`` streams into the
sub-layer's input and mixes its output back in. The FFNs in :data:`READS_TOKEN_IDS` also take the token ids (V4's
hash routing picks experts from them). The MoE's routing (softmax, sigmoid, groups, sqrt-softplus, hash) is chosen
inside the layers' ``from_config`` from the same config. Each attention creates its own cache
(``attn.new_cache()``); :func:`norm_class` gives the pre-norms' class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from helpers.dsa import SparseLatentAttention
from helpers.layers import SwiGLU
from helpers.mla import MultiHeadLatentAttention
from helpers.moe import Balancing, DeepSeekMoE
from helpers.precision import RMSNorm
from helpers.v4.attention import V4Attention
from helpers.v4.hyper import HyperConnection
from helpers.v4.moe import V4MoE
from helpers.v4.norms import V4RMSNorm


class PlainResidual(nn.Module):
    """One residual stream: ``x + f(x)`` around a sub-layer (V3 §2: pre-norm blocks)."""

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """``x (B, T, H)`` -> ``x + sublayer(x)``, ``(B, T, H)``."""
        return x + sublayer(x)


ATTENTIONS: dict[str, Callable[[Any, int], nn.Module]] = {
    "mla": lambda config, layer_idx: MultiHeadLatentAttention.from_config(config),
    "dsa": lambda config, layer_idx: SparseLatentAttention.from_config(config),
    "swa": V4Attention.from_config,  # the layer reads its kind from config.layer_types[layer_idx]
    "csa": V4Attention.from_config,
    "hca": V4Attention.from_config,
}
FFNS: dict[str, Callable[[Any, int, Balancing | None], nn.Module]] = {
    "dense": lambda config, layer_idx, balancing: SwiGLU(config.hidden_size, config.intermediate_size),
    "moe": lambda config, layer_idx, balancing: DeepSeekMoE.from_config(config, balancing=balancing),
    "hash_moe": lambda config, layer_idx, balancing: V4MoE.from_config(config, layer_idx),
    "v4_moe": lambda config, layer_idx, balancing: V4MoE.from_config(config, layer_idx),
}
RESIDUALS: dict[str, Callable[[Any], nn.Module]] = {
    "plain": lambda config: PlainResidual(),
    "hyper": HyperConnection.from_config,
}
READS_TOKEN_IDS = frozenset({"hash_moe", "v4_moe"})
"""FFNs whose ``forward(x, input_ids)`` also takes the block's token ids ``(B, T)`` (V4 §2.1: hash routing)."""

V4_ATTENTION_KINDS = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
                      "heavily_compressed_attention": "hca"}
"""V4's ``layer_types`` entries and the names they have in :data:`ATTENTIONS`."""
V4_FFN_KINDS = {"hash_moe": "hash_moe", "moe": "v4_moe"}
"""V4's ``mlp_layer_types`` entries and the names they have in :data:`FFNS`."""


def is_v4(config: Any) -> bool:
    """Whether ``config`` describes DeepSeek-V4 (a ``DeepseekV4Config``)."""
    return getattr(config, "model_type", None) == "deepseek_v4"


def attention_kind(config: Any, layer_idx: int = 0) -> str:
    """The :data:`ATTENTIONS` name of block ``layer_idx``: V4's ``layer_types[layer_idx]`` (``swa``/``csa``/``hca``);
    ``"dsa"`` for a config with the lightning indexer (V3.2), else ``"mla"``."""
    if is_v4(config):
        return V4_ATTENTION_KINDS[config.layer_types[layer_idx]]
    return "dsa" if getattr(config, "index_topk", None) is not None else "mla"


def ffn_kind(config: Any, layer_idx: int) -> str:
    """The :data:`FFNS` name of block ``layer_idx``: V4's ``mlp_layer_types`` (``hash_moe``, ``moe`` -> ``v4_moe``);
    V3.2's ``mlp_layer_types`` (``"dense"``/``"sparse"``); else dense for the first ``first_k_dense_replace``
    blocks (V2, V3)."""
    types = getattr(config, "mlp_layer_types", None)
    if is_v4(config):
        return V4_FFN_KINDS[types[layer_idx]]
    if types is not None:
        return "moe" if types[layer_idx] == "sparse" else "dense"
    return "dense" if layer_idx < config.first_k_dense_replace else "moe"


def norm_class(config: Any) -> type[nn.Module]:
    """The blocks' and the final RMSNorm: V4's keeps its weight in fp32 and multiplies before casting
    (:class:`helpers.v4.norms.V4RMSNorm`), V2-V3.2's casts first (:class:`helpers.precision.RMSNorm`); equal in fp32."""
    return V4RMSNorm if is_v4(config) else RMSNorm


def residual_kind(config: Any) -> str:
    """``"hyper"`` for V4 (``hc_mult`` streams, V4 §2.2), else ``"plain"`` (DeepSeek-V2, V3 and V3.2)."""
    return "hyper" if is_v4(config) else "plain"
