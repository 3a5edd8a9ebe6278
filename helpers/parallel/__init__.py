"""Expert parallelism: DeepSeekMoE's routed experts spread over processes with ``torch.distributed``.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``layout``         :class:`ExpertLayout`: which rank hosts which experts (plain or replicated)
``comm``           the all-to-all dispatcher (counts, dispatch, combine) and the config handshake
``layer``          :class:`ExpertParallelMoE`: route -> dispatch -> experts -> combine, no process group
``launch``         :func:`launch`: N local gloo processes from a notebook, with timeouts; ``torchrun``
``check``          the layer against :class:`helpers.moe.DeepSeekMoE` (``python -m helpers.parallel check``)
``traffic``        rows and bytes each rank sends, destinations per token, node-limited routing at scale
``capstone``       traffic of the trained capstone's routing (``python -m helpers.parallel.capstone``)
``planner``        replication and packing of experts from observed loads (the idea of DeepSeek's EPLB)
``diagrams``       the pictures of notebook 14
=================  ===========================================================================

Routing and the sorted dispatch are imported from :mod:`helpers.moe`, never copied.
"""

from helpers.parallel.comm import AllToAll, AllToAllDispatcher
from helpers.parallel.launch import launch
from helpers.parallel.layer import ExpertParallelMoE
from helpers.parallel.layout import ExpertLayout

__all__ = ["ExpertLayout", "AllToAll", "AllToAllDispatcher", "ExpertParallelMoE", "launch"]
