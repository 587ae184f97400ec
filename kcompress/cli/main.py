"""The ``kcompress`` command: a click group whose default command is ``compress``.

Exit codes: 0 ok, 1 error (one line on stderr; traceback with ``--debug``), 2 usage, 3 accuracy budget
not met (the artifact is still written and its report marked failed).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import click
import torch

from .. import __version__
from .compress_cmd import compress_command
from .eval_cmd import eval_command
from .inspect_cmd import inspect_command
from .sweep_cmd import sweep_command

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class DefaultCommandGroup(click.Group):
    """A group that runs ``default_command`` when the first argument is not one of its subcommands or
    its own options, so ``kcompress model.pt --rank 8`` means ``kcompress compress model.pt --rank 8``."""

    def __init__(self, *args: Any, default_command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in self._own_options(ctx):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def _own_options(self, ctx: click.Context) -> set[str]:
        return {name for param in self.get_params(ctx) for name in (*param.opts, *param.secondary_opts)}


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
@click.version_option(__version__, "-V", "--version", prog_name="kcompress",
                      message=f"%(prog)s %(version)s (torch {torch.__version__})")
def app() -> None:
    """Post-training tensor-decomposition compression of LSTM/GRU/Linear models.

    Without a command, `kcompress MODEL [OPTIONS]` runs `compress` (see `kcompress compress --help`).
    """


app.add_command(compress_command)
app.add_command(inspect_command)
app.add_command(eval_command)
app.add_command(sweep_command)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``kcompress``) and ``python -m kcompress``."""
    app.main(args=None if argv is None else list(argv), prog_name="kcompress")
