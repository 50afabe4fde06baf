"""The shipped demo model (``src/vtprune/demo/model``) through the plugin, when vLLM can run it here.

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
    want = [hf.generate(prompt(e.question), [scenes.render(e.scene)], "cls_topk", keep=64) for e in examples]
    overrides = {"architectures": [ARCH["llava"]], "vtprune_method": "cls_topk", "vtprune_keep": 64}
    with engine(str(path), hf_overrides=overrides) as llm:
        outs = llm.generate([{"prompt": prompt(e.question), "multi_modal_data": {"image": scenes.render(e.scene)}}
                             for e in examples], greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [w for w, _ in want]
