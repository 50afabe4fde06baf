"""The command line has no import cycle: command modules import the shared argument helpers
(``vtprune.cli.arguments``, a leaf), never the parser that imports them. Inference code never imports
training code: only the commands that train do."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every vtprune module ``path`` imports, at any depth of the file (lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vtprune")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("vtprune"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / "vtprune").rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_command_line_modules_are_in_no_import_cycle():
    graph = import_graph()
    cli_modules = [m for m in graph if m == "vtprune.cli" or m.startswith("vtprune.cli.")]
    assert "vtprune.cli.arguments" in cli_modules
    for module in cli_modules:
        assert cycle_through(graph, module) is None, " -> ".join(cycle_through(graph, module))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}, "a") is None


#: modules that exist only to train: the demo model's and OC-VTP's trainers, OC-VTP's slot decoder
TRAINING_MODULES = {"vtprune.demo.train", "vtprune.ocvtp.train", "vtprune.ocvtp.decoder"}


def _is_command(module: str) -> bool:
    return module == "vtprune.cli" or module.startswith("vtprune.cli.") or module.endswith(".cli")


def test_only_commands_import_training_code():
    """Lazy imports count: a function that would import a trainer when called is flagged too."""
    graph = import_graph()
    assert TRAINING_MODULES <= set(graph), "a training module moved: update TRAINING_MODULES"
    inference = [m for m in graph if not _is_command(m) and m not in TRAINING_MODULES]
    bad = {m: sorted(reachable(graph, m) & TRAINING_MODULES) for m in inference}
    assert not {m: t for m, t in bad.items() if t}


def test_the_training_check_sees_a_lazy_import():
    graph = {"vtprune.methods.x": {"vtprune.helpers"}, "vtprune.helpers": {"vtprune.ocvtp.train"}}
    assert reachable(graph, "vtprune.methods.x") == {"vtprune.helpers", "vtprune.ocvtp.train"}


APPLY_EVERY_METHOD = """
import inspect, sys, warnings
import torch
import vtprune
from vtprune.methods import method_class
from vtprune.ocvtp import checkpoint_dir
from vtprune.tiny import Sample, make_inputs, tiny_model

warnings.simplefilter("ignore")
model = tiny_model("llava")
inputs = make_inputs(model, [Sample([1, 7], [9, 10, 11], image_seed=0)])
tiny = {"ocvtp": {"checkpoint": checkpoint_dir() / "synthetic-d32"}, "pyramiddrop": {"layers": (1, 2, 3)},
        "sparsevlm": {"layers": (1, 2, 3)}}  # the tiny model's 4 decoder layers, its 32-d tower
for name in vtprune.available_methods():
    args = {"keep": 4} if "keep" in inspect.signature(method_class(name)).parameters else {}
    args.update(tiny.get(name, {}))
    with vtprune.pruned(model, name, **args), torch.no_grad():
        model(**inputs)
print(" ".join(sorted(m for m in sys.modules if m.startswith("vtprune."))))
"""


def test_applying_every_method_imports_no_training_code(tmp_path):
    """In a fresh interpreter (this one has imported the trainers for other tests)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "VTPRUNE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", APPLY_EVERY_METHOD], capture_output=True, text=True, check=True,
                         env=env)
    loaded = set(out.stdout.split())
    assert "vtprune.methods.ocvtp" in loaded and "vtprune.occamtoken.intervention" in loaded
    assert not loaded & TRAINING_MODULES
