"""The GAN phase's fastai pieces (train-gan's loop): its loss, switchers and callbacks, as top-level classes.

Imported by `srgan.train_gan` when a phase starts, never at package import: this module imports fastai (~2 s) at its
top, the way `srgan.callbacks` does. What each class fixes or adds to fastai's GAN machinery is in its docstring.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.fp16 import MixedPrecision
from fastai.vision.gan import FixedGANSwitcher, GANLoss

from crappify.errors import CrappifyError, Interrupted
from srgan.callbacks import ema_update, loss_terms
from srgan.callbacks import history_value as _num
from srgan.distributed import any_rank, average_gradients, broadcast_tensors, joined, rank_mean
from srgan.loader import skip_samples


def non_finite(gan, net: str, loss: torch.Tensor) -> CrappifyError:
    """The one-line error for a NaN/inf loss of `net` at the coming step, saying what checkpoint is left."""
    kept = f"the last good checkpoint ({gan.last}) is kept" if gan.last.is_file() else "no checkpoint was written yet"
    return CrappifyError(f"{net} loss became {loss.item()} at GAN step {gan.step + 1}; {kept} "
                         "(lower --lr, or use --precision fp32)")


def penalty(adversarial, critic, real, fake, rng) -> torch.Tensor:
    """The adversarial loss's gradient penalty (wgan-gp) with the critic run eagerly: its double backward is not
    supported through a compiled forward (--compile)."""
    with torch.compiler.set_stance("force_eager"):
        return adversarial.penalty(critic, real, fake, rng)


class CrappifyGANLoss(GANLoss):
    """fastai's GANLoss with our generator and critic terms (see `srgan.adversarial`).

    generator: w_content × content(output, target) + w_adv × adversarial.generator(critic(output)).
    critic: adversarial.critic(critic(real), critic(generator(input))) (+ the gradient penalty for wgan-gp,
    on the real batch the GANTrainer fed the critic, stored in `real` by the guard callback).
    Each term of the latest step is kept (`*_loss`, `crit_adv`, `gp`) for the history and TensorBoard.
    """

    def __init__(self, content, adversarial, w_content, w_adv, gan_model, seed=0):
        super().__init__(None, None, gan_model)
        self.content, self.adversarial, self.w_content, self.w_adv = content, adversarial, w_content, w_adv
        self.rng = torch.Generator().manual_seed(seed)  # the penalty's ε, not the global random state
        self.real = None
        self.gen_loss = self.crit_loss = self.content_loss = self.adv_loss = self.crit_adv = self.gp = None

    def generator(self, output, target):
        fake_pred = self.gan_model.critic(output)
        self.adv_loss = self.adversarial.generator(fake_pred)
        self.content_loss = self.content(output, target).float()
        self.gen_loss = self.w_content * self.content_loss + self.w_adv * self.adv_loss
        return self.gen_loss

    def critic(self, real_pred, input):
        with torch.no_grad():  # the generator is not trained here: no graph needed (fastai keeps one)
            fake = self.gan_model.generator(input)
        loss = self.crit_adv = self.adversarial.critic(real_pred, self.gan_model.critic(fake))
        if self.adversarial.needs_images:
            self.gp = penalty(self.adversarial, self.gan_model.critic, self.real, fake, self.rng)
            loss = loss + self.gp
        self.crit_loss = loss
        return loss


def _value(t: Any) -> float | None:
    return None if t is None else float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def term_scalars(lf: CrappifyGANLoss, generator: bool) -> dict[str, float | None]:
    """TensorBoard's scalars of one step's loss terms: the generator's weighted sum, content loss (unweighted, and
    its parts: `srgan.callbacks.loss_terms`) and adversarial term (unweighted); or the critic's sum, adversarial
    term and weighted gradient penalty (wgan-gp)."""
    if generator:
        return {"loss/generator": _value(lf.gen_loss), "loss/content": _value(lf.content_loss),
                "loss/adversarial": _value(lf.adv_loss), **loss_terms(lf.content, "loss/content")}
    return {"loss/critic": _value(lf.crit_loss), "loss/critic/adversarial": _value(lf.crit_adv),
            "loss/critic/gradient_penalty": _value(lf.gp)}


class ResumableFixedSwitcher(FixedGANSwitcher):
    """fastai's FixedGANSwitcher, except that its counts carry over epochs (fastai resets them at every
    epoch start) and can be restored on resume."""

    def __init__(self, n_crit, n_gen):
        super().__init__(n_crit, n_gen)
        self.n_c = self.n_g = 0

    def before_train(self):
        pass


class PerBatchCritic(Callback):
    """`per-batch` switching (PyTorch-GAN's SRGAN loop, Real-ESRGAN's): the GANTrainer stays in generator mode,
    and after each generator step this callback takes one critic step on the same batch — the real HR
    images and the very fakes the generator step made, before its update — with the critic's learning
    rate (× mult_lr) and the same optimiser. It also stands in for fastai's switcher (never switching).

    Order 20: after MixedPrecision's after_step (10) has updated its scaler, before Progress (55) counts the
    step, so a checkpoint holds both updates.
    """

    order = 20

    def __init__(self, mult_lr, gan):
        self.mult_lr, self.gan = mult_lr, gan

    def after_step(self):
        if not self.training:
            return
        learn, lf = self.learn, self.learn.loss_func
        gen, critic = learn.gan_trainer.generator, learn.gan_trainer.critic
        for p in gen.parameters():  # its step is done: this step must move the critic only
            p.grad = None
        real, fake = learn.yb[0], learn.pred.detach()
        was_training = critic.training
        gen.requires_grad_(False)
        critic.requires_grad_(True).train()
        try:
            mp = next((cb for cb in learn.cbs if isinstance(cb, MixedPrecision)), None)
            with mp.autocast if mp is not None else contextlib.nullcontext():
                loss = lf.crit_adv = lf.adversarial.critic(critic(real), critic(fake))
            if lf.adversarial.needs_images:
                lf.gp = penalty(lf.adversarial, critic, real, fake, lf.rng)
                loss = loss + lf.gp
            mean = rank_mean(loss)  # data-parallel: every rank checks (and records) the same value
            lf.crit_loss = mean.detach()
            if self.gan.board is not None:  # this critic step's terms, written before a NaN among them stops it
                self.gan.board.scalars(term_scalars(lf, generator=False), self.gan.step + 1)
            if not torch.isfinite(mean).all():
                raise non_finite(self.gan, "critic", mean)
            scaler = getattr(learn, "scaler", None) if mp is not None else None
            (scaler.scale(loss) if scaler is not None else loss).backward()
            average_gradients(critic.parameters())
            lrs = [h["lr"] for h in learn.opt.hypers]
            learn.opt.set_hyper("lr", [lr * self.mult_lr for lr in lrs])
            if scaler is not None and scaler.is_enabled():  # fp16: skip the step on overflow, as fastai does
                mp.skipped = True
                scaler.step(mp)  # MixedPrecision poses as the optimiser; its step() only clears `skipped`
                if not mp.skipped:
                    learn.opt.step()
                scaler.update()
            else:
                learn.opt.step()
            learn.opt.set_hyper("lr", lrs)
        finally:
            for p in critic.parameters():
                p.grad = None
            critic.requires_grad_(False).train(was_training)
            gen.requires_grad_(True)


class SyncRanks(Callback):
    """Data-parallel GAN phase (torchrun): what DDP would do, by hand (see `srgan.distributed`). The loss each
    rank computed becomes the mean over the ranks before anyone looks at it (order -4: before StopOnNonFinite
    and the switchers), so every rank stops, switches and records alike; the gradients of the network being
    trained are averaged before its step (after Guard has dropped the frozen one's, before MixedPrecision
    steps); after each batch rank 0's buffers go to every rank. Added only when the phase runs on several ranks.
    """

    order = -4

    def after_loss(self):
        if self.training:
            self.learn.loss = rank_mean(self.learn.loss)

    def before_step(self):
        trainer = self.learn.gan_trainer
        average_gradients((trainer.generator if trainer.gen_mode else trainer.critic).parameters())

    def after_batch(self):  # after the per-batch critic's step too (PerBatchCritic.after_step)
        if self.training:
            trainer = self.learn.gan_trainer
            broadcast_tensors([*trainer.generator.buffers(), *trainer.critic.buffers()])


class Guard(Callback):
    """Fixes to fastai's GAN loop (order -5: before GANTrainer and MixedPrecision)."""

    order = -5

    def before_train(self):
        # TrainEvalCallback puts the whole GANModule in train mode at each epoch start, after GANTrainer
        # chose which network trains: put the loss network back in eval mode (no dropout, no BN/SN updates).
        self.learn.gan_trainer._set_trainable()

    def before_validate(self):
        # No validation in the GAN phase (checkpoints and previews judge it); GANTrainer.before_validate
        # would also flip the switcher into generator mode.
        raise CancelValidException()

    def after_pred(self):
        if not self.learn.gan_trainer.gen_mode:  # GANTrainer swapped xb/yb: the critic saw the real batch
            self.learn.loss_func.real = self.learn.xb[0]

    def before_step(self):
        # fastai's zero_grad zeroes gradients instead of dropping them, so the frozen network's parameters
        # still hold (zero) gradients and Adam's weight decay would move them: drop them.
        trainer = self.learn.gan_trainer
        frozen = trainer.critic if trainer.gen_mode else trainer.generator
        for p in frozen.parameters():
            p.grad = None


class StopOnNonFinite(Callback):
    """A NaN/inf loss ends the phase with a clear message; the last checkpoint stays as it was.
    Order 15: after MixedPrecision has left autocast (order 10), so no autocast state leaks out."""

    order = 15

    def __init__(self, gan):
        self.gan = gan

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss).all():
            raise non_finite(self.gan, "generator" if self.learn.gan_trainer.gen_mode else "critic", self.loss)


class TensorBoardTerms(Callback):
    """`--log tensorboard`: each term of the step's loss (`term_scalars`) at the step it makes. Order 12: after
    MixedPrecision's after_loss (10), before StopOnNonFinite's (15), so the terms of a step whose loss is NaN are
    written before that stops the phase. The per-batch critic's step writes its own (`PerBatchCritic`)."""

    order = 12

    def __init__(self, gan):
        self.gan = gan

    def after_loss(self):
        if self.training and self.gan.board is not None:
            gen = bool(self.learn.gan_trainer.gen_mode)
            self.gan.board.scalars(term_scalars(self.learn.loss_func, gen), self.gan.step + 1)


class Progress(Callback):
    """Per step: counts, EMA update, history row; checkpoints every N steps (with `save_state`, which train-gan
    hands in, as train-gen hands `save_checkpoint` to its epoch callback); stop after `total` steps."""

    order = 55  # after the switcher (0) and the Recorder (50)

    def __init__(self, gan, save_state: Callable[[Any, Any], None]):
        self.gan = gan
        self.save_state = save_state  # `save_state(learn, gan)`: train-gan's checkpoint at the current step

    def before_fit(self):  # after GANTrainer.before_fit: restore the resumed mode and switcher counts
        gan = self.gan
        n = max(1, len(self.dls.train))
        self.first_epoch = gan.step // n  # the epoch (crops and order) the checkpointed step was in
        # resumed mid-epoch: go on with the batches the uninterrupted run would have seen next (on each rank,
        # of its own share)
        skip_samples(self.dls.train, (gan.step % n) * self.dls.train.bs)
        if gan.gen_mode is not None:
            self.learn.gan_trainer.switch(gan.gen_mode)
        for cb in self.learn.cbs:
            if isinstance(cb, ResumableFixedSwitcher) and gan.switcher_state:
                cb.n_c, cb.n_g = gan.switcher_state["n_c"], gan.switcher_state["n_g"]

    def before_epoch(self):
        self.dls.train.dataset.set_epoch(self.first_epoch + self.epoch)

    def before_train(self):
        self.mark = time.perf_counter()

    def before_batch(self):
        self.check_stop()
        self.t0, self.was_gen = time.perf_counter(), bool(self.learn.gan_trainer.gen_mode)
        # the wait for this step's batch (loader, transfer, batch transforms), since the last step ended
        self.data_seconds = self.t0 - self.mark
        lf = self.learn.loss_func  # a row shows this step's losses only, never an earlier step's
        lf.gen_loss = lf.crit_loss = lf.content_loss = lf.adv_loss = lf.crit_adv = lf.gp = None

    def before_step(self):
        self.step_lr = self.opt.hypers[0]["lr"]

    def after_step(self):
        gan = self.gan
        if gan.ema is not None and self.was_gen:  # the generator's weights after its own steps only
            ema_update(gan.ema, self.learn.model.generator, gan.cfg.ema_decay)

    def after_batch(self):
        if not self.training:
            return
        gan, lf = self.gan, self.learn.loss_func
        gan.step += 1
        both = gan.cfg.switching == "per-batch"  # this step trained the generator, then the critic
        if both:
            gan.counts["gen_steps"] += 1
            gan.counts["crit_steps"] += 1
        else:
            gan.counts["gen_steps" if self.was_gen else "crit_steps"] += 1
        now_gen = bool(self.learn.gan_trainer.gen_mode)
        if now_gen != self.was_gen:
            gan.counts["to_gen" if now_gen else "to_crit"] += 1
        if joined():  # the row holds the ranks' means (the loss itself already is one: SyncRanks)
            names = [k for k in ("gen_loss", "crit_loss", "content_loss", "adv_loss") if getattr(lf, k) is not None]
            if names:
                means = rank_mean(torch.stack([getattr(lf, k).detach().float().reshape(()) for k in names]))
                for k, v in zip(names, means, strict=True):
                    setattr(lf, k, v)
        gan.rows.append({
            "step": gan.step, "epoch": (gan.step - 1) // max(1, len(self.dls.train)),
            "trained": "both" if both else "generator" if self.was_gen else "critic", "loss": _num(self.loss),
            "gen_loss": _num(lf.gen_loss), "crit_loss": _num(lf.crit_loss),
            "content_loss": _num(lf.content_loss), "adv_loss": _num(lf.adv_loss),
            "lr": getattr(self, "step_lr", ""), **gan.counts, "seconds": round(time.perf_counter() - self.t0, 4),
            "data_seconds": round(self.data_seconds, 4)})
        if gan.board is not None:  # the row, and each network's learning rate at the steps it trained
            lr = getattr(self, "step_lr", None)  # the rate of the network that trained (the critic's x mult in it)
            rates = {}
            if lr is not None and self.was_gen:
                rates["lr/generator"] = lr
            if lr is not None and (both or not self.was_gen):  # per-batch: the critic's step multiplies it itself
                rates["lr/critic"] = lr * gan.cfg.critic_lr_mult if both else lr
            gan.board.step = gan.step
            gan.board.row(gan.rows[-1])
            gan.board.scalars(rates)
        if gan.step % gan.cfg.checkpoint_every == 0 or gan.step >= gan.total:
            self.save_state(self.learn, gan)
            if gan.board is not None:  # the events up to a checkpoint are on disk with it
                gan.board.flush()
        if gan.step >= gan.total:
            raise CancelFitException()
        self.check_stop()
        self.mark = time.perf_counter()

    def check_stop(self):
        """After a SIGTERM: the resumable state at this step (unless it is on disk already), then stop."""
        gan = self.gan
        if gan.stop is None or not any_rank(gan.stop.requested):  # a SIGTERM to any rank stops them all here
            return
        gan.stop.acted = True
        where = f"train-gan stopped by SIGTERM at step {gan.step} of {gan.total}"
        if gan.step == 0:
            raise Interrupted(f"{where}: nothing trained yet, nothing saved")
        if gan.step != gan.saved_step:
            self.save_state(self.learn, gan)
            raise Interrupted(f"{where}; saved {gan.last}")
        raise Interrupted(f"{where}; {gan.last} is at that point")
