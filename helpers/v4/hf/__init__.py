"""Conversions between the DeepSeek-V4 pieces and ``transformers``' modules (``helpers.hf`` re-exports them).

=============  =====================================================================================
module         converts
=============  =====================================================================================
``hyper``      :class:`~helpers.v4.hyper.HyperConnection`, :class:`~helpers.v4.hyper.HyperHead`
``attention``  :class:`~helpers.v4.attention.V4Attention` (sliding, CSA, HCA)
``moe``        :class:`~helpers.v4.moe.V4MoE` (hash and top-k routing)
``model``      the whole :class:`~helpers.v4.model.DeepSeekV4`, and the ``from_pretrained`` export
=============  =====================================================================================
"""

from helpers.v4.hf.attention import attention_from_hf, attention_to_hf
from helpers.v4.hf.hyper import head_from_hf, head_to_hf, hyper_from_hf, hyper_to_hf
from helpers.v4.hf.model import export_v4_pretrained, load_v4_pretrained, v4_model_from_hf, v4_model_to_hf
from helpers.v4.hf.moe import v4_moe_from_hf, v4_moe_to_hf

__all__ = ["attention_from_hf", "attention_to_hf", "head_from_hf", "head_to_hf", "hyper_from_hf", "hyper_to_hf",
           "v4_moe_from_hf", "v4_moe_to_hf", "v4_model_from_hf", "v4_model_to_hf", "export_v4_pretrained",
           "load_v4_pretrained"]
