"""The ``padim`` command line (typer): the app, its global options and the entry point.

Every command prints a readable summary and exits 0 on success; a user error (wrong path, unknown
product, invalid option value, corrupt model) prints one line ``error: <reason>`` on standard error
and exits 1, without a traceback unless ``--debug`` (or ``PADIM_DEBUG=1``) is given. The commands
live in :mod:`padim_cli.commands`, their shared options in :mod:`padim_cli.options`. Torch and
Prefect are imported inside the commands, so ``padim --help`` answers at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from padim_cli.commands import evaluate, models, ops, propose, report, score, train
from padim_cli.environment import apply_defaults, debug_enabled
from padim_cli.errors import describe_error, exit_code_for
from padim_cli.options import CONTEXT_SETTINGS

__all__ = ["app", "main"]

HELP = """
Visual inspection with PaDiM: learn what good parts look like from images of good parts only,
score every new production image, localise defects with heat maps and write Parquet reports.

Start with `padim demo` (synthetic data, nothing to download, 1-2 minutes). A product's
models and reports live in a store: a local folder or an `s3://bucket/prefix`, given by `--store`,
else `$PADIM_STORE`, else `./padim-store`. `--verbose` and `--debug` may also follow the command.
"""

app = typer.Typer(
    name="padim",
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings=CONTEXT_SETTINGS,
)

# ---- global options -------------------------------------------------------------------------


@app.callback()
def configure_run(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's flow and task logs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors (or PADIM_DEBUG=1).")] = False,
) -> None:
    """Global options, applied before any command imports Prefect."""
    apply_defaults(verbose=verbose, debug=debug)


# ---- commands -------------------------------------------------------------------------------

COMMANDS: tuple[Callable[..., Any], ...] = (
    ops.demo,
    train.train,
    score.score,
    evaluate.evaluate,
    propose.propose,
    report.report,
    ops.serve,
    train.retrain,
    ops.configure,
    score.nightly,
    score.watch,
)
"""The commands, in the order ``padim --help`` lists them (the ``models`` group comes last)."""


def mount_commands(cli: typer.Typer) -> None:
    """Register :data:`COMMANDS` and the ``models`` group on ``cli``."""
    for command in COMMANDS:
        cli.command()(command)
    cli.add_typer(models.models_app, name="models")


mount_commands(app)


# ---- entry point ----------------------------------------------------------------------------

_GLOBAL_FLAGS = frozenset({"--verbose", "-v", "--debug"})


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """Move ``--verbose``/``--debug`` given after the command name in front of it.

    Args:
        args: Command-line arguments without the program name.

    Returns:
        The arguments with global flags first.
    """
    flags = [a for a in args if a in _GLOBAL_FLAGS]
    rest = [a for a in args if a not in _GLOBAL_FLAGS]
    return flags + rest


def fail(message: str, code: int) -> None:
    """Print ``error: <message>`` on standard error and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.
    """
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="padim")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        if debug_enabled():
            raise
        fail(describe_error(exc), exit_code_for(exc))


if __name__ == "__main__":
    main()
