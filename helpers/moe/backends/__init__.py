"""The experts' backends: the ways to compute the routed sum of V3 eq. 12, chosen by name.

The readable way is the ``reference`` backend, :func:`helpers.moe.layer.reference_experts`, in the layer's own
module. The fast ways live here, registered by name (:func:`register_backend`), like ``transformers``'
experts implementations; a layer picks one with ``DeepSeekMoE(..., backend=...)``, ``layer.backend = "sorted"``
or ``config.moe_backend``; :func:`dispatch` runs one on operands you pass.

==================  =========================================================================================
module              holds
==================  =========================================================================================
``registry``        :data:`BACKENDS`, :func:`register_backend`, :func:`dispatch` (checks its arguments),
                    :func:`run_experts` (the receiving side of expert parallelism)
``loop``            ``loop``: a few tokens, a loop over the chosen experts tuned for matrix-vector products
``grouped``         ``grouped``: the pairs sorted by expert, every expert in one ``F.grouped_mm``
``sorted_dispatch`` ``sorted``: the pairs sorted by expert, two matmuls per expert, hand-written backward
``threads``         whole experts per CPU core (an analogy of expert parallelism, notebook 11)
``auto``            ``auto`` (the default): ``loop``, ``grouped`` or ``sorted`` by the work's size
``compiled``        ``compiled``: ``torch.compile`` of the reference loop (opt-in)
==================  =========================================================================================
"""

from helpers.moe.backends.auto import Auto
from helpers.moe.backends.compiled import compiled_experts
from helpers.moe.backends.grouped import GROUPED_DTYPES, grouped_dispatch, grouped_supported
from helpers.moe.backends.loop import loop_dispatch
from helpers.moe.backends.registry import (
    BACKENDS,
    THREADED,
    check_experts,
    dispatch,
    register_backend,
    require_backend,
    run_backend,
    run_experts,
)
from helpers.moe.backends.sorted_dispatch import SortedDispatch, sort_by_expert, sorted_dispatch, sum_parts
from helpers.moe.backends.threads import expert_parallel, split_experts

__all__ = ["BACKENDS", "THREADED", "register_backend", "require_backend", "run_backend", "check_experts", "dispatch",
           "run_experts", "Auto", "loop_dispatch", "grouped_dispatch", "grouped_supported", "GROUPED_DTYPES",
           "sorted_dispatch", "SortedDispatch", "sort_by_expert", "sum_parts", "expert_parallel", "split_experts",
           "compiled_experts"]
