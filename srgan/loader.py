"""A fastai DataLoader whose shuffled order is reproducible.

fastai's `DataLoader` shuffles with a `random.Random` seeded from the global `random` module when it is
made, and silently drops a `seed` argument, so two runs given the same seed trained on different batch
orders (a critic test that was meant to be deterministic passed or failed by luck). Here each epoch's
order is drawn from (seed, the dataset's epoch), which the trainers set before every epoch: the same
seed gives the same batches, and a run resumed at epoch k sees the order the uninterrupted run saw.
Kept in its own module (importing fastai) so that loader worker processes can unpickle the class.

A `CrappifyError` raised in a worker process (too many unreadable pairs, say) reaches the main process as
torch's re-raise: the same class with "Caught ... in DataLoader worker process N" and the whole worker traceback
as its message. The loader gives back the original one-line message, as when it is raised without workers.
"""

from __future__ import annotations

import random
from typing import Any

from fastai.data.load import DataLoader

from crappify.errors import CrappifyError


def worker_error(exc: BaseException) -> BaseException:
    """The error a DataLoader worker raised, with its own one-line message, when `exc` is torch's re-raise of a
    `CrappifyError` from a worker; else `exc` itself (a bug keeps its whole traceback)."""
    text = str(exc)
    if not isinstance(exc, CrappifyError) or not text.startswith("Caught ") or "DataLoader worker" not in text:
        return exc
    cls = type(exc)
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind("\n" + prefix)
    if at < 0:  # not the formatted traceback expected: keep its last line, never the whole traceback
        lines = [line for line in text.splitlines() if line.strip()]
        return cls(lines[-1].strip() if lines else text)
    return cls(text[at + 1 + len(prefix):].strip())


class SeededDataLoader(DataLoader):
    """`DataLoader(dataset, order_seed=S, ...)`: shuffles by (S, `dataset.epoch`).

    `skip_next = n` drops the first n samples of the next pass only (a run resumed in the middle of an epoch
    goes on with the batches the uninterrupted run would have seen next).
    """

    def __init__(self, dataset: Any = None, order_seed: int = 0, **kwargs: Any) -> None:
        self.order_seed, self.skip_next = order_seed, 0
        super().__init__(dataset, **kwargs)

    def randomize(self) -> None:
        self.rng = random.Random(f"crappify-order:{self.order_seed}:{getattr(self.dataset, 'epoch', 0)}")

    def __iter__(self) -> Any:
        try:
            yield from super().__iter__()
        except CrappifyError as exc:
            err = worker_error(exc)
            if err is exc:
                raise
            raise err from None

    def get_idxs(self) -> Any:
        # fastai calls this once per pass, in the process that owns the loader (workers get the result), and
        # so does its DistributedDL for the loader it wraps: the skip is used up here, for one pass only.
        idxs, skip, self.skip_next = super().get_idxs(), self.skip_next, 0
        return list(idxs)[skip:] if skip else idxs


def skip_samples(dl: Any, n: int) -> None:
    """Drop the first `n` samples of `dl`'s next pass: through `skip_next` on a `SeededDataLoader`; on a loader
    that hands this process its share of each pass (fastai's `DistributedDL` under torchrun), of that share, so
    every rank goes on with the batches it would have seen next."""
    if not n:
        return
    if isinstance(dl, SeededDataLoader):
        dl.skip_next = n
        return
    get_idxs = dl.get_idxs

    def once() -> list:
        del dl.get_idxs  # the class's own again from the next pass on
        return list(get_idxs())[n:]

    dl.get_idxs = once
