"""Method arguments as every command reads them (``--arg keep=64 --arg layers=2,6,15``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ArgumentError

OCCAM_SETTINGS = "vtprune_occamtoken.json"  # λ1/λ2 calibrated for a model, next to its weights


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


def default_method_args(method: str, model_dir=None) -> dict:
    """Arguments used when the user gives none: OccamToken's calibrated settings shipped next to the
    model's weights (if any), otherwise keep=64 for fixed-budget methods."""
    if method == "occamtoken":
        path = Path(model_dir) / OCCAM_SETTINGS if model_dir else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    return {"keep": 64}
