"""Accumulation precision of an FP8 GEMM, simulated: a ~14-bit accumulator, and V3's promotion to FP32.

DeepSeek-V3 §3.3.2 ("Increasing Accumulation Precision"): on H800 tensor cores an FP8 GEMM accumulates in a
register that keeps about 14 bits of mantissa, far fewer than FP32's 24; with a large inner dimension ``K`` the
error grows (the report: a maximum relative error of nearly 2% at ``K = 4096``). The fix: after every
``N_C = 128`` products (four WGMMA instructions), copy the partial sum to an FP32 register on the CUDA cores,
multiply it by the two blocks' scales there, and add; the tensor-core accumulator restarts from zero.

The simulation (:func:`limited_matmul`) keeps the accumulator as fp32 with its mantissa cut to
``mantissa_bits`` explicit bits after every addition (13 explicit bits = 14 significant bits, an FP22 register:
1 sign, 8 exponent, 13 mantissa bits, cut toward zero), adding one product at a time. With promotion, the ``K``
products are cut into ``K / N_C`` chunks; all chunks run through the short accumulator at once (one
vectorised loop of ``N_C`` steps over every chunk and every output element), then the chunk sums are added
in FP32. Without promotion, one loop of ``K`` steps. Either way each step is one tensor operation over the
``(chunks, M, N)`` accumulators, so ``K = 4096`` at ``M = N = 64`` takes a fraction of a second.

What is modelled: the short accumulator and where the sum is promoted. What is not: the order in which a
real tensor core adds products inside one instruction (it aligns several products to the largest exponent
before adding them), so the error here is that of one plausible accumulator, not H800's own figure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from helpers.rules import require_choice, require_positive

FP32_MANTISSA_BITS = 23


def round_mantissa(x: Tensor, bits: int, rounding: str = "truncate") -> Tensor:
    """``x`` (float32) with only ``bits`` explicit mantissa bits kept (``bits = 23``: unchanged).

    ``rounding="truncate"`` drops the other bits (toward zero, what a narrow adder that shifts bits out does);
    ``"nearest"`` rounds to the nearest kept value (ties away from zero).
    """
    require_choice("rounding", rounding, ("truncate", "nearest"))
    drop = FP32_MANTISSA_BITS - bits
    if drop <= 0:
        return x
    as_int = x.contiguous().view(torch.int32)
    if rounding == "nearest":
        as_int = as_int + (1 << (drop - 1))  # sign-magnitude: adding half an ulp rounds the magnitude
    return (as_int & ~((1 << drop) - 1)).view(torch.float32)


def limited_matmul(a: Tensor, b: Tensor, *, mantissa_bits: int = 13, n_c: int | None = 128, group: int = 1,
                   rounding: str = "truncate") -> Tensor:
    """``a @ b`` with every partial sum kept in a ``mantissa_bits`` accumulator, promoted to FP32 every ``n_c``.

    Args:
        a: ``(M, K)``; b: ``(K, N)`` float32 (in an FP8 GEMM: the dequantised FP8 values, or the raw FP8 values
            with the scales applied at promotion; the products are exact in fp32 either way).
        mantissa_bits: explicit mantissa bits of the short accumulator (13: 14 significant bits, V3 §3.3.2).
        n_c: the promotion interval ``N_C`` (must divide ``K``); ``None``: no promotion, one accumulator for
            all ``K`` products.
        group: products added exactly (in fp32) before each addition into the short register: 1 adds them one
            by one; a tensor core adds several products in one step before they reach the accumulator.
        rounding: how the accumulator drops bits (:func:`round_mantissa`).

    Returns:
        ``(M, N)`` float32.
    """
    require_positive(mantissa_bits=mantissa_bits, n_c=n_c, group=group)
    m, k = a.shape
    n_c = k if n_c is None else n_c
    if k % n_c or n_c % group:
        raise ValueError(f"n_c ({n_c}) must divide K ({k}) and group ({group}) must divide n_c: promotion happens "
                         "after every n_c products, each step adds group products")
    a_chunks = a.float().reshape(m, k // n_c, n_c // group, group).permute(1, 2, 0, 3)  # (G, N_C/g, M, g)
    b_chunks = b.float().reshape(k // n_c, n_c // group, group, -1)  # (G, N_C/g, g, N)
    acc = a.new_zeros(k // n_c, m, b.shape[1], dtype=torch.float32)  # (G, M, N): one short register per chunk
    for j in range(n_c // group):  # the j-th step of every chunk, all chunks and outputs at once
        step = torch.matmul(a_chunks[:, j].double(), b_chunks[:, j].double()).float()  # (G, M, N): g products
        acc = round_mantissa(acc + step, mantissa_bits, rounding)
    return acc.sum(dim=0, dtype=torch.float64).float()  # promotion: the chunk sums added in (at least) FP32


def relative_error(got: Tensor, exact: Tensor) -> tuple[float, float]:
    """``(Frobenius, max)`` relative errors: ``||got - exact|| / ||exact||`` and ``max|got - exact| / max|exact|``."""
    diff = (got.double() - exact.double())
    return (diff.norm() / exact.double().norm()).item(), (diff.abs().max() / exact.double().abs().max()).item()
