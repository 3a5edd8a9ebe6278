"""Start N local processes with a gloo process group, run a function on each, never hang.

``launch(fn, nproc, *args)`` runs ``fn(rank, nproc, *args)`` in ``nproc`` fresh processes (from a
notebook or a script) and returns the ``nproc`` results in rank order. The parent hosts the
rendezvous store on a port the OS picks (no port clashes), every process group has a timeout, and
the parent watches the workers: if one raises, its exception is raised here (with its rank and
traceback); if one dies, a ``RuntimeError`` says which within a fraction of a second; in both cases
the other workers are stopped. The same worker functions run under ``torchrun`` (see
:mod:`helpers.parallel.__main__`), where ``init_from_env`` joins the group torchrun set up.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def _context():
    # forkserver: one clean server process imports torch once, then forks each worker cheaply and
    # safely (no threads of the parent are copied); spawn where forkserver does not exist.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "helpers.parallel"])
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Hide ``__main__``'s file while workers start: they import ``fn`` from its module and must not re-run
    the caller's script (a script without a ``__main__`` guard, or code piped to ``python -``)."""
    main = sys.modules["__main__"]
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    main.__spec__ = None
    if "__file__" in saved:
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _worker(rank: int, nproc: int, port: int, pg_timeout: float, threads: int, fn: Callable, args: tuple,
            results) -> None:
    try:
        torch.set_num_threads(threads)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=nproc,
                                timeout=timedelta(seconds=pg_timeout))
        value = fn(rank, nproc, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # tensors pickled by value, not through shared memory
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        try:
            blob = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            blob = None
        results.put((rank, "error", (blob, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join(timeout=2)


def launch(fn: Callable, nproc: int, *args, timeout: float = 120.0, pg_timeout: float = 30.0,
           threads: int = 1) -> list:
    """``[fn(rank, nproc, *args) for rank in range(nproc)]``, each call in its own process of one gloo group.

    Args:
        fn: a module-level function (the workers import it by name, so not one defined in a notebook).
        nproc: number of processes.
        timeout: seconds the whole run may take before the workers are stopped (``TimeoutError``).
        pg_timeout: the process group's timeout: a collective waiting longer for a peer fails.
        threads: ``torch.set_num_threads`` in each worker.

    Returns:
        The results in rank order.

    Raises:
        The worker's own exception (with ``rank r:`` in front of its message) if a worker raises;
        ``RuntimeError`` naming the rank and exit code if a worker dies; ``TimeoutError``.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if getattr(fn, "__module__", "__main__") == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"fn must be a function defined at the top of a module (the workers import it), got {fn!r}")
    ctx = _context()
    store = dist.TCPStore(HOST, 0, None, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout))  # port 0: the OS picks a free one
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, nproc, store.port, pg_timeout, threads, fn, args, results),
                         daemon=True, name=f"rank{rank}") for rank in range(nproc)]
    with _main_not_rerun():
        for p in procs:
            p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < nproc:
            try:
                rank, status, payload = results.get(timeout=0.05)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in done and p.exitcode is not None:
                        try:  # its message may still be in the pipe
                            rank, status, payload = results.get(timeout=0.5)
                            break
                        except queue.Empty:
                            raise RuntimeError(f"rank {rank} died (exit code {p.exitcode}) before returning a "
                                               f"result; the other {nproc - 1} ranks were stopped") from None
                else:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the {nproc} workers did not finish within {timeout} s; stopped them")
                    continue
            if status == "ok":
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                continue
            blob, trace = payload
            exc = pickle.loads(blob) if blob is not None else None
            time.sleep(0.2)  # a peer's death is the cause if a rank failed on a broken connection
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if r != rank and p.exitcode not in (None, 0)]
            if dead:
                cause = (str(exc).splitlines() or [""])[0] if exc is not None else "failed"
                cause = cause if len(cause) <= 60 else cause[:57] + "..."
                raise RuntimeError(f"rank {dead[0][0]} died (exit code {dead[0][1]}) before returning a result; "
                                   f"the other ranks were stopped (rank {rank} had failed: {cause})")
            message = f"rank {rank}: {exc if exc is not None else 'worker failed'}\n\nworker traceback:\n{trace}"
            try:
                raise type(exc)(message) from None
            except TypeError:  # an exception type that takes other arguments
                raise RuntimeError(message) from None
    finally:
        _stop(procs)
        del store
    return [done[rank] for rank in range(nproc)]


def init_from_env(pg_timeout: float = 30.0) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on a GPU)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=pg_timeout))
    return dist.get_rank(), dist.get_world_size()


def under_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
