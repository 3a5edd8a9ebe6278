"""Shared code for the DeepSeekMoE and Multi-head Latent Attention notebooks.

Every finished layer lives here exactly once; notebooks build it step by step, then import it.
One subpackage per track (``moe``, ``mla``); extensions that import what they extend (``parallel``:
expert parallelism on ``torch.distributed``, imports ``moe``; ``dsa``: sparse attention, imports ``mla``;
``model``: the assembled DeepSeek-V3, imports both); the teaching machinery in ``teaching``; shared pieces
at the top (``configs``, ``accounting``, ``bench``, ``layers``, ``utils``, ``train``) and every conversion
to and from ``transformers`` gathered in ``hf``. A track never imports another track.
Nothing in this package downloads anything: the Hugging Face hub is switched off on import.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers.utils import seed_everything  # noqa: E402

__all__ = ["seed_everything"]
