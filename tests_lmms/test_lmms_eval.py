"""vtprune inside lmms-eval, through lmms-eval's real evaluator and launchers, on the offline scenes task."""
from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest
from conftest import (BATCH, MAX_NEW_TOKENS, model_args, predictions, report, results_file, run_cli,
                      run_lmms_eval, samples_file)
from own_evaluation import own_evaluation

TASK = "vtprune_scenes"


def _accuracy(results: dict, task: str = TASK, metric: str = "exact_match,none") -> float:
    return results["results"][task][metric]


def _candidates(checkpoint) -> int:
    from transformers import AutoConfig

    vc = AutoConfig.from_pretrained(checkpoint["path"]).vision_config
    return (vc.image_size // vc.patch_size) ** 2


@pytest.fixture(scope="module")
def unpruned(checkpoint, scenes_dir):
    return run_lmms_eval(model_args(checkpoint, pruned=False), scenes_dir)


@pytest.fixture(scope="module")
def pruned(checkpoint, scenes_dir):
    return run_lmms_eval(model_args(checkpoint, pruned=True), scenes_dir)


def test_entry_point_registers_the_model():
    names = [ep.name for ep in importlib.metadata.entry_points(group="lmms_eval.models")]
    assert "vtprune" in names, ("vtprune's pyproject.toml must declare "
                                "[project.entry-points.\"lmms_eval.models\"] vtprune = \"vtprune.eval:lmms_manifest\"")
    from lmms_eval.models import get_model

    from vtprune.eval.lmms_model import VTPruneLMM

    assert get_model("vtprune") is VTPruneLMM


def test_export_is_the_benchmark(scenes_dir, examples):
    import datasets

    data = datasets.load_dataset("parquet", data_files={"test": str(scenes_dir / "test.parquet")})["test"]
    assert len(data) == len(examples)
    assert data["question"] == [e.question for e in examples]
    assert data["answer"] == [e.answer for e in examples]
    image = examples[0].image() if callable(examples[0].image) else examples[0].image
    assert data[0]["image"].convert("RGB").tobytes() == image.convert("RGB").tobytes()


def _check_against_own(results, checkpoint, examples, label, method=None, **method_args):
    accuracy, own_predictions, bench = own_evaluation(checkpoint["path"], examples, MAX_NEW_TOKENS, method,
                                                      **method_args)
    report(f"scenes exact match, {label}: lmms-eval {_accuracy(results):.4f}, vtprune's own loop {accuracy:.4f}, "
           f"vtprune.demo.bench {'n/a' if bench is None else f'{bench:.4f}'} ({len(examples)} questions, "
           f"{'shipped model' if checkpoint['shipped'] else 'tiny stand-in model'})")
    assert _accuracy(results) == pytest.approx(accuracy, abs=1e-9)
    if bench is not None:
        assert _accuracy(results) == pytest.approx(bench, abs=1e-9)
    got = predictions(results)  # batched (left-padded) lmms-eval answers = one-at-a-time answers
    assert [got[i].strip() for i in range(len(examples))] == [p.strip() for p in own_predictions]


def test_unpruned_accuracy_equals_vtprunes_own_evaluation(checkpoint, examples, unpruned):
    _check_against_own(unpruned, checkpoint, examples, "unpruned")
    thr = unpruned["throughput"]
    assert thr["avg_vtprune_visual_tokens_entering_llm"] == _candidates(checkpoint)


def test_pruned_run_reports_its_kept_tokens(checkpoint, examples, pruned):
    thr = pruned["throughput"]
    keep = checkpoint["keep"]
    assert thr["avg_vtprune_visual_tokens_entering_llm"] == keep
    assert thr["avg_vtprune_visual_tokens_layer_averaged"] == keep  # a vision-side method
    assert thr["avg_vtprune_visual_tokens_before_pruning"] == _candidates(checkpoint)
    method = dict(checkpoint["prune"])
    _check_against_own(pruned, checkpoint, examples, str(checkpoint["prune"]), method.pop("method"), **method)
    # per sample: the prompt that entered the LLM is shorter by the pruned tokens
    sample = pruned["samples"][TASK][0]
    assert sample["token_counts"][0]["input_tokens"] > keep


def test_vtprune_eval_front_end_in_llm_method(tmp_path, checkpoint, scenes_dir):
    out = tmp_path / "out"
    run_cli([sys.executable, "-m", "vtprune.eval.cli", "--model", checkpoint["path"], "--method", "fastv",
             "--arg", "ratio=0.25", "--arg", "layer=2", "--tasks", TASK, "--scenes", str(len(samples_of(scenes_dir))),
             "--scenes-dir", str(scenes_dir), "--batch-size", str(BATCH), "--limit", "8", "--output", str(out)])
    results = results_file(out)
    stats = results["vtprune"]
    n = _candidates(checkpoint)
    assert stats["method"] == "fastv" and stats["method_args"] == {"ratio": 0.25, "layer": 2}
    assert stats["requests"] == 8
    assert stats["mean_visual_tokens_entering_llm"] == n  # FastV prunes inside the LLM
    layers = stats["num_decoder_layers"]
    kept = stats["mean_visual_tokens_after_last_stage"]
    assert kept == max(1, round(0.25 * n)) or kept < n
    assert stats["mean_visual_tokens_layer_averaged"] == pytest.approx((2 * n + (layers - 2) * kept) / layers)
    assert len(samples_file(out)) == 8


def samples_of(scenes_dir):
    import json

    return range(json.loads((scenes_dir / "manifest.json").read_text())["n"])


def test_two_processes_give_the_same_score(tmp_path, checkpoint, scenes_dir, examples, unpruned):
    """`vtprune eval --num-processes 2` (accelerate launch underneath) = the single-process run."""
    out = tmp_path / "out"
    run_cli([sys.executable, "-m", "vtprune.eval.cli", "--model", checkpoint["path"], "--tasks", TASK,
             "--scenes", str(len(examples)), "--scenes-dir", str(scenes_dir), "--batch-size", str(BATCH),
             "--output", str(out), "--num-processes", "2"])
    results = results_file(out)
    report(f"scenes exact match, unpruned: 1 process {_accuracy(unpruned):.4f}, 2 processes {_accuracy(results):.4f}")
    assert results["vtprune"]["world_size"] == 2
    assert results["vtprune"]["requests"] == len(examples)  # rank padding not counted
    assert _accuracy(results) == _accuracy(unpruned)
    assert samples_file(out) == predictions(unpruned)


def test_plain_accelerate_launch_pruned(tmp_path, checkpoint, scenes_dir, pruned):
    """The documented multi-process command: accelerate launch -m lmms_eval --model vtprune ..."""
    out = tmp_path / "out"
    run_cli([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
             "-m", "lmms_eval", "--model", "vtprune", "--model_args", model_args(checkpoint, pruned=True),
             "--tasks", TASK, "--include_path", str(scenes_dir), "--batch_size", str(BATCH),
             "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"],
            env={"ACCELERATE_USE_CPU": "true"})
    results = results_file(out)
    report(f"scenes exact match, {checkpoint['prune']}: 1 process {_accuracy(pruned):.4f}, "
          f"2 processes {_accuracy(results):.4f}")
    assert _accuracy(results) == _accuracy(pruned)
    assert results["throughput"]["avg_vtprune_visual_tokens_entering_llm"] == checkpoint["keep"]
    assert samples_file(out) == predictions(pruned)


MC_UTILS = '''
from vtprune.demo.scenes import COLOR_NAMES, NUMBERS, SHAPES

def doc_to_choice(doc):
    return {"color": list(COLOR_NAMES), "shape": list(SHAPES), "count": list(NUMBERS),
            "spatial": ["left", "right", "above", "below"]}.get(doc["qtype"], ["yes", "no"])

def doc_to_target(doc):
    return doc_to_choice(doc).index(doc["answer"])
'''


def test_loglikelihood_multiple_choice(tmp_path, checkpoint, scenes_dir, examples):
    """A multiple-choice variant of the task goes through loglikelihood(); unpruned it equals a
    plain forward pass, pruned it records the kept tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtprune.eval.lmms_model import build_prompt

    (tmp_path / "mc_utils.py").write_text(MC_UTILS)
    (tmp_path / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: vtprune_scenes_mc
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {scenes_dir / 'test.parquet'}
        test_split: test
        output_type: multiple_choice
        doc_to_visual: !function vtprune.eval.lmms_tasks.scenes_utils.doc_to_visual
        doc_to_text: !function vtprune.eval.lmms_tasks.scenes_utils.doc_to_text
        doc_to_choice: !function mc_utils.doc_to_choice
        doc_to_target: !function mc_utils.doc_to_target
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    n = 10
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=[str(tmp_path)], model_name="vtprune")
    results = evaluator.simple_evaluate(model="vtprune", model_args=model_args(checkpoint, pruned=False),
                                        tasks=["vtprune_scenes_mc"], batch_size=BATCH, limit=n, log_samples=True,
                                        task_manager=tm, verbosity="WARNING")
    model = AutoModelForImageTextToText.from_pretrained(checkpoint["path"], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint["path"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("mc_utils_ref", tmp_path / "mc_utils.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    correct = 0
    by_doc = {int(s["doc_id"]): s for s in results["samples"]["vtprune_scenes_mc"]}
    for i, ex in enumerate(examples[:n]):
        doc = {"qtype": ex.qtype, "answer": ex.answer}
        image = ex.image() if callable(ex.image) else ex.image
        prompt = build_prompt(processor, ex.question, 1)
        scores = []
        for choice in mc.doc_to_choice(doc):
            inputs = processor(images=image, text=prompt + " " + choice, return_tensors="pt")
            head = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            m = len(processor.tokenizer(prompt + " " + choice, add_special_tokens=False)["input_ids"]) - head
            with torch.inference_mode():
                logits = model(**inputs).logits[0].float()
            ids = inputs["input_ids"][0]
            # lmms-eval's convention: the mean negative log-likelihood of the continuation (argmin wins)
            scores.append(-torch.log_softmax(logits[-m - 1:-1], -1).gather(-1, ids[-m:, None]).mean().item())
        got = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in by_doc[i]["resps"]]
        assert got == pytest.approx(scores, abs=1e-4)
        correct += int(min(range(len(scores)), key=scores.__getitem__) == mc.doc_to_target(doc))
    assert _accuracy(results, "vtprune_scenes_mc", "acc,none") == pytest.approx(correct / n)

    pruned = evaluator.simple_evaluate(model="vtprune", model_args=model_args(checkpoint, pruned=True),
                                       tasks=["vtprune_scenes_mc"], batch_size=BATCH, limit=n, log_samples=False,
                                       task_manager=tm, verbosity="WARNING")
    assert pruned["throughput"]["avg_vtprune_visual_tokens_entering_llm"] == checkpoint["keep"]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_other_families_batched_equal_one_at_a_time(tmp_path, family, scenes_dir, examples):
    """Each family's processor, chat template, left-padded batches and in-LLM pruning (M-RoPE for
    Qwen) through lmms-eval give the answers of a one-question-at-a-time loop."""
    from tiny_checkpoint import save_tiny

    path = save_tiny(family, tmp_path / family)
    n = 12
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=[str(scenes_dir)], model_name="vtprune")
    results = evaluator.simple_evaluate(model="vtprune", model_args=f"pretrained={path},method=fastv,ratio=0.25,layer=2",
                                        tasks=[TASK], batch_size=BATCH, limit=n, log_samples=True, task_manager=tm,
                                        verbosity="WARNING")
    accuracy, own, _ = own_evaluation(str(path), examples[:n], MAX_NEW_TOKENS, "fastv", use_bench=False,
                                      ratio=0.25, layer=2)
    got = predictions(results)
    assert [got[i].strip() for i in range(n)] == [p.strip() for p in own]
    assert _accuracy(results) == pytest.approx(accuracy, abs=1e-9)
    thr = results["throughput"]
    assert thr["avg_vtprune_visual_tokens_layer_averaged"] < thr["avg_vtprune_visual_tokens_entering_llm"]


def test_vtprune_cli_has_eval():
    """`vtprune eval` is wired into the main command line (vtprune.cli calls vtprune.eval.cli.add_cli)."""
    from vtprune.cli import build_parser
    from vtprune.eval.cli import run_eval

    args = build_parser().parse_args(["eval", "--model", "demo", "--tasks", TASK, "--arg", "keep=64"])
    assert args.func is run_eval and args.arg == ["keep=64"]
