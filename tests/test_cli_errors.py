"""The command line: one value parser for every command, and a user's mistake is one line, status 2."""
import subprocess
import sys

import pytest

from vtprune.bench.latency import parse_method_args as bench_method_args
from vtprune.cli import main, parse_method_args, parse_value
from vtprune.errors import ArgumentError


@pytest.mark.parametrize("text,value", [
    ("64", 64), ("0.5", 0.5), ("false", False), ("True", True), ("none", None), ("2,6,15", (2, 6, 15)),
    ("0.5,0.25", (0.5, 0.25)), ("paper", "paper"), ("3,", (3,)),
])
def test_values_are_read_alike_everywhere(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert parse_method_args([f"x={text}"]) == {"x": value}
    assert bench_method_args([f"m:x={text}"]) == {"m": {"x": value}}


def test_generate_reads_stage2_false_as_false():
    assert parse_method_args(["stage2=false", "layers=2,6,15", "keep-ratio=0.5"]) == {
        "stage2": False, "layers": (2, 6, 15), "keep_ratio": 0.5}
    assert bench_method_args(["pyramiddrop:layers=1,2,3,keep=4"]) == {"pyramiddrop": {"layers": (1, 2, 3), "keep": 4}}
    with pytest.raises(ArgumentError, match="NAME=VALUE"):
        parse_method_args(["keep"])


@pytest.mark.parametrize("argv,message", [
    (["demo", "--method", "visionzipp"], "Did you mean 'visionzip'"),
    (["demo", "--method", "fastv", "--arg", "kep=4"], "Did you mean 'keep'"),
    (["generate", "--model", ".", "--image", "missing.png", "--prompt", "hi"], "'missing.png' is not a file"),
])
def test_a_users_mistake_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    result = subprocess.run([sys.executable, "-m", "vtprune.cli", "--debug", "demo", "--method", "visionzipp"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "UnknownMethodError" in result.stderr
