"""The ``compiled`` backend: ``torch.compile`` of the readable reference loop (opt-in; ``auto`` never picks it).

It shows what a compiler makes of the plain code of V3 eq. 12 (:func:`helpers.moe.layer.reference_experts`),
beside the hand-tuned backends. Facts that shape it:

- the compiler traces the *plain* loop: the tuned backends hand work to a thread pool and call
  ``torch.set_num_threads``, where ``torch.compile`` breaks the graph;
- the rows routed to each expert (``torch.where``) have a size known only from the data, so the trace runs
  with ``capture_dynamic_output_shape_ops`` (a dynamic-size op instead of a graph break);
- compiling takes seconds to minutes (more experts, a longer unrolled loop), once per process and again
  once when the token count first changes (the second compile makes it dynamic): :func:`compiled_reference`
  compiles lazily on the first call and keeps the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from helpers.moe.backends.registry import BACKENDS, register_backend


@functools.cache
def compiled_reference() -> Callable[..., Tensor]:
    """``torch.compile`` of the ``reference`` backend, made on the first call and kept for the process."""
    return torch.compile(BACKENDS["reference"])


@register_backend("compiled")
def compiled_experts(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """The reference loop of V3 eq. 12, compiled (:func:`compiled_reference`); same arguments and result."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return compiled_reference()(u, weights, indices, w_gate_up, w_down)
