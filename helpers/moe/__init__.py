"""DeepSeekMoE: fine-grained and shared experts, V2/V3 routing, sorted dispatch, balancing.

===================  ==========================================================================================
module               holds
===================  ==========================================================================================
``routing``          the router: affinities, group-limited top-k, gating values (V3 eq. 13-16)
``experts``          :func:`dispatch`, the experts of eq. 12, and the choice of its path by the work's size
``loop``             the path of a few tokens: a loop over the chosen experts in the calling thread
``sorted_dispatch``  the path of many tokens: sort the pairs, two matmuls per expert, hand-written backward
``threads``          whole experts per CPU core (an analogy of expert parallelism, notebook 11)
``balancing``        MaxVio, the auxiliary-loss-free bias, V2's and V3's auxiliary losses
``layer``            :class:`DeepSeekMoE`, the finished layer
``training``         the bookkeeping of notebook 13's balancing sweep (train, evaluate, summarise)
``diagrams``         the track's pictures (fine-grained and shared experts, the dispatch permutation, gates)
``hf``               conversions to and from ``transformers`` (gathered in :mod:`helpers.hf`)
``checks``           the exercise checkers of notebooks 10-13
``bench``            the benchmark behind ``python -m helpers.bench moe``
===================  ==========================================================================================

The names below are the public API (``from helpers.moe import DeepSeekMoE, route, dispatch``);
``hf``, ``checks`` and ``bench`` are imported on demand (they pull in ``transformers`` or plotting).
"""

from helpers.layers import SwiGLU
from helpers.moe.balancing import (
                                   expert_level_aux_loss,
                                   expert_load,
                                   max_violation,
                                   normalized_scores,
                                   sequence_wise_aux_loss,
                                   update_bias,
)
from helpers.moe.experts import dispatch
from helpers.moe.layer import DeepSeekMoE, RoutingStats
from helpers.moe.routing import (
                                   GROUP_SCORES,
                                   SCORING_FUNCS,
                                   affinity,
                                   default_group_score,
                                   gating_weights,
                                   route,
                                   router_dtype,
                                   select_experts,
                                   validate_routing,
)
from helpers.moe.sorted_dispatch import SortedDispatch, sort_by_expert, sum_parts
from helpers.moe.threads import expert_parallel, split_experts

__all__ = ["SwiGLU", "DeepSeekMoE", "RoutingStats", "route", "affinity", "select_experts", "gating_weights",
           "default_group_score", "router_dtype", "validate_routing", "SCORING_FUNCS", "GROUP_SCORES",
           "dispatch", "sort_by_expert", "SortedDispatch", "sum_parts", "expert_parallel", "split_experts",
           "expert_load", "max_violation", "update_bias", "normalized_scores", "expert_level_aux_loss", "sequence_wise_aux_loss"]
