"""Bad input raises an error that says what to do."""
import pytest
import torch

import vtprune
from vtprune.errors import (ArgumentError, BudgetError, InputError, UnknownMethodError, UnsupportedMethodError,
                            UnsupportedModelError)
from vtprune.methods import Method, Selection, Stage
from vtprune.tiny import Sample, make_inputs, tiny_model


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


def test_budget_must_be_positive():
    with pytest.raises(BudgetError, match="positive"):
        vtprune.make_method("random", keep=0)
    with pytest.raises(BudgetError, match="between 0 and 1"):
        vtprune.make_method("random", ratio=1.5)
    with pytest.raises(BudgetError, match="either keep"):
        vtprune.make_method("random", keep=3, ratio=0.5)


def test_budget_above_token_count_names_the_count(llava):
    inputs = make_inputs(llava, [Sample([1], [9], 0)])
    with vtprune.pruned(llava, "random", keep=16):
        with pytest.raises(BudgetError, match="16 visual tokens"):
            llava(**inputs)


def test_unsupported_model_lists_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vtprune.apply(model, "random", keep=4)


def test_placeholder_mismatch(llava):
    inputs = make_inputs(llava, [Sample([1], [9], 0)])
    short = dict(inputs, input_ids=inputs["input_ids"][:, 3:], attention_mask=inputs["attention_mask"][:, 3:])
    two_images = dict(inputs, pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with vtprune.pruned(llava, "random", keep=4):
        with pytest.raises(InputError, match="placeholder"):
            llava(**short)
        with pytest.raises(InputError, match="2 image"):
            llava(**two_images)
        with pytest.raises(InputError, match="floating point"):
            llava(**dict(inputs, pixel_values=inputs["pixel_values"].long()))


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownMethodError, match="Did you mean 'fastv'"):
        vtprune.make_method("fastvv", keep=4)


class NeedsCls(Method):
    name = "test_needs_cls"
    stages = (Stage.VISION,)

    def select_vision(self, ctx):
        return Selection(keep=ctx.cls_attention.mean(0).argsort()[:2])


def test_method_needing_what_the_family_lacks():
    qwen = tiny_model("qwen2_5_vl")
    inputs = make_inputs(qwen, [Sample([1], [9], 0, (112, 112))])
    with vtprune.pruned(qwen, NeedsCls()):
        with pytest.raises(UnsupportedMethodError, match="CLS"):
            qwen(**inputs)
    with pytest.raises(UnsupportedMethodError, match="decoder layer 9"):
        vtprune.apply(qwen, "fastv", keep=4, layer=9)
    assert "forward" not in qwen.__dict__  # a refused apply leaves the model untouched


def test_double_apply_is_refused(llava):
    with vtprune.pruned(llava, "random", keep=4):
        with pytest.raises(RuntimeError, match="already pruned"):
            vtprune.apply(llava, "random", keep=4)


def test_a_transformers_without_precomputed_image_features_is_refused(llava, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(UnsupportedModelError, match="transformers >= 5.18"):
        vtprune.apply(llava, "random", keep=4)
    assert "forward" not in llava.__dict__


def test_positions_must_be_original_or_contiguous(llava):
    with pytest.raises(ArgumentError, match="positions='gapless' is not allowed"):
        vtprune.apply(llava, "fastv", keep=4, positions="gapless")
    assert getattr(llava, "_vtprune_handle", None) is None


def test_contiguous_positions_are_refused_for_qwen_but_its_default_falls_back():
    from tiny_models import model_of

    qwen = model_of("qwen2_5_vl")
    with pytest.raises(UnsupportedMethodError, match="M-RoPE"):
        vtprune.apply(qwen, "fastv", keep=4, positions="contiguous")
    assert getattr(qwen, "_vtprune_handle", None) is None and "forward" not in qwen.__dict__


def test_a_method_defaulting_to_contiguous_positions_gets_them(llava):
    class Contiguous(Method):
        name = "test_contiguous_default"
        stages = (Stage.VISION,)
        default_positions = "contiguous"

    with vtprune.pruned(llava, Contiguous()) as handle:
        assert handle._installation.contiguous
    with vtprune.pruned(llava, Contiguous(), positions="original") as handle:
        assert not handle._installation.contiguous
