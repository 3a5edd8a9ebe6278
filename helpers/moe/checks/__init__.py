"""Exercise checkers for the DeepSeekMoE notebooks (10-13), built on :mod:`helpers.teaching.checks`.

Each checker runs a learner's function on small seeded cases (every size in a case differs from the
others, so an axis mix-up cannot go unnoticed), compares it with the finished pieces in
:mod:`helpers.moe`, and, when the answer is wrong, says *what* is wrong: it first tries a library of
known one-step mistakes (the reference with one switch flipped), and when none matches it describes
what differs (which tokens chose other experts, whose weights or output rows differ) without
guessing a cause. ``check_x.show_hint()`` prints the full hint; the exercise cell has only a nudge.

Routers are compared as expert *sets*: indices are sorted per token and the weights permuted alike,
so the order ``torch.topk`` returns does not matter.

=========================  ==========================================================  ========
checker                    the learner writes                                          notebook
=========================  ==========================================================  ========
``check_route_topk``       ``route_topk(logits [T,E], k) -> (weights, indices)``       10
``check_sorted_dispatch``  ``fn(x [T,H], weights [T,k], indices [T,k], experts)``      11
``check_route_v3``         ``route_v3(logits, bias, top_k, n_group, topk_group,        12
                           routed_scaling_factor) -> (weights, indices)``
``check_moe_forward``      ``moe_forward(u, gate_weight, bias, experts, shared_expert,  12
                           top_k, n_group, topk_group, routed_scaling_factor)``
``check_update_bias``      ``update_bias(bias [E], load [E], gamma) -> new bias``       13
=========================  ==========================================================  ========

"""

from helpers.moe.checks.balancing import check_update_bias
from helpers.moe.checks.common import make_experts, sort_routing, stack_experts
from helpers.moe.checks.dispatch import check_sorted_dispatch
from helpers.moe.checks.layer import check_moe_forward
from helpers.moe.checks.router import check_route_topk, check_route_v3

__all__ = ["check_route_topk", "check_sorted_dispatch", "check_route_v3", "check_moe_forward",
           "check_update_bias", "sort_routing", "stack_experts", "make_experts"]
