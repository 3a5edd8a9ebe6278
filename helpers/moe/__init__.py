"""DeepSeekMoE: fine-grained and shared experts, V2/V3 routing, balancing; the experts' backends by name.

===================  ==========================================================================================
module               holds
===================  ==========================================================================================
``routing``          the router: affinities, group-limited top-k, gating values (V3 eq. 13-16)
``balancing``        :class:`Balancing` (the training settings), MaxVio, the auxiliary-loss-free bias, V2's and
                     V3's auxiliary losses
``layer``            :class:`DeepSeekMoE`, the finished layer (:meth:`~DeepSeekMoE.from_config`, the one
                     config mapping), and :func:`reference_experts`, the plain loop of eq. 12 (backend
                     ``"reference"``)
``backends``         the fast ways to compute eq. 12, registered by name (``loop``, ``grouped``, ``sorted``,
                     ``compiled``, ``auto``), :func:`dispatch` to call one, the thread pool (see its own table)
``training``         the bookkeeping of notebook 13's balancing sweep (train, evaluate, summarise)
``diagrams``         the track's pictures (fine-grained and shared experts, the dispatch permutation, gates)
``hf``               conversions to and from ``transformers`` (gathered in :mod:`helpers.hf`)
``checks``           the exercise checkers of notebooks 10-13
``bench``            the benchmark behind ``python -m helpers.bench moe``
===================  ==========================================================================================

The names below are the public API (``from helpers.moe import DeepSeekMoE, route, dispatch``);
``hf``, ``checks`` and ``bench`` are imported on demand (they pull in ``transformers`` or plotting).
A layer's backend is chosen by name: ``DeepSeekMoE(..., backend="sorted")``, ``layer.backend = "reference"``,
or ``config.moe_backend`` with :meth:`DeepSeekMoE.from_config`.
"""

from helpers.layers import SwiGLU
from helpers.moe.backends import (
                                   BACKENDS,
                                   SortedDispatch,
                                   dispatch,
                                   expert_parallel,
                                   register_backend,
                                   run_experts,
                                   sort_by_expert,
                                   split_experts,
                                   sum_parts,
)
from helpers.moe.balancing import (
                                   Balancing,
                                   expert_level_aux_loss,
                                   expert_load,
                                   max_violation,
                                   normalized_scores,
                                   sequence_wise_aux_loss,
                                   update_bias,
)
from helpers.moe.layer import DeepSeekMoE, RoutingStats, moe_settings, reference_experts
from helpers.moe.routing import (
                                   GROUP_SCORES,
                                   SCORING_FUNCS,
                                   affinity,
                                   default_group_score,
                                   gating_weights,
                                   route,
                                   select_experts,
                                   validate_routing,
)

__all__ = ["SwiGLU", "DeepSeekMoE", "RoutingStats", "Balancing", "moe_settings", "route", "affinity",
           "select_experts", "gating_weights", "default_group_score", "validate_routing", "SCORING_FUNCS",
           "GROUP_SCORES", "dispatch", "reference_experts", "BACKENDS", "register_backend", "run_experts",
           "sort_by_expert", "SortedDispatch", "sum_parts", "expert_parallel", "split_experts", "expert_load",
           "max_violation", "update_bias", "normalized_scores", "expert_level_aux_loss", "sequence_wise_aux_loss"]
