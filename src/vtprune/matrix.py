"""The method × model support matrix, computed from the code: each method's stages and the
capabilities it needs (``Method.needs``) against those each model family declares
(``vtprune.models.families``)."""
from __future__ import annotations

from .methods.base import _REGISTRY, available_methods
from .models.families import CAPABILITIES, get
from .tiny import FAMILIES


class _DisplayNames(dict):
    def __missing__(self, family: str) -> str:
        return get(family).display_name


#: family -> display name (the README header), from the family declarations
FAMILY_NAMES = _DisplayNames()


def family_reason(capability: str) -> str:
    return CAPABILITIES[capability]


def support_matrix() -> list[dict]:
    rows = []
    for name in available_methods():
        if name.startswith("test_"):
            continue
        cls = _REGISTRY[name]
        stages = stage_column(cls)
        cells = {}
        for f in FAMILIES:
            family, reason = get(f), cls.refusal(f)
            if reason is not None:
                cells[f] = "no: " + reason
            elif cls.needs_full_grid and not family.fixed_grid:
                cells[f] = (f"yes, with layout='{family.full_grid_layout}'" if family.full_grid_layout
                            else "no: " + family_reason("fixed_grid"))
            else:
                cells[f] = "yes"
        rows.append({"method": name, "stage": stages, **cells, "positions": cls.default_positions,
                     "official": official_link(cls.official_code)})
    return rows


def stage_names(stages) -> str:
    return "+".join(s.value for s in stages) if stages else "configurable"


def stage_column(cls) -> str:
    """The insertion point(s) the method runs at once bound (``stages_for``): the first family's, then
    every other one with the families that use it, e.g. "vision; projected on Qwen2.5-VL, Qwen3-VL"."""
    by_stages: dict[str, list[str]] = {}
    for f in FAMILIES:
        by_stages.setdefault(stage_names(cls.stages_for(f)), []).append(FAMILY_NAMES[f])
    first, *others = by_stages
    return "; ".join([first] + [f"{names} on {', '.join(by_stages[names])}" for names in others])


def official_link(code: str) -> str:
    """``owner/repo@commit path::function`` as a markdown link to that file at that commit ("–" if none)."""
    if not code:
        return "–"
    where, _, function = code.partition("::")
    repo_commit, _, path = where.partition(" ")
    repo, _, commit = repo_commit.partition("@")
    return f"[{repo}@{commit[:7]}](https://github.com/{repo}/blob/{commit}/{path}) `{function}`"


def markdown_matrix() -> str:
    rows = support_matrix()
    head = ("| method | insertion point | " + " | ".join(FAMILY_NAMES[f] for f in FAMILIES)
            + " | positions (LLaVA) | default follows |")
    sep = "|" + "---|" * (4 + len(FAMILIES))
    body = ["| " + " | ".join([r["method"], r["stage"]] + [r[f] for f in FAMILIES] + [r["positions"], r["official"]])
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_readme(path: str = "README.md") -> None:
    """Replace the matrix block between the README's markers with the current matrix."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start, end = "<!-- matrix:start -->", "<!-- matrix:end -->"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    p.write_text(f"{head}{start}\n{markdown_matrix()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if "--write-readme" in sys.argv:
        write_readme()
    else:
        print(markdown_matrix())
