"""One rank fails, every rank stops with the same clear error (never a silent hang).

    with fail_together(ctx):
        run_the_job()

On an exception in rank r: the message ("rank r: ValueError: ...") is recorded in the process
group's key-value store (torchrun's, which outlives the workers), printed to stderr, and the rank
leaves the process group, which closes its connections so peers blocked in a collective fail at
once (gloo) or at the collective timeout (NCCL's watchdog). A peer's exception (the broken
collective, the timeout, or the SIGTERM torchrun sends when a worker dies) is then reported as
RankFailedError naming the rank that failed first and its error. If no failure was recorded (a
rank hung or was killed without a Python error), the peer says that instead.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress

import torch.distributed as dist

from rlpt_fast.distributed.context import DistContext

FAILED_KEY = "rlpt/failed"


class RankFailedError(RuntimeError):
    """This rank stopped because another rank failed (or hung); the message names it."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()  # torch's own store of the group
    except Exception:  # noqa: BLE001 (no group, or it is already torn down)
        return None


def _record(ctx: DistContext, message: str) -> None:
    store = _store()
    if store is None:
        return
    with suppress(Exception):  # the store's host may be gone; the error is still raised here
        store.compare_set(FAILED_KEY, "", message)  # first failure wins: later ones are consequences


def recorded_failure(wait_s: float = 2.0) -> str | None:
    """The first failure any rank recorded, or None (waits briefly: the report may be in flight)."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([FAILED_KEY]):
                value = store.get(FAILED_KEY).decode()
                if value:
                    return value
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _on_sigterm(signum, frame):
    raise RankFailedError("received SIGTERM (the launcher is stopping the job)")


def _is_consequence(error: BaseException) -> bool:
    """A collective that broke or timed out, or the launcher's SIGTERM: caused elsewhere."""
    if isinstance(error, (RankFailedError, dist.DistError, TimeoutError, ConnectionError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))


@contextmanager
def fail_together(ctx: DistContext):
    """See the module docstring. Alone (world size 1) it only lets the exception through."""
    if not ctx.distributed:
        yield
        return
    main_thread = threading.current_thread() is threading.main_thread()  # signals: main thread only
    old = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        yield
    except BaseException as e:
        own = f"rank {ctx.rank}: {type(e).__name__}: {e}"
        first = recorded_failure(wait_s=2.0 if _is_consequence(e) else 0.0)
        if first is not None and _is_consequence(e) and not first.startswith(f"rank {ctx.rank}:"):
            msg = f"rank {ctx.rank} stops because {first} (here: {type(e).__name__}: {e})"
            print(f"[rank {ctx.rank}] {msg}", file=sys.stderr, flush=True)
            raise RankFailedError(msg) from e
        if _is_consequence(e):
            msg = (f"{own} -- no rank recorded an error: a peer hung or was killed (e.g. out of memory) "
                   f"within the {ctx.timeout_s:.0f} s collective timeout")
            print(f"[rank {ctx.rank}] {msg}", file=sys.stderr, flush=True)
            raise RankFailedError(msg) from e
        _record(ctx, own)
        print(f"[rank {ctx.rank}] failed: {type(e).__name__}: {e}; stopping every rank", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()  # close connections: blocked peers fail now, not at the timeout
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
