"""A tuple method argument (``--arg layers=1,2,3``) survives lmms-eval's model_args parsing."""
import argparse

from lmms_eval.utils import simple_parse_args_string

from vtprune.eval.cli import model_args_string
from vtprune.eval.lmms_model import _bracketed_tuple


def test_tuple_arguments_reach_the_method_as_tuples():
    args = argparse.Namespace(model="m", method="pyramiddrop", arg=["keep=4", "layers=1,2,3"], layout=None,
                              device=None, dtype="auto", attn_implementation=None)
    parsed = simple_parse_args_string(model_args_string(args))
    assert parsed["keep"] == 4 and _bracketed_tuple(parsed["layers"]) == (1, 2, 3)
    assert _bracketed_tuple("flat") == "flat"
