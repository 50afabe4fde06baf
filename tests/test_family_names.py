"""Model families are declared in one place: ``src/vtprune/models/`` (one module per family, registered in
``vtprune.models.families``) and the per-family vLLM variants in ``src/vtprune/serving/``. Everywhere else
the code asks the registry (a capability, a per-family value); it never names a concrete family.

This test parses every other source file and fails on a family name ("llava_next", ...) or a
transformers model class of a family ("LlavaForConditionalGeneration", ...) in the code: string
literals (docstrings excepted), names, attributes and imports. Comments are not code and are ignored.
"""
from __future__ import annotations

import ast
from pathlib import Path

from vtprune.models.families import all_families

SRC = Path(__file__).parents[1] / "src" / "vtprune"
#: where families are declared (the registry and the family modules; the vLLM variants)
DECLARED_IN = ("models", "serving")
#: packages about one concrete checkpoint: the bundled demo model is a LLaVA-1.5 (its trainer builds one)
CONCRETE_MODEL_PACKAGES = ("demo",)
#: (file, string) pairs allowed in code; keep this tiny and say why
ALLOWED = {
    ("cli/demo.py", "llava"),  # the demo runs the bundled LLaVA-1.5 demo checkpoint / its tiny LLaVA twin
}


def _forbidden() -> tuple[set[str], set[str]]:
    fams = all_families()
    return {f.name for f in fams}, {c for f in fams for c in f.hf_classes}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.add(id(body[0].value))
    return out


def offences(source: str, names: set[str], classes: set[str]) -> list[tuple[int, str]]:
    """(line, text) of every family name / model class the code of ``source`` mentions."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []

    def word(text: str, lineno: int) -> None:
        if text in names or any(c in text for c in classes):
            found.append((lineno, text))

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            word(node.value, node.lineno)
        elif isinstance(node, ast.Name):
            word(node.id, node.lineno)
        elif isinstance(node, ast.Attribute):
            word(node.attr, node.lineno)
        elif isinstance(node, ast.alias):
            word(node.name.rsplit(".", 1)[-1], getattr(node, "lineno", 0))
            if node.asname:
                word(node.asname, getattr(node, "lineno", 0))
    return found


def _checked_files() -> list[Path]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        top = path.relative_to(SRC).parts[0]
        if top in DECLARED_IN or top in CONCRETE_MODEL_PACKAGES:
            continue
        out.append(path)
    return out


def test_no_family_names_outside_the_family_declarations():
    names, classes = _forbidden()
    assert {"llava", "qwen2_5_vl"} <= names and "LlavaForConditionalGeneration" in classes
    bad = []
    for path in _checked_files():
        rel = path.relative_to(SRC).as_posix()
        for line, text in offences(path.read_text(), names, classes):
            if (rel, text) not in ALLOWED:
                bad.append(f"src/vtprune/{rel}:{line}: {text!r}")
    assert not bad, ("model families are named outside src/vtprune/models/ (declare the value on the Family "
                     "and look it up, or query a capability):\n" + "\n".join(bad))


def test_the_check_sees_what_it_must():
    names, classes = _forbidden()
    code = '''
"""Docstrings may say llava_next and LlavaForConditionalGeneration."""
from transformers import LlavaForConditionalGeneration  # comments may say qwen3_vl


def f(ctx):
    """As may a function's docstring: qwen2_5_vl."""
    if ctx.family in ("qwen2_5_vl", "qwen3_vl"):
        return transformers.LlavaNextForConditionalGeneration
    return {"llava": 1}[f"{ctx.family}"]
'''
    found = sorted(text for _, text in offences(code, names, classes))
    assert found == ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "llava", "qwen2_5_vl",
                     "qwen3_vl"]


def test_every_family_is_declared_completely():
    import transformers

    for fam in all_families():
        assert fam.adapter.family == fam.name
        assert all(hasattr(transformers, c) for c in fam.hf_classes)
        assert fam.tiny is not None and fam.flops is not None and fam.register_tower is not None
        assert fam.layouts[0] == "model" and (fam.fixed_grid or fam.full_grid_layout in fam.layouts)
        assert set(fam.defaults["occamtoken"]) == {"lambda1", "layer"}


def test_support_follows_needs_and_capabilities():
    from vtprune.matrix import support_matrix
    from vtprune.methods.base import method_class

    for row in support_matrix():
        cls = method_class(row["method"])
        for fam in all_families():
            lacking = cls.needs - fam.capabilities
            assert (fam.name in cls.unsupported) == bool(lacking)
            assert row[fam.name].startswith("no: ") == bool(lacking)


def test_an_unknown_family_is_a_clear_error():
    import pytest

    from vtprune.errors import UnsupportedModelError
    from vtprune.methods.occamtoken import DEFAULT_LAMBDA1, OccamToken

    with pytest.raises(UnsupportedModelError, match="Unknown model family 'idefics'.*llava"):
        OccamToken().bind("idefics", 12)
    with pytest.raises(UnsupportedModelError, match="Unknown model family"):
        DEFAULT_LAMBDA1["idefics"]


def test_the_pipeline_takes_every_declared_image_input():
    import inspect

    from vtprune.models.families import image_input_keys
    from vtprune.pipeline import prefill

    assert prefill.image_input_keys is image_input_keys
    assert "for k in image_input_keys() if k in kwargs" in inspect.getsource(prefill.run_prefill)
