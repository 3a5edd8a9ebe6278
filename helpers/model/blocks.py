"""What a decoder block is made of, chosen by name from the config: attention, feed-forward, residual.

Three registries map a name to a builder that takes the ``transformers`` config (and, for the FFN, the
training-only :class:`helpers.moe.Balancing`). The model asks the config which name each block gets; adding a
variant is one function here and one new row in the equivalence tests (``CONTRIBUTING.md``).

==============  ======================  ==========================================================================
registry        names                   chosen by
==============  ======================  ==========================================================================
``ATTENTIONS``  ``mla``, ``dsa``        :func:`attention_kind`: ``dsa`` when the config has a lightning indexer
                                        (``index_topk``, a ``DeepseekV32Config``), else ``mla``
``FFNS``        ``dense``, ``moe``      :func:`ffn_kind`: ``config.mlp_layer_types[i]`` where the config has it
                                        (V3.2), else the first ``first_k_dense_replace`` blocks are dense
``RESIDUALS``   ``plain``               :func:`residual_kind`: one residual stream (V2, V3, V3.2)
==============  ======================  ==========================================================================

The MoE's routing (softmax, sigmoid, groups) is chosen inside :meth:`helpers.moe.DeepSeekMoE.from_config`
from the same config. Each attention creates its own cache (``attn.new_cache()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from helpers.dsa import SparseLatentAttention
from helpers.layers import SwiGLU
from helpers.mla import MultiHeadLatentAttention
from helpers.moe import Balancing, DeepSeekMoE


class PlainResidual(nn.Module):
    """One residual stream: ``x + f(x)`` around a sub-layer (V3 §2: pre-norm blocks)."""

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """``x (B, T, H)`` -> ``x + sublayer(x)``, ``(B, T, H)``."""
        return x + sublayer(x)


ATTENTIONS: dict[str, Callable[[Any], nn.Module]] = {
    "mla": MultiHeadLatentAttention.from_config,
    "dsa": SparseLatentAttention.from_config,
}
FFNS: dict[str, Callable[[Any, Balancing], nn.Module]] = {
    "dense": lambda config, balancing: SwiGLU(config.hidden_size, config.intermediate_size),
    "moe": lambda config, balancing: DeepSeekMoE.from_config(config, balancing=balancing),
}
RESIDUALS: dict[str, Callable[[Any], nn.Module]] = {
    "plain": lambda config: PlainResidual(),
}


def attention_kind(config: Any) -> str:
    """``"dsa"`` for a config with the lightning indexer (V3.2), else ``"mla"``."""
    return "dsa" if getattr(config, "index_topk", None) is not None else "mla"


def ffn_kind(config: Any, layer_idx: int) -> str:
    """``"dense"`` or ``"moe"`` for block ``layer_idx``: ``mlp_layer_types`` where the config lists them (V3.2:
    ``"dense"``/``"sparse"``), else dense for the first ``first_k_dense_replace`` blocks (V2, V3)."""
    types = getattr(config, "mlp_layer_types", None)
    if types is not None:
        return "moe" if types[layer_idx] == "sparse" else "dense"
    return "dense" if layer_idx < config.first_k_dense_replace else "moe"


def residual_kind(config: Any) -> str:
    """``"plain"``: one residual stream (DeepSeek-V2, V3 and V3.2)."""
    return "plain"
