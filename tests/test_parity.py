"""Reference parity: each baseline's default selects what its authors' code selects.

Every ``tests/fixtures/parity/<name>.json`` holds what an official implementation produced on seeded
inputs (``tests/parity/inputs.py``): the repository, commit and function it came from, how it was
run, and per case the kept indices, token counts and (in ``<name>.pt``) merged values. The runner
``tests/parity/<runner>.py`` feeds vtprune the same inputs; its result must equal the fixture:
integer lists exactly, tensors within 1e-5. See tests/fixtures/parity/README.md to regenerate.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from parity import inputs

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


def _cases():
    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        fixture = json.loads(path.read_text())
        for case in fixture["cases"]:
            out.append(pytest.param(path, fixture, case, id=f"{path.stem}-{case['id']}"))
    return out


def _expected_tensor(path: Path, key: str) -> torch.Tensor:
    return torch.load(path.with_suffix(".pt"), weights_only=True)[key]


def test_every_fixture_names_its_source():
    fixtures = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]
    assert fixtures, "no parity fixture found"
    for f in fixtures:
        official = f["official"]
        assert official["repo"] and len(official["commit"]) == 40 and official["function"], f["method"]
        assert f["produced_by"] and len(f["cases"]) >= 6, f["method"]


@pytest.mark.parametrize("path,fixture,case", _cases())
def test_parity(path, fixture, case):
    if "inputs" in case and "checksum" in case:
        got_sum = inputs.checksum(inputs.make(**case["inputs"]))
        for name, want in case["checksum"].items():
            assert got_sum[name] == pytest.approx(want, rel=1e-6), f"input generator drifted ({name})"
    runner = importlib.import_module(f"parity.{fixture['runner']}")
    got = runner.run(case)
    for key, want in case["expected"].items():
        assert key in got, f"runner gave no {key!r}"
        if isinstance(want, str) and want.startswith("pt:"):
            torch.testing.assert_close(torch.as_tensor(got[key]).float().cpu(), _expected_tensor(path, want[3:]).float(),
                                       atol=1e-5, rtol=1e-5)
        else:
            value = got[key].tolist() if isinstance(got[key], torch.Tensor) else got[key]
            assert value == want, f"{key}: vtprune {value} != official {want}"


def test_each_method_names_the_code_its_fixture_came_from():
    """``official_code`` (shown in the README's matrix) is the repository and commit the fixture was made from."""
    from vtprune.methods import method_class

    for path in sorted(FIXTURES.glob("*.json")):
        fixture = json.loads(path.read_text())
        official = fixture["official"]
        code = method_class(fixture["method"]).official_code
        assert code.startswith(f"{official['repo']}@{official['commit']} "), (fixture["method"], code)
