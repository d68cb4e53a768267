"""The `crappify` command-line app: the top of the tree, the only place that uses both `crappify` and `srgan`.

One module per stage group, each a list of thin click commands over one function each (`COMMANDS`):
`data` (build-dataset, merge-datasets, preview, presets, ops), `train` (train-gen, train-critic, train-gan), `infer`
(enhance, evaluate, export, save-preds), `blend` (interpolate) and `run` (run, demo); `options` holds the options
they share.
torch, fastai and `srgan` are imported inside the command bodies, so `crappify --help` stays fast.

User errors (bad paths, bad config, unusable data) end with one line on stderr and a non-zero exit;
a traceback means a bug. A training stage stopped by SIGTERM (after saving where it was) says so in one
line and exits with 143, as a process ended by SIGTERM does.
"""

from __future__ import annotations

import atexit
import gc
import signal
import sys
import warnings

import click

from crappify.cli import blend, data, infer, run, train
from crappify.cli.blend import interpolate_cmd
from crappify.cli.data import build_dataset_cmd, merge_datasets_cmd, ops_cmd, presets_cmd, preview_cmd
from crappify.cli.infer import enhance_cmd, evaluate_cmd, export_cmd, save_preds_cmd
from crappify.cli.run import demo_cmd, run_cmd
from crappify.cli.train import train_critic_cmd, train_gan_cmd, train_gen_cmd
from crappify.errors import ConfigError, CrappifyError, Interrupted

__all__ = ["app", "build_dataset_cmd", "demo_cmd", "enhance_cmd", "evaluate_cmd", "export_cmd", "interpolate_cmd",
           "main", "merge_datasets_cmd", "ops_cmd", "presets_cmd", "preview_cmd", "run_cmd", "save_preds_cmd",
           "train_critic_cmd", "train_gan_cmd", "train_gen_cmd"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="crappify")
def app() -> None:
    """crappify: degrade clean photos into paired LR/HR training data, and learn to undo it."""


for _module in (data, train, infer, blend, run):
    for _command in _module.COMMANDS:
        app.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and an exit status."""
    _quick_exit()
    # fastai scripts a few activations with torch.jit at import time; torch 2.10+ warns about it every run.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        code = app.main(args=argv, prog_name="crappify", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        _fail("interrupted; run the same command again to resume", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except Interrupted as exc:
        click.echo(f"crappify: {exc}", err=True)
        sys.exit(128 + signal.SIGTERM)
    except CrappifyError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    except BrokenPipeError:
        sys.exit(1)


def _quick_exit() -> None:
    """Freeze the garbage collector's objects when the interpreter exits (registered once, when main() starts:
    it runs after the exit handlers of everything the command imports later, torch and fastai included). Tearing
    down the millions of objects torch and fastai create at import took about 0.5 s of every command's exit on a
    2-core CPU, a third of a one-line error's run time; frozen objects are left to the operating system. Files,
    loggers and stdio are still flushed by their own exit handlers and by the interpreter, and nothing this tool
    writes depends on a finaliser (writes are atomic, files closed)."""
    if not getattr(_quick_exit, "registered", False):
        atexit.register(gc.freeze)
        _quick_exit.registered = True


def _fail(message: str, code: int) -> None:
    click.echo(f"crappify: error: {message}", err=True)
    sys.exit(code)
