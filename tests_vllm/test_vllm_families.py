"""vLLM with the plugin against vtprune's Hugging Face path, per model family.

For every family: plain vLLM equals the plugin with pruning off (and transformers); for every servable
method the plugin's greedy tokens equal ``vtprune.apply(hf_model, method, ...)`` + ``generate`` with the
same budget; vLLM's prompt shrinks by exactly the pruned count; per-request overrides work; methods
vLLM cannot host are clean request errors (the engine keeps serving). The plugin engine runs with
chunked prefill in small chunks so that images are split across prefill steps.
"""
from __future__ import annotations

import pytest

from conftest import ARCH, SIZES, HFRunner, engine, greedy, image

#: methods that must run inside vLLM, per family, with the budget used here
SERVABLE = {
    "llava": ["cls_topk", "random", "pooling", "visionzip", "vispruner", "divprune", "hiprune", "ocvtp", "occamtoken"],
    "llava_next": ["cls_topk", "random", "visionzip", "vispruner", "divprune", "ocvtp", "occamtoken"],
    "qwen2_5_vl": ["cls_topk", "random", "pooling", "vispruner", "divprune", "ocvtp"],
    "qwen3_vl": ["cls_topk", "random", "pooling", "vispruner", "divprune", "ocvtp"],
    "llava_onevision": ["cls_topk", "random", "vispruner", "divprune", "ocvtp", "occamtoken"],
}
BUDGET = {"llava": {"keep": 16}, "llava_next": {"ratio": 0.25}, "qwen2_5_vl": {"ratio": 0.25},
          "qwen3_vl": {"ratio": 0.25}, "llava_onevision": {"ratio": 0.25}}
#: the server's default method
SERVER = {"llava": "hiprune", "llava_next": "cls_topk", "qwen2_5_vl": "cls_topk", "qwen3_vl": "cls_topk",
          "llava_onevision": "divprune"}
#: the method of the mixed-schedule, per-request-budget and two-image checks (SigLIP has no [CLS])
PROBE = {"llava_onevision": "divprune"}
#: families whose transformers model sees the images of a multi-image prompt otherwise than vLLM's
#: (OneVision: transformers takes their base views only, vLLM all their crops)
NO_TWO_IMAGE_CHECK = ("llava_onevision",)
#: families whose variant declares images only, so that vLLM refuses a video in the front end
IMAGES_ONLY = ("llava_onevision",)


def method_table() -> dict:
    """The server's extra arguments per method (``vtprune_args``): hiprune's object layer must lie in
    the tiny 3-block tower; OC-VTP uses the synthetic 32-d pruner shipped with vtprune (the tiny
    towers are 32 wide); OccamToken serves stage I ranked to the budget, with register neurons in both
    blocks vLLM builds (so that the redirection is exercised)."""
    from vtprune.ocvtp import checkpoint_dir

    return {"hiprune": {"object_layer": 1}, "ocvtp": {"checkpoint": str(checkpoint_dir() / "synthetic-d32")},
            "occamtoken": {"stage2": False, "neurons": [[0, 3], [0, 17], [1, 5]]}}


def _request(prompt, images, **kwargs):
    req = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
    if kwargs:
        req["mm_processor_kwargs"] = kwargs
    return req


def _run(llm, requests):
    outs = llm.generate(requests, greedy(), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]


@pytest.mark.parametrize("family", list(ARCH))
def test_family(family, checkpoints):
    from vtprune.methods import available_methods

    path = checkpoints(family)
    hf = HFRunner(family, path)
    prompt = hf.prompt()
    images = [image(seed + 1, size) for seed, size in enumerate(SIZES[family])]
    budget = BUDGET[family]
    server_method, table = SERVER[family], method_table()
    probe = PROBE.get(family, "cls_topk")

    def method_args(method):
        return {**budget, **table.get(method, {})}

    expected_full = [hf.generate(prompt, [im]) for im in images]
    expected = {m: [hf.generate(prompt, [im], m, **method_args(m)) for im in images] for m in SERVABLE[family]}
    others = [m for m in available_methods() if m not in SERVABLE[family]]

    with engine(path) as llm:  # plain vLLM
        plain = _run(llm, [_request(prompt, [im]) for im in images])
    assert [t for t, _ in plain] == [t for t, _ in expected_full], "plain vLLM differs from transformers"

    overrides = {"architectures": [ARCH[family]], "vtprune_method": server_method, "vtprune_args": table,
                 **{f"vtprune_{k}": v for k, v in budget.items()}}
    with engine(path, hf_overrides=overrides, enable_chunked_prefill=True, max_num_batched_tokens=32) as llm:
        off = _run(llm, [_request(prompt, [im], vtprune_method="none") for im in images])
        assert off == plain, "the plugin with pruning off differs from plain vLLM"

        failures = []
        for m in SERVABLE[family]:
            got = _run(llm, [_request(prompt, [im], vtprune_method=m) for im in images])
            for (tokens, length), (want, pruned), (_, full_length) in zip(got, expected[m], off):
                if tokens != want:
                    failures.append(f"{m}: vLLM {tokens} != HF {want}")
                if full_length - length != pruned or pruned <= 0:  # pruned: net of registers added
                    failures.append(f"{m}: vLLM prompt {full_length} -> {length}, HF pruned {pruned} tokens")
        assert not failures, "\n".join(failures)

        if "occamtoken" in SERVABLE[family]:  # requests with and without a register, scheduled together
            got = _run(llm, [_request(prompt, [images[0]], vtprune_method="occamtoken"),
                             _request(prompt, [images[1]], vtprune_method=probe)])
            assert [t for t, _ in got] == [expected["occamtoken"][0][0], expected[probe][1][0]]

        # the server's default applies when a request names no method
        default = _run(llm, [_request(prompt, [im]) for im in images])
        assert [t for t, _ in default] == [t for t, _ in expected[server_method]]

        # a per-request budget, and two images in one prompt
        small = {"keep": 8} if "keep" in budget else {"ratio": 0.5}
        got = _run(llm, [_request(prompt, [images[0]], vtprune_method=probe,
                                  **{f"vtprune_{k}": v for k, v in small.items()})])
        want = hf.generate(prompt, [images[0]], probe, **small)
        assert got[0][0] == want[0] and off[0][1] - got[0][1] == want[1]
        if family not in NO_TWO_IMAGE_CHECK:
            two = hf.prompt(images=2)
            want = hf.generate(two, images[:2], probe, **budget)
            full = _run(llm, [_request(two, images[:2], vtprune_method="none")])
            got = _run(llm, [_request(two, images[:2], vtprune_method=probe)])
            assert got[0][0] == want[0] and full[0][1] - got[0][1] == want[1]

        # methods vLLM cannot host: a request error, and the engine keeps serving
        for m in others:
            try:
                got = _run(llm, [_request(prompt, [images[0]], vtprune_method=m)])
            except ValueError as exc:
                assert "vtprune" in str(exc)
                continue
            want = hf.generate(prompt, [images[0]], m, **method_args(m))[0]
            assert got[0][0] == want, f"{m} runs in vLLM but differs from HF"
        assert _run(llm, [_request(prompt, [images[0]], vtprune_method="none")]) == off[:1]

        if family in IMAGES_ONLY:
            import numpy as np
            from vllm.exceptions import VLLMValidationError

            video = np.zeros((4, 56, 56, 3), dtype=np.uint8)
            with pytest.raises(VLLMValidationError, match="video"):
                _run(llm, [{"prompt": prompt, "multi_modal_data": {"video": video}}])
            assert _run(llm, [_request(prompt, [images[0]], vtprune_method="none")]) == off[:1]
