"""The registry of the experts' backends, and :func:`dispatch`, the learner-facing way to call one by name.

A backend computes the routed sum of V3 eq. 12, ``y_t = sum_i g_{i,t} FFN_i(u_t)``, from the routing's
``weights`` and ``indices``; every backend gives the same numbers (``tests/test_paths.py``). It is a function
``fn(u, weights, indices, w_gate_up, w_down)`` registered under a name with :func:`register_backend`, like
``transformers``' experts implementations (``config._experts_implementation``). The backends that share the
experts over CPU threads (:data:`THREADED`) also take ``n_workers``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from helpers.inputs import check_expert_ids, check_float_like, check_scores, require_tensor
from helpers.rules import require_choice, require_positive

BACKENDS: dict[str, Callable[..., Tensor]] = {}
"""Backend name -> function; filled by :func:`register_backend` when the backends' modules are imported."""
THREADED = ("auto", "loop", "sorted")
"""The backends that take ``n_workers`` (the threads the experts are shared over)."""


def register_backend(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """A decorator: ``@register_backend("sorted")`` makes the function the backend of that name."""
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        BACKENDS[name] = fn
        return fn
    return register


def run_backend(name: str, u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
                n_workers: int | None = None) -> Tensor:
    """The backend ``name`` on these operands, unchecked: the layer's own call (its routing made them)."""
    if n_workers is None:
        return BACKENDS[name](u, weights, indices, w_gate_up, w_down)
    return BACKENDS[name](u, weights, indices, w_gate_up, w_down, n_workers=n_workers)


def require_backend(name: str) -> None:
    """``ValueError`` naming the closest backend unless ``name`` is registered."""
    require_choice("backend", name, BACKENDS)


def check_experts(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor) -> None:
    """The operands of a backend: ``u`` (T, H), ``weights``/``indices`` (T, k), experts (E, 2I, H) and (E, H, I)."""
    require_tensor("w_gate_up", w_gate_up, "[experts, 2 * intermediate, hidden]")
    require_tensor("w_down", w_down, "[experts, hidden, intermediate]")
    if w_gate_up.dim() != 3 or w_down.dim() != 3 or w_down.shape[0] != w_gate_up.shape[0] \
            or tuple(w_gate_up.shape[1:]) != (2 * w_down.shape[2], w_down.shape[1]):
        raise ValueError(f"w_gate_up must be (E, 2I, H) and w_down (E, H, I) with the same E, H and I, got "
                         f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}: pass the layer's w_gate_up and w_down")
    check_float_like("w_down", w_down, w_gate_up, owner="w_gate_up")
    require_tensor("u", u, f"[tokens, hidden={w_down.shape[1]}]")
    if u.dim() != 2 or u.shape[1] != w_down.shape[1]:
        raise ValueError(f"u must be [tokens, hidden={w_down.shape[1]}], got shape {tuple(u.shape)}: flatten the "
                         f"leading dims with u.reshape(-1, {w_down.shape[1]})")
    check_float_like("u", u, w_gate_up, owner="the experts")
    check_scores("weights", weights)
    require_tensor("indices", indices, "[tokens, k] of expert ids")
    if weights.shape != indices.shape or indices.shape[0] != u.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be (T, k) "
                         f"with T = {u.shape[0]}, the rows of u")
    check_expert_ids("indices", indices, w_gate_up.shape[0])


def dispatch(u: Tensor, weights: Tensor, indices: Tensor, w_gate_up: Tensor, w_down: Tensor,
             n_workers: int | None = None, path: str = "auto", *, backend: str | None = None) -> Tensor:
    """``sum_i g_{i,t} FFN_i(u_t)`` over the chosen experts (the routed part of V3 eq. 12), by a named backend.

    Args:
        u: (T, H) tokens.
        weights: (T, k) gating values ``g``.
        indices: (T, k) chosen experts.
        w_gate_up: (E, 2I, H) fused gate and up projections (gate rows first), like ``transformers``.
        w_down: (E, H, I) down projections.
        n_workers: threads to share the experts over (only the backends in :data:`THREADED`).
        path, backend: the backend's name (``backend`` is the newer spelling and wins): ``"reference"`` (the
            plain loop, :func:`helpers.moe.layer.reference_experts`), ``"loop"``, ``"grouped"``, ``"sorted"``,
            ``"compiled"``, or ``"auto"`` (choose by the work's size, :class:`helpers.moe.backends.auto.Auto`).

    Returns:
        (T, H), in ``u``'s dtype.

    Every argument is checked (shapes, dtypes, devices, expert ids in range: one host sync), unlike the
    layer's own call, whose routing produced them.
    """
    name = backend or path
    require_backend(name)
    if n_workers is not None:
        require_positive(n_workers=n_workers)
        if name not in THREADED:
            raise ValueError(f"n_workers applies to the backends {THREADED}, not {name!r}: leave it out")
    check_experts(u, weights, indices, w_gate_up, w_down)
    return run_backend(name, u, weights, indices, w_gate_up, w_down, n_workers)


def run_experts(rows: Tensor, expert_ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                n_workers: int | None = None) -> Tensor:
    """``FFN_e(row)`` for rows that already carry their expert: the receiving side of expert parallelism.

    Each row is one (token, expert) pair that arrived from some rank; no gating value is applied (the
    sender weights the results when they come back). It is the ``auto`` backend with ``k = 1`` and every
    gating value 1, so the same sorted dispatch and hand-written backward run on the received rows.

    Args:
        rows: (n, H) received token rows.
        expert_ids: (n,) the (local) expert of each row, in ``[0, w_gate_up.shape[0])``.
        w_gate_up: (E_local, 2I, H); w_down: (E_local, H, I): the experts this process holds.
        n_workers: threads, as in :func:`dispatch`.

    Returns:
        (n, H), row ``j`` is ``FFN_{expert_ids[j]}(rows[j])``.
    """
    if expert_ids.shape != rows.shape[:1]:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} must be ({rows.shape[0]},), one expert per row")
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)  # (n, 1) gating values
    return run_backend("auto", rows, ones, expert_ids[:, None], w_gate_up, w_down, n_workers)
