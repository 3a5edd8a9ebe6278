"""The assembled model: DeepSeek-V3 in miniature from the MLA and MoE tracks' layers.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``model``          :class:`DeepSeekV3`, :class:`DecoderBlock`, :class:`MTPModule` (V3 §2.2)
``generate``       prefill + decode over the latent cache; greedy, temperature, top-p; MTP drafts
``hf``             to and from ``DeepseekV3ForCausalLM``, export to a ``from_pretrained`` directory
``data``           the corpus (a pinned dependency's source files) and the byte-level BPE tokenizer
``train``          the training loop and ``python -m helpers.train``
``diagrams``       notebooks 30-32's pictures: loss and MaxVio curves, experts by token class, decode speed
``checks``         notebooks 30 and 32's exercise checkers (the MTP depth's index shift, the draft-verify step)
=================  ===========================================================================
"""

from helpers.model.generate import generate
from helpers.model.model import DecoderBlock, DeepSeekV3, MTPModule, RMSNorm
from helpers.rules import check_config

__all__ = ["DeepSeekV3", "DecoderBlock", "MTPModule", "RMSNorm", "check_config", "generate"]
