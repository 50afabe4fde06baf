"""The method × model support matrix, computed from the code (each method's stages and refusals)."""
from __future__ import annotations

from .methods.base import _REGISTRY, available_methods
from .tiny import FAMILIES

FAMILY_NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


def support_matrix() -> list[dict]:
    rows = []
    for name in available_methods():
        if name.startswith("test_"):
            continue
        cls = _REGISTRY[name]
        stages = "+".join(s.value for s in cls.stages) if cls.stages else "configurable"
        cells = {f: ("no: " + cls.unsupported[f]) if f in cls.unsupported else "yes" for f in FAMILIES}
        if cls.needs_full_grid and cells["llava_next"] == "yes":
            cells["llava_next"] = "yes, with layout='flat'"
        rows.append({"method": name, "stage": stages, **cells})
    return rows


def markdown_matrix() -> str:
    rows = support_matrix()
    head = "| method | insertion point | " + " | ".join(FAMILY_NAMES[f] for f in FAMILIES) + " |"
    sep = "|" + "---|" * (2 + len(FAMILIES))
    body = ["| " + " | ".join([r["method"], r["stage"]] + [r[f] for f in FAMILIES]) + " |" for r in rows]
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
