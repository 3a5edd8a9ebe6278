"""Building blocks shared by the tracks and the model: the SwiGLU feed-forward network.

``SwiGLU`` is the dense FFN of a transformer block and, at a smaller width, one expert of
DeepSeekMoE (``helpers.moe``): it lives here so that neither track owns it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from helpers.rules import require_positive


class SwiGLU(nn.Module):
    """One dense FFN, or one expert: ``FFN(u) = W_down(SiLU(W_gate u) * W_up u)`` (DeepSeekMoE eq. 3).

    Args:
        hidden_size: ``H``, the width of ``u``.
        intermediate_size: ``I``, the width of the hidden SwiGLU layer.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        require_positive(hidden_size=hidden_size, intermediate_size=intermediate_size)
        self.w_gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        """``u`` (..., H) -> (..., H)."""
        return self.w_down(F.silu(self.w_gate(u)) * self.w_up(u))
