"""Run by `torchrun` in tests/srgan/test_distributed.py: one rank of a data-parallel train-gan phase, which
records what it saw and decided at every step into OUT/rankN.json (argv: config JSON, OUT, [--resume]); or, with
`--ddp-check OUT`, the gradients `srgan.distributed.average_gradients` gives next to DDP's on the same data."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from fastai.callback.core import Callback

from srgan.train_gan import TrainGanConfig, train_gan


def digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Record(Callback):
    order = 54  # after the switcher has decided (0), before Progress (55) may end the fit

    def __init__(self):
        self.rows = []

    def before_batch(self):
        self.was_gen = bool(self.learn.gan_trainer.gen_mode)
        self.batch = digest([*self.learn.xb, *self.learn.yb])

    def after_batch(self):
        if not self.training:
            return
        trainer = self.learn.gan_trainer
        self.rows.append({"trained": "generator" if self.was_gen else "critic", "next_gen": bool(trainer.gen_mode),
                          "loss": float(self.learn.loss), "batch": self.batch,
                          "generator": digest(trainer.generator.state_dict().values()),
                          "critic": digest(trainer.critic.state_dict().values())})


def ddp_check(out: str) -> None:
    """DDP's gradients (a DDP-wrapped copy) against ours (the plain module, then `average_gradients`) on each
    rank's own data; then a gradient penalty's double backward, which DDP does not support, through the plain
    module and averaged, against the mean of the ranks' own gradients gathered by hand."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from srgan.distributed import average_gradients, finish, join

    join(torch.device("cpu"))
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(4, 1, 3))
    ddp_net = DistributedDataParallel(copy.deepcopy(net))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank + 1))
    ddp_net(x).square().mean().backward()
    net(x).square().mean().backward()
    average_gradients(net.parameters())
    pairs = zip(net.parameters(), ddp_net.parameters(), strict=True)
    plain = all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in pairs)
    net.zero_grad(set_to_none=True)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    (g.square().mean() + net(x).mean()).backward()  # the penalty with a plain term: every parameter has a grad
    local = [p.grad.clone() for p in net.parameters()]
    average_gradients(net.parameters())
    means = []
    for t in local:
        parts = [torch.zeros_like(t) for _ in range(2)]
        torch.distributed.all_gather(parts, t)
        means.append((parts[0] + parts[1]) / 2)
    penalty = all(torch.allclose(p.grad, m, atol=1e-6) for p, m in zip(net.parameters(), means, strict=True))
    with open(os.path.join(out, f"ddp{rank}.json"), "w") as fh:
        json.dump({"plain": plain, "penalty": penalty, "ranks_differ": not torch.allclose(local[0], means[0])}, fh)
    del ddp_net  # its reducer's threads go before the group does
    finish()  # a barrier, then leave the group: destroying it while the other rank still used it aborted a rank


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--ddp-check":
        ddp_check(sys.argv[2])
        sys.exit(0)
    cfg = TrainGanConfig(**json.loads(sys.argv[1]))
    rec = Record()
    train_gan(cfg, resume="--resume" in sys.argv, progress=False, cbs=[rec])
    with open(os.path.join(sys.argv[2], f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump(rec.rows, fh)
