"""The ``vtprune`` command line."""
from __future__ import annotations

import argparse
import sys


def _methods(args) -> int:
    from .matrix import markdown_matrix

    print(markdown_matrix())
    return 0


def _parse_method_args(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"vtprune: method argument {item!r} must look like NAME=VALUE (e.g. keep=64)")
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key.replace("-", "_")] = value
    return out


def add_method_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--method", default=default, help=f"pruning method (default {default}; see `vtprune methods`)")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="method argument, repeatable, e.g. --arg keep=64 --arg layer=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for HF vision-language models.")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
