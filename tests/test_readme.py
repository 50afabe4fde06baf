"""The README's method matrix is generated from the code and must match it."""
from pathlib import Path

from vtprune.matrix import markdown_matrix


def test_readme_matrix_is_current():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- matrix:start -->")[1].split("<!-- matrix:end -->")[0].strip()
    assert block == markdown_matrix(), "regenerate the README matrix: python -m vtprune.matrix --write-readme"


def test_readme_opens_with_the_two_commands():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    first_block = text.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("vtprune demo")
    assert first_block[1].endswith("python -m pytest")
