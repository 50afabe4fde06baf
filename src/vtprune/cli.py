"""The ``vtprune`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import ArgumentError, VTPruneError


def _methods(args) -> int:
    from .matrix import markdown_matrix

    print(markdown_matrix())
    return 0


def parse_value(text: str) -> Any:
    """A command-line value as Python: true/false, none, integers, floats, and comma-separated tuples
    (``layers=2,6,15``); anything else stays a string."""
    text = text.strip()
    if "," in text:
        return tuple(parse_value(part) for part in text.split(",") if part.strip())
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method_args(items: list[str], what: str = "--arg") -> dict[str, Any]:
    """``["keep=64", "layers=2,6,15", "stage2=false"]`` -> ``{"keep": 64, "layers": (2, 6, 15), ...}``."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ArgumentError(f"{what} {item!r} must look like NAME=VALUE (e.g. keep=64 or layers=2,6,15).")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out



def add_method_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--method", default=default, help=f"pruning method (default {default}; see `vtprune methods`)")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="method argument, repeatable, e.g. --arg keep=64 --arg layer=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for HF vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods and the models each supports")
    p.set_defaults(func=_methods)

    from .demo_cli import add_demo_cli, add_generate_cli

    add_demo_cli(sub)
    add_generate_cli(sub)

    from .bench.flops import add_cli as add_flops_cli
    from .bench.latency import add_cli as add_bench_cli
    from .calibrate import add_cli as add_calibrate_cli

    add_flops_cli(sub)
    add_bench_cli(sub)
    add_calibrate_cli(sub)

    from .ocvtp.cli import add_cli as add_ocvtp_cli
    from .eval.cli import add_cli as add_eval_cli

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


if __name__ == "__main__":
    sys.exit(main())
