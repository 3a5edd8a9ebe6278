"""FP8 in DeepSeek-V3: formats and fine-grained scaling, accumulation precision, FP8 training, the FP8 latent cache.

Simulated on a CPU: ``torch`` stores ``float8_e4m3fn`` / ``float8_e5m2`` and casts to and from them; every matrix
product casts its operands to FP8 and back, then computes in fp32 (DeepSeek-V3, arXiv 2412.19437, §3.3).

==============  ===========================================================================================
module          holds
==============  ===========================================================================================
``formats``     the E4M3/E5M2/BF16 grids, :func:`quantize` / :func:`dequantize` with one scale per block
                (``1 x 128`` activations, ``128 x 128`` weights; UE8M0 power-of-two scales), ``fake_quantize``
``accumulate``  a ~14-bit tensor-core accumulator and V3's promotion to FP32 every ``N_C = 128`` products
``linear``      :class:`FP8Linear` (Fprop, Dgrad, Wgrad in FP8), the FP8 experts backend, :func:`to_fp8`
``train``       ``python -m helpers.fp8.train``: the miniature V3 in FP8 against FP32, same seed and data
``cache``       :class:`FP8LatentCache`: FlashMLA's FP8 latent (one fp32 scale per 128 values) + BF16 RoPE key
``checks``      the exercise checkers of notebooks 33 and 34
==============  ===========================================================================================
"""

from helpers.fp8.accumulate import limited_matmul, round_mantissa
from helpers.fp8.formats import FORMATS, dequantize, fake_quantize, grid, quantize
from helpers.fp8.linear import FP8Linear, GateInFP8, fp8_linear, to_fp8

__all__ = ["quantize", "dequantize", "fake_quantize", "grid", "FORMATS", "limited_matmul", "round_mantissa",
           "FP8Linear", "fp8_linear", "to_fp8", "GateInFP8"]
