"""Kill a training stage at each write point that matters, resume, and end where an uninterrupted run ends.

The write points: after the last checkpoint (before the final model file), between a checkpoint and its
history file, and right after a config change (before the new config's first checkpoint). A "kill" is an
exception that no code of ours catches, raised by the function that would have written next, so nothing
after that point runs; tests/srgan/test_train_gen.py and test_pipeline.py kill real processes with SIGKILL.
For train-gen, train-critic and train-gan (CPU, fp32, seeded): the resumed run ends with weights and
history identical to an uninterrupted one (the wall-clock columns aside).
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srgan.checkpoint import load_checkpoint, save_generator
from srgan.generators import build_generator
from srgan.train_critic import TrainCriticConfig, train_critic
from srgan.train_gan import TrainGanConfig, train_gan
from srgan.train_gen import Trainer, TrainGenConfig

TIMING = {"seconds", "data_wait", "data_seconds"}  # wall-clock columns
DEAD_PID = 2 ** 22 + 12345  # above Linux's largest pid_max: no such process


class Killed(BaseException):
    """Stands for SIGKILL at a write point: not an Exception, so no handler of ours swallows it."""


def kill_on_call(monkeypatch, target, name: str, call: int = 1) -> None:
    """Make `target.name` raise Killed on its `call`-th call (the earlier calls run as usual)."""
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed(f"{name} call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------
# train-gen

GEN = {"arch": "unet-small", "pretrained": False, "size": 32, "bs": 4, "loss": "l1", "preview_items": 1,
       "precision": "fp32", "epochs": 2}


def gen_cfg(data: Path, run: Path, **kw) -> TrainGenConfig:
    return TrainGenConfig(data=str(data), out=str(run), **{**GEN, **kw})


@pytest.fixture(scope="module")
def gen_reference(sr_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gen-ref")
    Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    return run


def assert_same_gen(run: Path, ref: Path) -> None:
    assert same_weights(run / "generator.safetensors", ref / "generator.safetensors")
    assert rows(run / "history.csv") == rows(ref / "history.csv")


def test_gen_killed_after_its_last_checkpoint_finishes_on_resume(sr_dataset, gen_reference, tmp_path,
                                                                   monkeypatch):
    import srgan.train_gen

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_on_call(m, srgan.train_gen, "save_generator")
        with pytest.raises(Killed):
            Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (run / "generator.safetensors").exists()
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()  # was: "already finished"
    assert_same_gen(run, gen_reference)


def test_gen_killed_between_checkpoint_and_history(sr_dataset, gen_reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:  # call 1 starts the file; call 2 follows epoch 1's checkpoint
        kill_on_call(m, Trainer, "write_history", call=2)
        with pytest.raises(Killed):
            Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert rows(run / "history.csv") == []  # behind the checkpoint, never ahead of it
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()
    assert_same_gen(run, gen_reference)


def test_gen_history_is_never_ahead_of_the_checkpoint(sr_dataset, tmp_path, monkeypatch):
    import srgan.train_gen

    run = tmp_path / "run"
    with monkeypatch.context() as m:  # killed while writing epoch 2's checkpoint
        kill_on_call(m, srgan.train_gen, "save_checkpoint", call=2)
        with pytest.raises(Killed):
            Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    assert [r["epoch"] for r in rows(run / "history.csv")] == ["1"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


def test_gen_config_change_then_kill_starts_the_new_config_over(sr_dataset, tmp_path, monkeypatch):
    import srgan.train_gen

    run, ref = tmp_path / "run", tmp_path / "ref"
    Trainer(gen_cfg(sr_dataset, run, lr=1e-3), progress=False).fit()  # the old config, finished
    with monkeypatch.context() as m:  # the new one, killed before its first checkpoint
        kill_on_call(m, srgan.train_gen, "save_checkpoint")
        with pytest.raises(Killed):
            Trainer(gen_cfg(sr_dataset, run, lr=3e-3), progress=False).fit()
    assert not (run / "checkpoints" / "last.pt").exists()  # the old config's is moved aside
    assert list((run / "checkpoints").glob("stale-*.pt"))
    Trainer(gen_cfg(sr_dataset, run, lr=3e-3), resume=True, progress=False).fit()
    Trainer(gen_cfg(sr_dataset, ref, lr=3e-3), progress=False).fit()
    assert_same_gen(run, ref)


def test_gen_resume_with_another_config_or_nothing_starts_over(sr_dataset, gen_reference, tmp_path, capfd):
    run = tmp_path / "run"
    Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()  # nothing to resume: a note, not an error
    assert "nothing to resume from" in capfd.readouterr().err
    assert_same_gen(run, gen_reference)
    shutil.copy(gen_reference / "checkpoints" / "last.pt", tmp_path / "ref.pt")
    Trainer(gen_cfg(sr_dataset, run, options={"width": 8}, epochs=1), resume=True, progress=False).fit()
    err = capfd.readouterr().err
    assert "belongs to another configuration" in err and "Traceback" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


# --------------------------------------------------------------------------------------------------------
# train-critic

CRIT = {"arch": "patch", "options": {"nf": 8, "n_blocks": 2}, "size": 32, "bs": 4, "lr": 3e-3,
        "precision": "fp32", "epochs": 2}


def critic_setup(crit: dict):
    """The train-critic fixtures over the requesting module's `gen_reference`, with train-critic options `crit`:
    `crit_base` (a run folder with the generator and its predictions, as train-critic finds it in a pipeline),
    `crit_cfg(data, run, **changes)` and `crit_reference` (an uninterrupted run). test_sigterm.py uses them too."""

    @pytest.fixture(scope="module")
    def crit_base(sr_dataset, gen_reference, tmp_path_factory) -> Path:
        from srgan.train_critic import ensure_preds

        run = tmp_path_factory.mktemp("crit-base")
        shutil.copy(gen_reference / "generator.safetensors", run / "generator.safetensors")
        ensure_preds(sr_dataset, run, torch.device("cpu"), ("train", "valid"))
        return run

    def crit_cfg(data: Path, run: Path, **kw) -> TrainCriticConfig:
        return TrainCriticConfig(data=str(data), out=str(run), **{**crit, **kw})

    @pytest.fixture(scope="module")
    def crit_reference(sr_dataset, crit_base, tmp_path_factory) -> Path:
        run = shutil.copytree(crit_base, tmp_path_factory.mktemp("crit-ref") / "run")
        train_critic(crit_cfg(sr_dataset, run), progress=False)
        return run

    return crit_base, crit_cfg, crit_reference


crit_base, crit_cfg, crit_reference = critic_setup(CRIT)


def assert_same_critic(run: Path, ref: Path) -> None:
    assert same_weights(run / "critic.safetensors", ref / "critic.safetensors")
    assert rows(run / "critic-history.csv") == rows(ref / "critic-history.csv")


@pytest.mark.parametrize("point", ["after-last-checkpoint", "between-checkpoint-and-history"])
def test_critic_killed_at_a_write_point_resumes_to_the_same_result(point, sr_dataset, crit_base, crit_reference,
                                                                    tmp_path, monkeypatch):
    import srgan.train_critic

    run = shutil.copytree(crit_base, tmp_path / "run")
    with monkeypatch.context() as m:
        if point == "after-last-checkpoint":
            kill_on_call(m, srgan.train_critic, "save_critic")
        else:  # call 1 starts the file; call 2 follows epoch 1's checkpoint
            kill_on_call(m, srgan.train_critic, "_write_history", call=2)
        with pytest.raises(Killed):
            train_critic(crit_cfg(sr_dataset, run), progress=False)
    assert not (run / "critic.safetensors").exists()
    train_critic(crit_cfg(sr_dataset, run), resume=True, progress=False)
    assert_same_critic(run, crit_reference)


def test_critic_config_change_then_kill_starts_the_new_config_over(sr_dataset, crit_base, tmp_path, monkeypatch):
    import srgan.train_critic

    run, ref = shutil.copytree(crit_base, tmp_path / "run"), shutil.copytree(crit_base, tmp_path / "ref")
    train_critic(crit_cfg(sr_dataset, run), progress=False)
    with monkeypatch.context() as m:
        kill_on_call(m, srgan.train_critic, "save_checkpoint")
        with pytest.raises(Killed):
            train_critic(crit_cfg(sr_dataset, run, lr=1e-3), progress=False)
    train_critic(crit_cfg(sr_dataset, run, lr=1e-3), resume=True, progress=False)
    train_critic(crit_cfg(sr_dataset, ref, lr=1e-3), progress=False)
    assert_same_critic(run, ref)


def test_critic_checkpoint_of_another_generator_is_not_resumed(sr_dataset, crit_base, tmp_path, capfd):
    run = shutil.copytree(crit_base, tmp_path / "run")
    train_critic(crit_cfg(sr_dataset, run, epochs=1), progress=False)
    torch.manual_seed(5)  # train-gen ran again: another generator (and other predictions) in the same folder
    save_generator(build_generator("unet-small", scale=1, img_size=32, pretrained=False, residual=True),
                   run / "generator.safetensors", data_scale=4)
    train_critic(crit_cfg(sr_dataset, run), resume=True, progress=False)
    assert "belongs to another configuration" in capfd.readouterr().err


# --------------------------------------------------------------------------------------------------------
# train-gan

GAN = {"size": 32, "bs": 2, "loss": "l1", "preview_items": 1, "precision": "fp32", "switching": "fixed",
       "iters": 4, "checkpoint_every": 2, "pretrained": False}


def gan_cfg(data: Path, run: Path, **kw) -> TrainGanConfig:
    return TrainGanConfig(data=str(data), out=str(run), **{**GAN, **kw})


@pytest.fixture(scope="module")
def gan_reference(sr_dataset, gan_base, tmp_path_factory) -> Path:
    run = shutil.copytree(gan_base, tmp_path_factory.mktemp("gan-ref") / "run")
    train_gan(gan_cfg(sr_dataset, run), progress=False)
    return run


def assert_same_gan(run: Path, ref: Path) -> None:
    assert same_weights(run / "gan" / "generator.safetensors", ref / "gan" / "generator.safetensors")
    assert rows(run / "gan" / "history.csv") == rows(ref / "gan" / "history.csv")


@pytest.mark.parametrize("point", ["after-last-checkpoint", "between-checkpoint-and-history"])
def test_gan_killed_at_a_write_point_resumes_to_the_same_result(point, sr_dataset, gan_base, gan_reference,
                                                                 tmp_path, monkeypatch):
    import srgan.train_gan

    run = shutil.copytree(gan_base, tmp_path / "run")
    with monkeypatch.context() as m:
        if point == "after-last-checkpoint":
            kill_on_call(m, srgan.train_gan, "_save_final")
        else:  # call 1 starts the file; call 2 follows step 2's checkpoint
            kill_on_call(m, srgan.train_gan.GanRun, "write_history", call=2)
        with pytest.raises(Killed):
            train_gan(gan_cfg(sr_dataset, run), progress=False)
    last = load_checkpoint(run / "gan" / "checkpoints" / "last.pt")
    assert last["step"] == (4 if point == "after-last-checkpoint" else 2)
    assert len(rows(run / "gan" / "history.csv")) <= last["step"]
    train_gan(gan_cfg(sr_dataset, run), resume=True, progress=False)
    assert_same_gan(run, gan_reference)


def test_gan_config_change_then_kill_starts_the_new_config_over(sr_dataset, gan_base, tmp_path, monkeypatch):
    import srgan.train_gan

    run, ref = shutil.copytree(gan_base, tmp_path / "run"), shutil.copytree(gan_base, tmp_path / "ref")
    train_gan(gan_cfg(sr_dataset, run), progress=False)
    with monkeypatch.context() as m:
        kill_on_call(m, srgan.train_gan, "save_checkpoint")
        with pytest.raises(Killed):
            train_gan(gan_cfg(sr_dataset, run, lr=3e-4), progress=False)
    train_gan(gan_cfg(sr_dataset, run, lr=3e-4), resume=True, progress=False)
    train_gan(gan_cfg(sr_dataset, ref, lr=3e-4), progress=False)
    assert_same_gan(run, ref)


# --------------------------------------------------------------------------------------------------------
# the same through `crappify run`


def tiny_pipeline(tmp: Path, changes: dict | None = None) -> Path:
    from test_pipeline import write_pipeline

    return write_pipeline(tmp, {"train-gen": {"arch": "unet-small", "epochs": 2},
                                "train-critic": {"arch": "patch", "options": {"nf": 8, "n_blocks": 2}, "epochs": 2},
                                **(changes or {})})


def test_pipeline_killed_after_each_stage_s_last_checkpoint_resumes(tmp_path, monkeypatch):
    import srgan.train_critic
    import srgan.train_gan
    import srgan.train_gen
    from srgan.pipeline import load_pipeline, run_pipeline

    path = tiny_pipeline(tmp_path)
    run = tmp_path / "out" / "run"
    kills = [(srgan.train_gen, "save_generator"), (srgan.train_critic, "save_critic"), (srgan.train_gan, "_save_final")]
    for stage, (module, name) in zip(("train-gen", "train-critic", "train-gan"), kills, strict=True):
        with monkeypatch.context() as m:
            kill_on_call(m, module, name)
            with pytest.raises(Killed):
                run_pipeline(load_pipeline(path), stop="train-gan", progress=False)
        steps = {s.stage: s.action for s in run_pipeline(load_pipeline(path), stop=stage, progress=False)}
        assert steps[stage] == "resume"  # was: "already finished", and every later run failed
    assert (run / "generator.safetensors").is_file() and (run / "critic.safetensors").is_file()
    assert (run / "gan" / "generator.safetensors").is_file()
    assert [r["epoch"] for r in rows(run / "history.csv")] == ["1", "2"]
    assert [r["epoch"] for r in rows(run / "critic-history.csv")] == ["1", "2"]


def test_pipeline_config_change_then_kill_does_not_resume_the_old_config(tmp_path, monkeypatch, capfd):
    import srgan.train_critic
    from srgan.pipeline import load_pipeline, run_pipeline

    run = tmp_path / "out" / "run"
    run_pipeline(load_pipeline(tiny_pipeline(tmp_path)), stop="train-critic", progress=False)
    old = load_checkpoint(run / "critic-checkpoints" / "last.pt")["config_key"]
    changed = tiny_pipeline(tmp_path, {"train-critic": {"arch": "patch", "options": {"nf": 8, "n_blocks": 2},
                                                        "epochs": 2, "lr": 2e-3}})
    with monkeypatch.context() as m:
        kill_on_call(m, srgan.train_critic, "save_checkpoint")
        with pytest.raises(Killed):
            run_pipeline(load_pipeline(changed), stop="train-critic", progress=False)
    assert not (run / "critic-checkpoints" / "last.pt").exists()  # the old config's was moved aside
    steps = {s.stage: s.action for s in run_pipeline(load_pipeline(changed), stop="train-critic", progress=False)}
    assert steps["train-critic"] == "resume"
    new = load_checkpoint(run / "critic-checkpoints" / "last.pt")
    assert new["config_key"] != old and new["epoch"] == 2
    assert [r["epoch"] for r in rows(run / "critic-history.csv")] == ["1", "2"]


# --------------------------------------------------------------------------------------------------------
# locks and leftovers


@contextlib.contextmanager
def held_elsewhere(folder: Path):
    """Another process holding `folder`'s lock for the body (then SIGKILLed)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from crappify.runlock import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_folder_fails_with_one_line(sr_dataset, tmp_path):
    from crappify.errors import CrappifyError
    from crappify.runlock import folder_lock

    run = tmp_path / "run"
    with held_elsewhere(run) as pid, pytest.raises(CrappifyError, match=rf"another train-gen run \(pid {pid}\)"):
        Trainer(gen_cfg(sr_dataset, run), progress=False).fit()
    with folder_lock(run):  # released when its process died, however it died
        pass
    assert not (run / ".lock").exists()  # a run that ends removes its lock file


def test_enhance_locks_its_output_folder_and_clears_stale_temporaries(tmp_path, photo_maker):
    from crappify.errors import CrappifyError
    from srgan.enhance import collect_inputs, enhance_files
    from srgan.inference import load_inference

    torch.manual_seed(0)
    model = tmp_path / "g.safetensors"
    save_generator(build_generator("srresnet", scale=2, n_blocks=1, n_feats=4), model, data_scale=2)
    engine = load_inference(model, device="cpu", precision="fp32")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    from crappify.imageio import save_image_atomic

    save_image_atomic(src / "a.png", photo_maker(0, long_side=24))
    items = collect_inputs([src], out)
    with held_elsewhere(out) as pid, pytest.raises(CrappifyError, match=rf"another enhance run \(pid {pid}\)"):
        enhance_files(engine, items, out, 2, progress=False)
    stale = out / f".a.png.crappify-tmp-{DEAD_PID}"
    stale.write_bytes(b"half")
    # a user's files that look like temporaries: another tool's tag, and ours for a file this run does not write
    users = [out / "sub" / f".thesis.docx.tmp-{DEAD_PID}", out / f".thesis.docx.tmp-{DEAD_PID}",
             out / f".b.png.crappify-tmp-{DEAD_PID}"]
    for path in users:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    assert [p.name for p in enhance_files(engine, items, out, 2, progress=False).written] == ["a.png"]
    assert not stale.exists() and not (out / ".lock").exists()
    assert all(p.read_bytes() == b"mine" for p in users)


def test_export_clears_its_own_stale_temporaries_only(tmp_path):
    from srgan.export import export_torchscript

    torch.manual_seed(0)
    model = tmp_path / "g.safetensors"
    save_generator(build_generator("srresnet", scale=2, n_blocks=1, n_feats=4), model, data_scale=2)
    mine = tmp_path / f".g.pt.crappify-tmp-{DEAD_PID}"
    other = tmp_path / f".notes.txt.crappify-tmp-{DEAD_PID}"
    users = tmp_path / f".g.pt.tmp-{DEAD_PID}"
    for path in (mine, other, users):
        path.write_bytes(b"half")
    export_torchscript(model, tmp_path / "g.pt")
    # a folder the user owns: only the leftovers of the file this export writes go
    assert not mine.exists() and other.exists() and users.exists()


def test_stale_temporary_files_are_removed_on_the_next_run(sr_dataset, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / "checkpoints" / f".last.pt.crappify-tmp-{DEAD_PID}",
             run / f".generator.safetensors.crappify-tmp-{DEAD_PID}"]
    users = [run / f".generator.safetensors.tmp-{DEAD_PID}", run / "mine" / f".x.crappify-tmp-{DEAD_PID}"]
    for path in stale + users:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    Trainer(gen_cfg(sr_dataset, run, epochs=1), progress=False).fit()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in users)  # not ours, or not in a folder the stage writes


def test_checkpoints_record_their_config_key(sr_dataset, gen_reference):
    state = load_checkpoint(gen_reference / "checkpoints" / "last.pt")
    assert isinstance(state["config_key"], str) and len(state["config_key"]) == 16
    assert json.loads(json.dumps(state["history"]))  # plain data: loads with weights_only


def test_config_key_ignores_options_at_their_defaults_and_reads_preset_files(tmp_path):
    """A later version's new option (default = the old behaviour) keeps old checkpoints resumable; editing a
    preset file that online degradation reads makes them stale."""
    from pydantic import BaseModel

    from srgan.checkpoint import config_key

    class Old(BaseModel):
        lr: float = 1e-3
        degrade_preset: str | None = None

    class New(Old):
        added: bool = False

    assert config_key(Old(lr=2e-3)) == config_key(New(lr=2e-3)) != config_key(New(lr=2e-3, added=True))
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: []\n")
    before = config_key(Old(degrade_preset=str(preset)))
    preset.write_text("steps: [{op: jpeg}]\n")
    assert config_key(Old(degrade_preset=str(preset))) != before


# --------------------------------------------------------------------------------------------------------
# crafted or foreign checkpoints: moved aside with one line, never a traceback

CRAFTED_CHECKPOINTS = {
    "a list": [1, 2, 3],
    "no model": {"epoch": 1, "history": [], "config_key": "k"},
    "epoch not a number": {"model": {}, "epoch": "x", "history": [], "config_key": "k"},
    "negative epoch": {"model": {}, "epoch": -3, "history": [], "config_key": "k"},
    "epoch a bool": {"model": {}, "epoch": True, "history": [], "config_key": "k"},
    "weights not tensors": {"model": {"w": 1}, "epoch": 1, "history": [], "config_key": "k"},
    "history of numbers": {"model": {}, "epoch": 1, "history": [1], "config_key": "k"},
    "key leading elsewhere": {"model": {}, "epoch": "x", "history": [], "config_key": "../../x"},
    "not a torch file": b"PK\x03\x04 certainly not a checkpoint",
    "epoch_loss not a pair": {"model": {}, "epoch": 1, "history": [], "config_key": "k", "epoch_loss": [1.0]},
    "epoch_loss of strings": {"model": {}, "epoch": 1, "history": [], "config_key": "k",
                              "epoch_loss": ["1", "2"]},
}


def test_a_checkpoint_written_inside_an_epoch_is_taken_up(tmp_path):
    """A mid-epoch checkpoint keeps the epoch's loss so far as [total, count]: a resume takes it up (it was set
    aside as 'not usable' once, so every mid-epoch resume started over)."""
    from srgan.checkpoint import resume_state

    path = tmp_path / "last.pt"
    state = {"model": {"w": torch.zeros(1)}, "epoch": 1, "batch": 3, "history": [{"epoch": 1}], "config_key": "k",
             "epoch_loss": [2.5, 12], "epoch_seconds": 4.0}
    torch.save(state, path)
    assert resume_state(path, "k", True, "train-gen", required=("model", "epoch", "history"))["epoch_loss"] == [2.5, 12]


@pytest.mark.parametrize("case", sorted(CRAFTED_CHECKPOINTS))
def test_a_crafted_checkpoint_is_moved_aside_with_one_line(case, tmp_path, capsys):
    from srgan.checkpoint import resume_state

    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    content = CRAFTED_CHECKPOINTS[case]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert resume_state(path, "k", True, "train-gen", required=("model", "epoch", "history")) is None
    assert not path.exists() and [p.name for p in path.parent.iterdir()] == ["stale-previous.pt"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a usable train-gen checkpoint" in err[0] and str(path) in err[0], err


def test_a_checkpoint_with_the_right_key_and_the_wrong_weights_is_one_line(sr_dataset, gen_reference, tmp_path):
    from crappify.errors import CrappifyError

    run = tmp_path / "run"
    shutil.copytree(gen_reference, run)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(7, 7)
    state["epoch"] = 1
    torch.save(state, last)
    with pytest.raises(CrappifyError) as err:
        Trainer(gen_cfg(sr_dataset, run), resume=True, progress=False).fit()
    assert str(last) in str(err.value) and "do not fit" in str(err.value) and "\n" not in str(err.value)


def test_cli_resume_from_a_foreign_checkpoint_starts_over(sr_dataset, tmp_path, cli):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "epoch": "x", "history": []}, run / "checkpoints" / "last.pt")
    res = cli("train-gen", sr_dataset, "-o", run, "--resume", "--arch", "unet-small", "--no-pretrained",
              "--size", "32", "--bs", "4", "--loss", "l1", "--epochs", "1", "--precision", "fp32", "--quiet")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "not a usable train-gen checkpoint" in res.stderr
    assert (run / "generator.safetensors").is_file() and (run / "checkpoints" / "stale-previous.pt").is_file()
