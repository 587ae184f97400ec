"""The ``kcompress`` command: a click group whose default command is ``compress``.

Exit codes: 0 ok, 1 error (one line on stderr; traceback with ``--debug``), 2 usage, 3 accuracy budget
not met (the artifact is still written and its report marked failed).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import click

from kcompress._version import __version__
from kcompress.cli.signals import deferred_interrupts, interruption

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: command name -> (module in kcompress.cli, attribute, one-line help). A command's module (and with it
#: torch) is imported only when that command runs or shows its own help, so ``kcompress --help`` is quick.
COMMANDS = {
    "compress": ("compress_cmd", "compress_command",
                 "Compress the LSTM/GRU (and chosen Linear) layers of MODEL and write the artifact."),
    "inspect": ("inspect_cmd", "inspect_command",
                "Show MODEL's compressible layers and what each format and rank would make of them."),
    "eval": ("eval_cmd", "eval_command",
             "Measure MODEL (a checkpoint or a kcompress artifact) on --eval DATA or with --evaluator."),
    "sweep": ("sweep_cmd", "sweep_command",
              "Compress MODEL with every format and rank, measure each, and show the Pareto front."),
}


class DefaultCommandGroup(click.Group):
    """A group of lazily imported :data:`COMMANDS` that runs ``default_command`` when the first argument is
    not one of its subcommands or its own options, so ``kcompress model.pt --rank 8`` means
    ``kcompress compress model.pt --rank 8``."""

    def __init__(self, *args: Any, default_command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        try:
            with deferred_interrupts():  # the import (torch: seconds) completes; then a Ctrl-C takes effect
                return getattr(importlib.import_module(f".{module}", __package__), attribute)
        except KeyboardInterrupt as error:
            message, code = interruption(error)
            click.echo(f"kcompress: error: {message}", err=True)
            raise click.exceptions.Exit(code) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from :data:`COMMANDS` (no command module is imported to show it)."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, _, help_text) in COMMANDS.items()])

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and args[0] not in self._own_options(ctx):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def _own_options(self, ctx: click.Context) -> set[str]:
        return {name for param in self.get_params(ctx) for name in (*param.opts, *param.secondary_opts)}


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``kcompress X.Y.Z (torch A.B.C)``; torch is imported only here."""
    if not value or ctx.resilient_parsing:
        return
    import torch

    click.echo(f"kcompress {__version__} (torch {torch.__version__})")
    ctx.exit()


@click.group(
    "kcompress",
    cls=DefaultCommandGroup,
    default_command="compress",
    context_settings=CONTEXT_SETTINGS,
    epilog="""\b
Examples:
  kcompress model.pt --format kcp --rank 8          # = kcompress compress model.pt ...
  kcompress inspect model.pt
  kcompress lstm.pt --format kcp --rank 8 --eval japanese-vowels --finetune-epochs 30
  kcompress model.pt --format svd --ratio 4 --eval val.npz --max-drop 0.01 --report report.json
  kcompress sweep model.pt --formats kcp,svd --ranks 1,2,4,8,16 --eval japanese-vowels
  kcompress eval model.kcp-r8.safetensors --eval japanese-vowels
  python -m kcompress --help

\b
Exit codes: 0 ok, 1 error, 2 usage error, 3 accuracy budget (--max-drop) not met.
Run 'kcompress COMMAND --help' for a command's options.""",
)
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
def app() -> None:
    """Post-training tensor-decomposition compression of LSTM/GRU/Linear models.

    Without a command, `kcompress MODEL [OPTIONS]` runs `compress` (see `kcompress compress --help`).
    """




def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``kcompress``) and ``python -m kcompress``."""
    app.main(args=None if argv is None else list(argv), prog_name="kcompress")
