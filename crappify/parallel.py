"""Map a function over a list with N processes, the calling process being one of them.

Why not `multiprocessing.Pool`: a pool runs N workers beside a parent that only collects results, so
on an N-core machine N+1 processes (plus the pool's three helper threads) share N cores, and every
item is pickled on its way to a worker. Here the caller works too: N-1 children are started (forked
where the platform allows, so the list is inherited, not pickled), every process claims the next chunk
of indices from one shared counter, and the children send back only their results. A child that dies
without a word (killed, segfault) is reported instead of hanging the run (a Pool waits forever for
its tasks), and children stop when the parent is killed, so a resumed run never races with leftovers
of the previous one: on Linux the kernel kills them with it (PR_SET_PDEATHSIG), elsewhere they stop after
their current chunk; either way without a word (nobody is left to read it). Measured against the Pool on the
2-core VM, the speed is the same within the VM's noise (benchmarks/README.md); the gains are the failure
behaviour and one process per core.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

T = TypeVar("T")
R = TypeVar("R")

_DONE = "__done__"


class WorkerError(RuntimeError):
    """A worker process died without reporting (killed from outside, or crashed in native code)."""


def _claim(counter: Any, lock: Any, chunk: int, n: int) -> range | None:
    with lock:
        start = counter.value
        if start >= n:
            return None
        counter.value = min(n, start + chunk)
    return range(start, min(n, start + chunk))


def _die_with_parent(parent: int) -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies, so a killed build leaves no worker
    writing into its folder; then make sure the parent did not die before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no libc to call: the loop below still checks the parent
            pass
    if os.getppid() != parent:
        os._exit(0)


def _child(fn: Callable[[T], R], items: Sequence[T], counter: Any, lock: Any, chunk: int, conn: Connection,
           other_end: Connection, parent: int, init: Callable[[], None] | None) -> None:
    # A forked child holds a copy of the pipe's read end too: closed, a dead parent means a broken pipe here
    # (an error, so the child ends) rather than a send that waits forever once the pipe is full.
    other_end.close()
    _die_with_parent(parent)
    try:
        if init is not None:
            init()
        while os.getppid() == parent:  # the parent was killed: stop, leave the rest to the resumed run
            span = _claim(counter, lock, chunk, len(items))
            if span is None:
                break
            conn.send([fn(items[i]) for i in span])
        conn.send(_DONE)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        pass
    except BaseException as exc:  # handed to the parent, which re-raises it
        if os.getppid() != parent:  # the parent is gone (the send failed on a broken pipe): nobody to tell
            return
        try:
            conn.send(exc)
        except Exception:  # unpicklable: send its text
            conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, *, chunk: int | None = None,
                 init: Callable[[], None] | None = None, start_method: str | None = None) -> Iterator[R]:
    """An iterator of `fn(item)` for every item, in completion order, computed by `workers` processes.

    The children are started here, before this returns (so before the caller starts threads of its own,
    e.g. a progress bar's: forking a process with threads is how deadlocks start); the caller's share is
    computed as the iterator is consumed. `fn` and `init` (run once in each child) must be picklable where
    processes are spawned rather than forked. An exception raised in any process is raised from the
    iterator; the children are then stopped. `start_method`: "fork" where the platform has it, else "spawn".
    """
    n = len(items)
    if workers <= 1 or n <= 1:
        return (fn(item) for item in items)
    import multiprocessing as mp  # here: a 1-process run never needs it (6 ms of start-up)

    chunk = chunk or max(1, min(16, n // (workers * 16)))
    ctx = mp.get_context(start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn"))
    counter, lock = ctx.RawValue("q", 0), ctx.Lock()
    live: dict[Connection, Any] = {}
    try:
        for _ in range(workers - 1):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, items, counter, lock, chunk, send, receive, os.getpid(),
                                                    init), daemon=True)
            proc.start()
            send.close()
            live[receive] = proc
    except BaseException:
        _stop(live)
        raise
    return _collect(fn, items, counter, lock, chunk, live)


def _collect(fn: Callable[[T], R], items: Sequence[T], counter: Any, lock: Any, chunk: int,
             live: dict[Connection, Any]) -> Iterator[R]:
    """The caller's share of the work, interleaved with what the children send back."""
    from multiprocessing.connection import wait

    children = dict(live)
    try:
        while True:
            span = _claim(counter, lock, chunk, len(items))
            if span is None:
                break
            for i in span:
                yield fn(items[i])
            for conn in wait(list(live), timeout=0):  # what the children finished meanwhile
                yield from _receive(conn, live)
        while live:  # the caller's share is done: wait for the children's
            ready = set(wait([*live, *(p.sentinel for p in live.values())]))
            for conn, proc in list(live.items()):
                if conn in ready or proc.sentinel in ready:
                    yield from _receive(conn, live)
    finally:
        _stop(children)


def _stop(children: dict[Connection, Any]) -> None:
    for conn, proc in children.items():
        if proc.is_alive():
            proc.terminate()
        proc.join()
        conn.close()


def _receive(conn: Connection, live: dict[Connection, Any]) -> Iterator[Any]:
    """Results a child sent on `conn`; drops the child from `live` once it is done."""
    while conn in live and conn.poll():
        try:
            msg = conn.recv()
        except EOFError:  # closed without _DONE: the child died (its end closes with it, so poll() saw EOF)
            proc = live.pop(conn)
            proc.join()
            raise WorkerError(f"a worker process died (exit code {proc.exitcode})") from None
        if isinstance(msg, BaseException):
            raise msg
        if isinstance(msg, str) and msg == _DONE:
            live.pop(conn).join()
            return
        yield from msg
