"""parallel_map: every item once, errors and dead workers reported, never a hang."""

from __future__ import annotations

import os
import signal

import pytest

from crappify.errors import CrappifyError
from crappify.parallel import WorkerError, parallel_map


def _square(x: int) -> tuple[int, int, int]:
    return x, x * x, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 5, 203])
def test_every_item_once(workers, n):
    out = list(parallel_map(_square, list(range(n)), workers, chunk=4))
    assert sorted((x, y) for x, y, _ in out) == [(x, x * x) for x in range(n)]


def test_the_caller_works_too_and_children_share():
    out = list(parallel_map(_slow_square, list(range(64)), 2, chunk=2))
    pids = {pid for *_, pid in out}
    assert os.getpid() in pids and len(pids) == 2


def _slow_square(x: int) -> tuple[int, int, int]:
    import time

    time.sleep(0.002)
    return _square(x)


def _fail_in_child(x: int) -> int:
    import time

    time.sleep(0.001)  # so the caller cannot finish the list before a child has started
    if os.getpid() != _PARENT and x >= 0:
        raise CrappifyError(f"cannot write item {x}")
    return x


def _die_in_child(x: int) -> int:
    import time

    time.sleep(0.001)
    if os.getpid() != _PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


_PARENT = os.getpid()


def test_an_error_in_a_child_is_raised_in_the_caller():
    with pytest.raises(CrappifyError, match="cannot write item"):
        for _ in parallel_map(_fail_in_child, list(range(400)), 2, chunk=1):
            pass


def test_a_child_killed_from_outside_is_reported_not_waited_for():
    with pytest.raises(WorkerError, match="died"):
        for _ in parallel_map(_die_in_child, list(range(400)), 3, chunk=1):
            pass


def test_init_runs_in_children():
    out = list(parallel_map(_env_flag, list(range(40)), 2, chunk=1, init=_set_flag))
    flags = [flag for pid, flag in out if pid != os.getpid()]
    assert flags and set(flags) == {"set"}


def _set_flag() -> None:
    os.environ["CRAPPIFY_TEST_FLAG"] = "set"


def _env_flag(_: int) -> tuple[int, str]:
    import time

    time.sleep(0.001)
    return os.getpid(), os.environ.get("CRAPPIFY_TEST_FLAG", "")


def test_children_start_before_the_caller_iterates_and_are_gone_after():
    """The items wait for `go`, set only after the count: on a busy machine the children could otherwise do all
    the work and exit before the test looked (it once saw 1 child of 2)."""
    import functools
    import multiprocessing as mp

    go = mp.get_context("fork").Event()
    it = parallel_map(functools.partial(_gated_square, go), list(range(40)), 3, chunk=2, start_method="fork")
    assert len(mp.active_children()) == 2  # forked now, before the caller can start threads of its own
    go.set()
    assert sorted(x for x, *_ in it) == list(range(40))
    assert not mp.active_children()


def _gated_square(go, x: int) -> tuple[int, int, int]:
    assert go.wait(60), "the test never said go"
    return _square(x)


def test_spawned_children_work_too():
    """Where fork is missing (Windows, and macOS's default), children are spawned: fn, init and items pickled."""
    out = list(parallel_map(_slow_square, list(range(300)), 2, chunk=4, init=_set_flag, start_method="spawn"))
    assert sorted(x for x, *_ in out) == list(range(300))
    assert {pid for *_, pid in out} - {os.getpid()}, "the spawned child did no work"
