"""Fixtures for the lmms-eval tests (run in the lmms venv by ``.ci/lmms.sh``, not by the main suite).

The model is the shipped scenes model when it is installed, else a tiny random-weight LLaVA saved
with a word-level tokenizer and a real processor (``tiny_checkpoint.py``). The data is the scenes
test split exported by ``vtprune.eval.export_scenes``; ``VTPRUNE_LMMS_SCENES`` sets its size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_SCENES = int(os.environ.get("VTPRUNE_LMMS_SCENES", "40"))
BATCH = 4
MAX_NEW_TOKENS = 8  # as in vtprune_scenes.yaml


REPORT: list[str] = []


def report(line: str) -> None:
    """A line for the end of the pytest run (the measured scores)."""
    print(line)
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("vtprune lmms-eval scores")
        for line in REPORT:
            terminalreporter.write_line(line)


def _shipped_model() -> str | None:
    try:
        from vtprune.eval.lmms_model import resolve_pretrained

        path = Path(resolve_pretrained("demo"))
    except Exception:
        return None
    return str(path) if (path / "config.json").is_file() else None


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> dict:
    """{'path', 'shipped', 'prune': method kwargs for the pruned runs, 'keep': tokens kept}."""
    path = _shipped_model()
    if path is not None:
        return {"path": path, "shipped": True, "prune": {"method": "cls_topk", "keep": 64}, "keep": 64}
    from tiny_checkpoint import save_tiny_llava

    path = save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
    return {"path": str(path), "shipped": False, "prune": {"method": "cls_topk", "keep": 4}, "keep": 4}


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory) -> Path:
    from vtprune.eval.export_scenes import export_scenes

    return export_scenes(tmp_path_factory.mktemp("scenes_task"), n=N_SCENES)


@pytest.fixture(scope="session")
def examples():
    from vtprune.demo.scenes import make_split

    return make_split("test", N_SCENES)


def model_args(checkpoint: dict, pruned: bool) -> str:
    parts = [f"pretrained={checkpoint['path']}"]
    if pruned:
        parts += [f"{k}={v}" for k, v in checkpoint["prune"].items()]
    return ",".join(parts)


def run_lmms_eval(model_args: str, scenes_dir: Path, batch_size: int = BATCH, tasks=("vtprune_scenes",),
                  include_path=None) -> dict:
    """lmms-eval's own evaluator, in this process, on the model registered as ``vtprune``."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    task_manager = TaskManager("WARNING", include_path=[str(p) for p in (include_path or [scenes_dir])],
                               model_name="vtprune")
    return evaluator.simple_evaluate(model="vtprune", model_args=model_args, tasks=list(tasks),
                                     batch_size=batch_size, log_samples=True, task_manager=task_manager,
                                     verbosity="WARNING")


def predictions(results: dict, task: str = "vtprune_scenes") -> dict[int, str]:
    return {int(s["doc_id"]): s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
            for s in results["samples"][task]}


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def results_file(output: Path) -> dict:
    files = sorted(Path(output).glob("*/*_results.json"))
    assert files, f"no results JSON under {output}"
    return json.loads(files[-1].read_text())


def samples_file(output: Path, task: str = "vtprune_scenes") -> dict[int, str]:
    files = sorted(Path(output).glob(f"*/*_samples_{task}.jsonl"))
    assert files, f"no samples of {task} under {output}"
    out = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        out[int(s["doc_id"])] = s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
    return out
