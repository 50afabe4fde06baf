"""The shipped demo model (``src/vtprune/demo/model``) through the plugin, when vLLM can run it here:
cls_topk and OccamToken stage I (ranked to the budget, with the register file shipped next to the
weights) give HF's tokens.

vLLM's CPU attention supports decoder head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512;
a demo model with another head size is skipped with that reason (it still serves on GPUs).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ARCH, HFRunner, engine, greedy

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _demo_path() -> Path:
    import vtprune.demo

    return Path(vtprune.demo.__file__).parent / "model"


def test_demo_model_pruned_answers_equal_hf():
    path = _demo_path()
    if not (path / "config.json").is_file():
        pytest.skip("no demo model shipped yet")
    text = json.loads((path / "config.json").read_text())["text_config"]
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if head not in CPU_HEAD_SIZES:
        pytest.skip(f"the demo model's decoder head size {head} is not supported by vLLM's CPU attention "
                    f"({', '.join(map(str, CPU_HEAD_SIZES))})")
    from vtprune.demo import scenes
    from vtprune.demo.tokenizer import prompt

    examples = scenes.make_split("test", 4)
    hf = HFRunner("llava", str(path))
    overrides = {"architectures": [ARCH["llava"]], "vtprune_method": "cls_topk", "vtprune_keep": 64,
                 "vtprune_args": {"occamtoken": {"stage2": False}}}  # its register file ships with the model
    with engine(str(path), hf_overrides=overrides) as llm:
        for method, args in (("cls_topk", {}), ("occamtoken", {"stage2": False})):
            want = [hf.generate(prompt(e.question), [scenes.render(e.scene)], method, keep=64, **args) for e in examples]
            outs = llm.generate([{"prompt": prompt(e.question), "multi_modal_data": {"image": scenes.render(e.scene)},
                                  "mm_processor_kwargs": {"vtprune_method": method}} for e in examples],
                                greedy(), use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outs] == [w for w, _ in want], method
            full = len(hf.processor(text=prompt(examples[0].question), images=[examples[0].image()])["input_ids"][0])
            assert [len(o.prompt_token_ids) for o in outs[:1]] == [full - want[0][1]], method
