"""Data-parallel training on several GPUs (or CPU processes) with no code change.

Launch any training command under `torchrun` (or `accelerate launch`):

    torchrun --nproc_per_node 4 -m crappify train-gen data/f30k -o runs/f30k

Each process sees RANK / WORLD_SIZE / LOCAL_RANK in its environment; fastai's `DistributedTrainer`
(which drives 🤗 Accelerate: DistributedDataParallel, SyncBatchNorm, a `DistributedDL` that gives each
rank its share of every epoch) does the work. Two things fastai lacks are added here: its
`DistributedDL` broadcasts the epoch's sample order through a CUDA tensor, so it cannot run on the
gloo (CPU) backend — ours broadcasts on the process group's own device; and only rank 0 may write
run files (history, previews, checkpoints, the generator), which the trainers ask `is_main()` about.

The GAN phase does not go through fastai's DistributedTrainer: DDP cannot take a critic whose parameters are
frozen for one step and trained the next, nor the gradient penalty's double backward (`autograd.grad` through
a DDP module is documented as unsupported). It keeps its two networks plain and does what DDP does by hand,
with the helpers below: the same start weights on every rank (`broadcast_tensors`), the gradients of the network
being trained averaged over the ranks before its optimiser step (`average_gradients`, DDP's arithmetic: a sum
divided by the world size), and rank 0's buffers (batch-norm statistics, spectral-norm vectors) copied to the
others after each step, as DDP's `broadcast_buffers` does before each forward.

A pipeline (`crappify run` under torchrun) runs several stages in one process group: `hold_group` keeps
`finish` from leaving it between stages.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from crappify.runlock import clean_stale_temps, folder_lock


def world_size() -> int:
    """Processes taking part (1 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


@contextlib.contextmanager
def run_folder(folder: str | Path, what: str, writes: tuple[str, ...] = ("",)) -> Iterator[None]:
    """For the body of a stage that writes into `folder`: rank 0 holds the folder's lock (a second run on it
    fails with one line) and first removes the temporary files killed runs of this tool left in the
    sub-folders `writes` (relative; "" is `folder` itself), the ones the stage writes; other ranks proceed."""
    if not is_main():
        yield
        return
    with folder_lock(folder, what):
        for sub in writes:
            clean_stale_temps(Path(folder) / sub)
        yield


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (`cuda:LOCAL_RANK`) when training on CUDA; the CPU stays the CPU."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (its state dict has no `module.` prefix)."""
    return getattr(model, "module", model)


def joined() -> bool:
    """Whether this process is in a process group (launched by torchrun and joined)."""
    return is_distributed() and torch.distributed.is_available() and torch.distributed.is_initialized()


def join(device: torch.device) -> None:
    """Join torchrun's process group if launched by it and not yet in it: nccl for CUDA, gloo for the CPU."""
    if not is_distributed() or joined():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _coalesced(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """`tensors` in groups of one dtype and device, so each group travels as one flat buffer."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    yield from groups.values()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Each gradient becomes its mean over the ranks (what DDP does after backward), one all-reduce per dtype;
    parameters without a gradient (a frozen network's) are left alone. Nothing happens outside a process group."""
    if not joined():
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    for group in _coalesced(grads):
        flat = _flatten_dense_tensors(group)
        torch.distributed.all_reduce(flat)
        flat /= world_size()
        for g, avg in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            g.copy_(avg)


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s values of `tensors` (parameters, buffers) copied into every rank's, in place."""
    if not joined():
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    with torch.no_grad():
        for group in _coalesced([t.data for t in tensors]):
            flat = _flatten_dense_tensors(group)
            torch.distributed.broadcast(flat, src)
            for t, value in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                t.copy_(value)


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (a new tensor; `value` itself outside a process group). A NaN on one
    rank makes every rank's mean NaN, so all ranks stop together on a non-finite loss."""
    if not joined():
        return value
    out = value.detach().clone()
    torch.distributed.all_reduce(out)
    return out / world_size()


def group_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU for nccl, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduced(value: float, dtype: torch.dtype, op: Any) -> float:
    """One number reduced over the ranks with `op`."""
    t = torch.tensor([value], dtype=dtype, device=group_device())
    torch.distributed.all_reduce(t, op=op)
    return t.item()


def rank_min(value: int) -> int:
    """The smallest of the ranks' `value`s (e.g. the batch each found fits), so every rank uses the same."""
    if not joined():
        return value
    return int(_reduced(value, torch.long, torch.distributed.ReduceOp.MIN))


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (e.g. a SIGTERM one of them received), so all ranks act on it together."""
    if not joined():
        return flag
    return _reduced(1.0 if flag else 0.0, torch.float32, torch.distributed.ReduceOp.MAX) > 0


_HELD = [0]  # > 0 while a pipeline runs its stages in one process group (see `hold_group`)


@contextlib.contextmanager
def hold_group() -> Iterator[None]:
    """For a pipeline's run of stages: `finish` keeps the process group (the stages after need it) and the group
    is left once, when the outermost `hold_group` ends."""
    _HELD[0] += 1
    try:
        yield
    finally:
        _HELD[0] -= 1
        if not _HELD[0]:
            finish()


def finish() -> None:
    """End of a data-parallel command: every rank waits for the others, then leaves the process group.

    Left to interpreter exit, the gloo group was torn down while its threads still ran, and a rank died with
    "terminate called without an active exception" (SIGABRT) after training had finished — in about one run
    in five of train-critic on two CPU processes.
    """
    barrier()
    if _HELD[0]:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@functools.cache
def _any_backend_dl_class() -> type:
    """`AnyBackendDL`, defined on first use: it subclasses fastai's `DistributedDL`, and this module does not
    import fastai at its top (the stages import it for their configs)."""
    from fastai.distributed import DistributedDL

    class AnyBackendDL(DistributedDL):
        """fastai's `DistributedDL` (each rank its share of every pass, the order broadcast from rank 0) on any
        backend: fastai's puts the order on CUDA to broadcast it, which the gloo (CPU) backend cannot take."""

        def _broadcast(self, t: Any, rank: int) -> Any:
            tensor = torch.tensor(t, dtype=torch.long, device=group_device())
            torch.distributed.broadcast(tensor, rank)
            return tensor.cpu().tolist()

    return AnyBackendDL


def any_backend_dl(dl: Any, device: torch.device) -> Any:
    """`dl` as fastai's `DistributedDL` (this rank's share of every pass) that also runs on the gloo backend."""
    return _any_backend_dl_class()(dl, device=device)


def distributed_callback(device: torch.device):
    """fastai's DistributedTrainer with a `DistributedDL` that also works on the gloo backend (and
    SyncBatchNorm only on GPUs, the only place PyTorch runs it)."""
    from fastai.distributed import DistributedDL, DistributedTrainer

    class Trainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            device = next(self.learn.model.parameters()).device  # fastai asks the model for `.device`
            return dl if isinstance(dl, DistributedDL) else any_backend_dl(dl, device=device)

    # Accelerate only goes multi-process on the CPU when told `cpu=True` (else it silently trains each rank
    # alone, with no gradient averaging).
    return Trainer(sync_bn=device.type == "cuda", cpu=device.type == "cpu")
