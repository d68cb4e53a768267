"""One run per output folder, and no temporary files left behind by killed runs.

`folder_lock(folder)` takes an exclusive lock on `FOLDER/.lock` for as long as a command writes there, so two
runs on the same dataset, run or output folder cannot interleave their writes: the second fails at once with
one line naming the first one's pid. It is an OS lock (`fcntl.flock`), so it is released when its process
dies, however it dies — a SIGKILLed run never leaves a lock that needs removing by hand (its file may stay,
unlocked; a run that ends normally removes it).

`clean_stale_temps(folder)` removes the temporary files (`.NAME.tmp-PID`, see `crappify.imageio.replacing`)
that a killed process left, once the folder's lock is held.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from crappify.errors import CrappifyError
from crappify.imageio import is_temp_name

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
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        yield folder
        return
    path = folder / LOCK_NAME
    fd = _acquire(path, folder, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield folder
        finally:
            _HELD.discard(key)
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
    except ImportError:  # not POSIX: no lock (documented in the README)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


_HELD: set[str] = set()


def clean_stale_temps(folder: str | Path, recursive: bool = True, of: str | None = None) -> int:
    """Remove the temporary files under `folder` whose writing process is gone; returns how many. `of`: only
    those of that one file name (for a command that writes single files into a folder it does not own)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _dirs, files in walker:
        for name in files:
            if not is_temp_name(name) or (of is not None and not name.startswith(f".{of}.tmp-")):
                continue
            try:
                pid = int(name.rsplit(".tmp-", 1)[1])
            except ValueError:
                pid = -1
            if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed
