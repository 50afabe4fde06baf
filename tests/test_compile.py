"""torch.compile of the unmodified decoder keeps working under apply() for pre-LLM methods."""
import torch

import vtprune
from vtprune.tiny import Sample, make_inputs, tiny_model


def test_a_compiled_decoder_under_a_pre_llm_method_equals_eager():
    import torch._dynamo

    model = tiny_model("llava")
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0)])
    with vtprune.pruned(model, "cls_topk", keep=6), torch.no_grad():
        eager = model(**inputs).logits
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.model.language_model = torch.compile(model.model.language_model, dynamic=True)
    try:
        with vtprune.pruned(model, "cls_topk", keep=6) as handle, torch.no_grad():
            compiled = model(**inputs).logits
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
        assert handle.last.tokens_entering_llm == [6]
        assert (compiled - eager).abs().max() <= 1e-5
    finally:
        torch._dynamo.reset()
