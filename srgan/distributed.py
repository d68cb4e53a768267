"""Data-parallel training on several GPUs (or CPU processes) with no code change.

Launch any training command under `torchrun` (or `accelerate launch`):

    torchrun --nproc_per_node 4 -m crappify train-gen data/f30k -o runs/f30k

Each process sees RANK / WORLD_SIZE / LOCAL_RANK in its environment; fastai's `DistributedTrainer`
(which drives 🤗 Accelerate: DistributedDataParallel, SyncBatchNorm, a `DistributedDL` that gives each
rank its share of every epoch) does the work. Two things fastai lacks are added here: its
`DistributedDL` broadcasts the epoch's sample order through a CUDA tensor, so it cannot run on the
gloo (CPU) backend — ours broadcasts on the process group's own device; and only rank 0 may write
run files (history, previews, checkpoints, the generator), which the trainers ask `is_main()` about.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

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
def run_folder(folder: str | Path, what: str) -> Iterator[None]:
    """For the body of a stage that writes into `folder`: rank 0 holds the folder's lock (a second run on it
    fails with one line) and first removes the temporary files killed runs left; other ranks just proceed."""
    if not is_main():
        yield
        return
    with folder_lock(folder, what):
        clean_stale_temps(folder)
        yield


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (`cuda:LOCAL_RANK`) when training on CUDA; the CPU stays the CPU."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (its state dict has no `module.` prefix)."""
    return getattr(model, "module", model)


def refuse_distributed(command: str) -> None:
    """Stages that do not run data-parallel say so instead of training each rank alone."""
    from crappify.errors import CrappifyError

    if is_distributed():
        raise CrappifyError(f"{command} runs in one process (its phase is short); launch it without torchrun")


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish() -> None:
    """End of a data-parallel command: every rank waits for the others, then leaves the process group.

    Left to interpreter exit, the gloo group was torn down while its threads still ran, and a rank died with
    "terminate called without an active exception" (SIGABRT) after training had finished — in about one run
    in five of train-critic on two CPU processes.
    """
    barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def distributed_callback(device: torch.device):
    """fastai's DistributedTrainer with a `DistributedDL` that also works on the gloo backend (and
    SyncBatchNorm only on GPUs, the only place PyTorch runs it)."""
    from fastai.distributed import DistributedDL, DistributedTrainer

    class AnyBackendDL(DistributedDL):
        def _broadcast(self, t, rank):  # fastai's puts `t` on CUDA, which gloo cannot broadcast
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            tensor = torch.tensor(t, dtype=torch.long, device=device)
            torch.distributed.broadcast(tensor, rank)
            return tensor.cpu().tolist()

    class Trainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            device = next(self.learn.model.parameters()).device  # fastai asks the model for `.device`
            return dl if isinstance(dl, DistributedDL) else AnyBackendDL(dl, device=device)

    # Accelerate only goes multi-process on the CPU when told `cpu=True` (else it silently trains each rank
    # alone, with no gradient averaging).
    return Trainer(sync_bn=device.type == "cuda", cpu=device.type == "cpu")
