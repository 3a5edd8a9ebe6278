"""FP8 linear layers for training: Fprop, Dgrad and Wgrad through FP8 with fine-grained scales (V3 §3.3.1-3.3.2).

DeepSeek-V3's mixed-precision framework (Figure 6) runs the three GEMMs of every linear layer in FP8 and
accumulates in FP32 (after promotion, :mod:`helpers.fp8.accumulate`):

=======  =========================  ======================================================================
GEMM     computes                   FP8 operands (tiles along the summed axis)
=======  =========================  ======================================================================
Fprop    ``y = x W^T``              ``x`` in ``1 x b`` tiles, ``W`` in ``b x b`` blocks (sum over ``K``)
Dgrad    ``dx = dy W``              ``dy`` in ``1 x b`` tiles, the same ``W`` blocks (sum over ``N``)
Wgrad    ``dW = dy^T x``            ``dy`` and ``x`` in ``b x 1`` tiles (sum over the tokens ``M``)
=======  =========================  ======================================================================

Every cast is E4M3 (V3 uses it for all tensors, thanks to the fine-grained scales) and straight-through: the
gradient flows through the cast as if it were the identity. ``b`` is 128 in V3; our miniature model's widths
(32 to 256) take ``b = 32`` by default (a 96-wide row is three tiles, as a 7168-wide row is 56).

What stays in higher precision (V3 §3.3.1): the embedding, the output head, the MoE gating, the norms and the
attention operators (softmax, the score and value products) -- :func:`to_fp8` converts everything else.
The master weights, their gradients and the optimizer state stay FP32 here (V3 keeps the first two in FP32
and the AdamW moments in BF16).

==================  =====================================================================================
name                what it is
==================  =====================================================================================
:class:`FP8Matmul`  the autograd Function: ``x (M, K), W (N, K) -> x W^T`` with the three GEMMs in FP8
:func:`fp8_linear`  ``F.linear`` in FP8 for ``x (..., K)``
:class:`FP8Linear`  an ``nn.Linear`` whose forward is :func:`fp8_linear`
``fp8`` backend     the MoE experts' GEMMs in FP8 (:func:`fp8_experts`, registered with ``helpers.moe``)
:class:`GateInFP8`  a context in which the MoE router's ``u^T e_i`` also runs in FP8 (the ablation)
:func:`to_fp8`      convert a :class:`helpers.model.DeepSeekV3` in place, V3's choice of what stays high
==================  =====================================================================================
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from helpers.fp8.formats import fake_quantize
from helpers.moe import DeepSeekMoE
from helpers.moe.backends import BACKENDS, register_backend, sort_by_expert
from helpers.rules import require_positive

DEFAULT_BLOCK = 32
"""Tile width of the miniature model (V3's is 128 at hidden size 7168)."""

HIGH_PRECISION = ("embed", "head", "router (gate_weight)", "norms", "attention softmax and score/value products")
"""What V3 keeps in BF16/FP32 (§3.3.1); :func:`to_fp8` leaves these alone."""


class FP8Matmul(torch.autograd.Function):
    """``y = x W^T`` with Fprop, Dgrad and Wgrad in simulated FP8 (E4M3, fine-grained scales), FP32 accumulation.

    Forward: ``x (M, K)``, ``weight (N, K)``, ``block`` (the tile width ``b``) -> ``y (M, N)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, block: int) -> Tensor:
        w_q = fake_quantize(weight, (block, block))  # (N, K): b x b blocks serve Fprop and Dgrad alike
        ctx.save_for_backward(x, w_q)
        ctx.block = block
        return fake_quantize(x, (1, block)) @ w_q.T  # Fprop: (M, N), 1 x b tiles along K

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None]:
        x, w_q = ctx.saved_tensors
        b = ctx.block
        dx = fake_quantize(dy, (1, b)) @ w_q  # Dgrad: (M, K), dy tiled along N, the axis summed
        dw = fake_quantize(dy, (b, 1)).T @ fake_quantize(x, (b, 1))  # Wgrad: (N, K), tiles along the tokens M
        return dx.to(x.dtype), dw.to(w_q.dtype), None


def fp8_linear(x: Tensor, weight: Tensor, block: int = DEFAULT_BLOCK) -> Tensor:
    """``F.linear(x, weight)`` (no bias) with the three GEMMs in FP8: ``x (..., K)``, ``weight (N, K)`` -> ``(..., N)``."""
    y = FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, block)  # (M, N)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


class FP8Linear(nn.Linear):
    """``nn.Linear`` (no bias) whose forward runs in FP8 (:class:`FP8Matmul`); same parameter, same state dict."""

    def __init__(self, in_features: int, out_features: int, block: int = DEFAULT_BLOCK) -> None:
        super().__init__(in_features, out_features, bias=False)
        require_positive(block=block)
        self.block = block

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = DEFAULT_BLOCK) -> FP8Linear:
        """An FP8 layer sharing ``linear``'s weight (the same ``Parameter``: optimizers and checkpoints see no change)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias: DeepSeek's linear layers have none")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.block = linear.in_features, linear.out_features, block
        layer.weight = linear.weight
        layer.register_parameter("bias", None)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        return fp8_linear(x, self.weight, self.block)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3, tiles 1x{self.block} / {self.block}x{self.block}"


def fp8_experts(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                block: int = DEFAULT_BLOCK) -> Tensor:
    """The routed sum of V3 eq. 12, ``sum_i g_{i,t} FFN_i(u_t)``, with every expert's two GEMMs in FP8.

    The pairs are sorted by expert (:func:`helpers.moe.backends.sort_by_expert`); each expert's rows go through
    ``W_gate_up`` and ``W_down`` by :func:`fp8_linear`, the SiLU and the gating product stay in FP32.
    Same arguments as every experts backend: ``u (T, H)``, ``weights, indices (T, k)``, ``w_gate_up (E, 2I, H)``,
    ``w_down (E, H, I)`` -> ``(T, H)``.
    """
    order, token, bounds = sort_by_expert(indices, w_gate_up.shape[0])
    g = weights.reshape(-1)[order]  # (T*k,) gating values in the sorted order
    y = torch.zeros_like(u)  # (T, H)
    for e in range(w_gate_up.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        tok = token[start:end]  # (n_e,)
        gate, up = fp8_linear(u[tok], w_gate_up[e], block).chunk(2, dim=-1)  # (n_e, I) each
        out = fp8_linear(F.silu(gate) * up, w_down[e], block)  # (n_e, H)
        y = y.index_add(0, tok, g[start:end, None] * out)
    return y


def fp8_backend(block: int = DEFAULT_BLOCK) -> str:
    """The name of the FP8 experts backend with tiles of ``block`` (registered with ``helpers.moe`` on first use)."""
    require_positive(block=block)
    name = f"fp8_{block}"
    if name not in BACKENDS:
        register_backend(name)(functools.partial(fp8_experts, block=block))
    return name


class GateInFP8(TorchFunctionMode):
    """Inside ``with GateInFP8(model):`` every MoE router's logits ``u^T e_i`` (V3 eq. 15) run in FP8 too.

    The ablation of V3's choice to keep the gating in high precision: ``F.linear`` calls whose weight is one of
    the model's ``gate_weight`` parameters go through :func:`fp8_linear`; every other call is untouched.
    """

    def __init__(self, model: nn.Module, block: int = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.gates = {id(m.gate_weight) for m in model.modules() if isinstance(m, DeepSeekMoE)}
        self.block = block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.gates:
            return fp8_linear(args[0], args[1], self.block)
        return func(*args, **kwargs)


def to_fp8(model: nn.Module, block: int = DEFAULT_BLOCK, keep: tuple[str, ...] = ("head",)) -> nn.Module:
    """Convert ``model`` in place to V3's FP8 training recipe; returns it.

    Every ``nn.Linear`` becomes an :class:`FP8Linear` sharing its weight, except the modules named in ``keep``
    (V3 keeps the output head high; the embedding is a lookup, not a GEMM), and every :class:`DeepSeekMoE`
    computes its experts with the ``fp8`` backend. Left in FP32: the router (``gate_weight``), the norms, the
    attention softmax and its score/value products (``helpers.mla.attention``), the embedding.
    """
    require_positive(block=block)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full not in keep:
                setattr(module, child_name, FP8Linear.from_linear(child, block))
        if isinstance(module, DeepSeekMoE):
            module.backend = fp8_backend(block)
    return model
