"""One run per output folder, and no temporary files left behind by killed runs.

`folder_lock(folder)` takes an exclusive lock on `FOLDER/.lock` for as long as a command writes there, so two
runs on the same dataset, run or output folder cannot interleave their writes: the second fails at once with
one line naming the first one's pid. It is an OS lock (`fcntl.flock`), so it is released when its process
dies, however it dies — a SIGKILLed run never leaves a lock that needs removing by hand (its file may stay,
unlocked; a run that ends normally removes it). A forked child (a build's worker) closes its inherited copy of
the descriptor at once, so it never holds the lock: a worker that outlives a SIGKILLed parent cannot keep the
folder locked.

`clean_stale_temps(folder)` removes the temporary files (`.NAME.crappify-tmp-PID`, see
`crappify.imageio.replacing`) that a killed run of this tool left, once the folder's lock is held: only names
with the tool's tag, only in the folders a run writes, never anything else a user keeps there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from crappify.errors import CrappifyError
from crappify.imageio import temp_pid, temp_prefix

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the body; CrappifyError if another process
    holds it. Re-entrant within one process for the same folder (a pipeline stage inside `crappify run`).
    The lock file is removed when the body ends (so a user's output folder is left as it was), and so is a
    folder made here that holds nothing else (the run was refused)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CrappifyError(f"{folder} exists and is not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full filesystem, permissions
        raise CrappifyError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    key = str(folder.resolve())
    if key in _HELD:
        yield folder
        return
    path = folder / LOCK_NAME
    fd = _acquire(path, folder, what)
    try:
        with contextlib.suppress(OSError):  # the pid is for messages; a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = fd
        try:
            yield folder
        finally:
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still held: a process waiting on this file sees it gone and retries
                if created and not os.listdir(folder):
                    folder.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(path: Path, folder: Path, what: str) -> int:
    """An open descriptor of `path` holding its exclusive lock; the lock file is the one at `path` now (a holder
    removes it when it is done, so a lock taken on a file that was meanwhile unlinked is dropped and retried)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (docs/datasets.md says so)
        return _open_lock_file(path, folder)
    for _ in range(100):
        fd = _open_lock_file(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CrappifyError(f"{folder} is in use by another {what} (pid {other}); wait for it to "
                                "finish or stop it, then run again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise CrappifyError(f"cannot take the lock {path}")


def _open_lock_file(path: Path, folder: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only folder, permissions, a full disk
        raise CrappifyError(f"cannot write to {folder}: cannot create its lock file {path} "
                            f"({exc.strerror or exc})") from None


_HELD: dict[str, int] = {}  # folder (resolved) -> the descriptor holding its lock, in this process


def _forget_locks_in_child() -> None:
    """After a fork, in the child: close the inherited lock descriptors. An flock belongs to the open file, which
    parent and child share, so a child still running after its parent was killed would keep the folder locked
    (a rerun refused, naming the dead parent); closing the child's copy leaves the parent's lock as it was."""
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def clean_stale_temps(folder: str | Path, names: Iterable[str] | None = None, recursive: bool = False,
                      locked: bool = False) -> int:
    """Remove the temporary files in `folder` that a killed run of this tool left; returns how many.

    Only names carrying this tool's tag (`crappify.imageio.TEMP_TAG`) whose writing process is gone are
    candidates, never a user's `.notes.tmp-123`. `names`: only the temporaries of these target file names
    (for a folder the tool does not own, e.g. enhance's `-o`: the outputs this run is about to write).
    `recursive`: the sub-folders too (only for a folder the tool owns and marked, a dataset). `locked`: the caller
    holds the folder's lock before starting any worker, so no live run of this tool writes there and every tagged
    name but this process's own is stale whatever its pid says: pids are reused (pid_max is 32768 on many
    systems), and a killed run's temporary whose pid now belongs to another process would otherwise stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    prefixes = None if names is None else {temp_prefix(n) for n in names}
    removed = 0
    walker = os.walk(folder) if recursive else [(str(folder), [], _files(folder))]
    for root, _dirs, files in walker:
        for name in files:
            pid = temp_pid(name)
            if pid is None or pid == os.getpid() or (not locked and _pid_alive(pid)):
                continue
            if prefixes is not None and name[:-len(str(pid))] not in prefixes:
                continue
            path = os.path.join(root, name)
            if not os.path.isfile(path) or os.path.islink(path):  # ours are regular files
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def _files(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []
