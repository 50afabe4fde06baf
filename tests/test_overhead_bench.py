"""benchmarks/overhead.py: the core runs on a tiny model, every method is present, the numbers are
finite, and the reference call (a) computes exactly what the pruned call (b) computes."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_bench", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _finite(*xs):
    return all(isinstance(x, float) and math.isfinite(x) for x in xs)


def test_every_method_runs_and_the_reference_equals_the_pruned_call(overhead):
    model = overhead.build_tiny("llava")
    inputs = overhead.make_inputs(model, tiny=True)
    plan = overhead.method_plan("llava", model.config.text_config.num_hidden_layers, keep=4)
    result = overhead.measure_model(model, inputs, plan, repeats=3, warmup=1, check_repeats=3)

    labels = [r["method"] for r in result["rows"]]
    assert sorted(labels) == sorted(["keep_all(vision)", "keep_all(llm)"] + overhead.budget_methods())
    assert {"fastv", "cls_topk", "divprune", "occamtoken", "sparsevlm"} <= set(labels)
    for row in result["rows"]:
        assert row["status"] == "ok", row
        assert _finite(row["reference_ms"], row["pruned_ms"], row["overhead_ms"], row["method_ms"],
                       row["pipeline_ms"], *row["overhead_ci_ms"], *row["pipeline_ci_ms"]), row
        assert row["overhead_ci_ms"][0] <= row["overhead_ci_ms"][1]
        assert len(row["raw_s"]["pruned"]) == len(row["raw_s"]["reference"]) == 3
        # what makes (a) an honest baseline: it computes the pruned call's logits
        assert row["max_abs_logit_diff"] <= 1e-4, row["method"]
        assert row["kind"] == ("in-LLM" if row["llm_layers"] else "pre-LLM")
        assert row["target_ms"] == {"pre-LLM": 1.0, "in-LLM": 2.0}[row["kind"]]
    in_llm = {r["method"] for r in result["rows"] if r["kind"] == "in-LLM"}
    assert {"keep_all(llm)", "fastv", "dart", "pyramiddrop", "sparsevlm", "occamtoken"} <= in_llm
    check = result["loop_check"]
    assert check["max_abs_logit_diff"] <= 1e-4 and _finite(check["body_minus_own_ms"], *check["ci_ms"])

    payload = {"command": "python benchmarks/overhead.py --families llava", "args": {"repeats": 3, "warmup": 1},
               "environment": {"device": "cpu", "cpu_threads": 1, "torch": "-", "transformers": "-", "date": "-"},
               "results": [dict(result, model="tiny llava")]}
    text, markdown = overhead.format_text(payload), overhead.format_markdown(payload)
    assert all(label in text and label in markdown for label in labels)


def test_in_llm_reference_with_deepstack_merging_and_several_stages(overhead):
    """Qwen3-VL: a stage before a DeepStack layer, three stages, and SparseVLM's recycled token (a row
    whose values the method replaced) — the reference still equals the pruned call."""
    import torch

    import vtprune

    model = overhead.build_tiny("qwen3_vl")
    twin = overhead.make_twin(model)
    assert twin.lm_head.weight is model.lm_head.weight  # shared, not copied
    inputs = overhead.make_inputs(model, tiny=True)
    for config in overhead.method_plan("qwen3_vl", 4, keep=4, methods=["pyramiddrop", "sparsevlm"]):
        with vtprune.pruned(model, config.name, **config.kwargs) as handle:
            cap = overhead.capture(model, handle, inputs)
        assert sorted(cap.stages) == [1, 2, 3]
        with torch.no_grad():
            logits = overhead.reference_llm(twin, cap, logits_to_keep=0)
        assert logits.shape == cap.pruned_logits.shape
        assert (logits - cap.pruned_logits).abs().max() <= 1e-4
        if config.name == "sparsevlm":
            assert any(len(replaced) for _, replaced, _ in cap.stages.values())
