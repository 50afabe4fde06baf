"""Docs speak of the repository alone: no path of a build machine."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|root|home|tmp|mnt|opt)/")


def test_no_markdown_file_points_outside_the_repository():
    docs = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/**/*.md")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in docs for i, line in enumerate(p.read_text().splitlines(), 1)
                 if MACHINE_PATH.search(line)]
    assert not offenders, f"paths of a build machine in {offenders}"
