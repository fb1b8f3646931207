"""The ``sae-lens-attn`` command line (also ``python -m sae_lens_attn``).

Each subcommand is one module of ``SUBCOMMANDS`` with ``add_parser(commands)``, which adds its
parser and sets ``run`` (``args -> exit status``); adding a subcommand is adding its module there.
Errors of the input are reported here, once, for every subcommand (see ``EXIT_STATUS``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import sae_lens

from sae_lens_attn import __version__
from sae_lens_attn.cli import (
    analyze,
    dashboard,
    demo,
    evaluate,
    explore,
    info,
    publish,
    releases,
    train,
)
from sae_lens_attn.cli.arguments import UsageError

SUBCOMMANDS = (info, releases, train, analyze, evaluate, dashboard, demo, explore, publish)
"""The subcommand modules, in the order ``--help`` lists them."""

INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)
"""Errors a subcommand raises for input it refuses (a bad value, file, release, SAE or output
folder; ``OSError`` covers missing files, refused folders and permissions); reported as one
``error:`` line. Anything else is a bug and keeps its traceback."""

EXIT_STATUS = """\
exit status:
  0    done
  1    the input was refused: a bad file, value, release, SAE or output folder (the message
       says what was expected, what was given and the valid choices)
  2    the command line is wrong: unknown, missing or inconsistent flags, or a bad value
  130  interrupted
errors print one 'error: ...' line; --debug shows their traceback instead"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``sae-lens-attn`` and of every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="sae-lens-attn",
        description="Sparse autoencoders on attention layer outputs (hook_z) for SAELens.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (SAELens {sae_lens.__version__})",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    for subparser in commands.choices.values():  # also accepted after the subcommand
        subparser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of errors",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-attn`` console script: the exit status (``EXIT_STATUS``).

    Command-line errors found by argparse raise ``SystemExit(2)`` as argparse does.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {str(err) or type(err).__name__}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
