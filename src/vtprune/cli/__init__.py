"""The ``vtprune`` command line: one parser, each command's arguments added by the module that runs it.

Argument helpers shared by every command live in :mod:`vtprune.cli.arguments`, which imports nothing
of the rest, so no command module imports this one back."""
from __future__ import annotations

import argparse
import sys

from ..errors import VTPruneError
from .arguments import add_method_arguments, parse_method_args, parse_value  # noqa: F401  (public)


def _methods(args) -> int:
    from ..matrix import markdown_matrix

    print(markdown_matrix())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for HF vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods and the models each supports")
    p.set_defaults(func=_methods)

    from .demo import add_demo_cli, add_generate_cli

    add_demo_cli(sub)
    add_generate_cli(sub)

    from ..bench.flops import add_cli as add_flops_cli
    from ..bench.latency import add_cli as add_bench_cli
    from ..occamtoken.cli import add_cli as add_calibrate_cli

    add_flops_cli(sub)
    add_bench_cli(sub)
    add_calibrate_cli(sub)

    from ..ocvtp.cli import add_cli as add_ocvtp_cli
    from ..eval.cli import add_cli as add_eval_cli

    add_ocvtp_cli(sub)
    add_eval_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user's mistake (a library error: misspelt method, missing file, bad argument)
    prints one line and exits with status 2; ``--debug`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VTPruneError as err:
        if args.debug:
            raise
        print(f"vtprune: error: {err}", file=sys.stderr)
        return 2
