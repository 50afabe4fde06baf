"""Every invalid argument is refused by ``apply()`` itself, before the model is touched, with a
VTPruneError that names it; a property-based test draws methods, argument names and values."""
import inspect

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.errors import AlreadyPrunedError, ArgumentError, BudgetError, VTPruneError
from vtprune.methods import available_methods, method_class
from vtprune.ocvtp import checkpoint_dir
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

_MODELS = {}


def model_of(family):
    """(model, inputs, plain logits, hook count) of a tiny ``family`` model, built once."""
    if family not in _MODELS:
        model = tiny_model(family)
        size = (56, 56) if family in ("llava", "llava_next") else (112, 112)
        inputs = make_inputs(model, [Sample([1, 7], [9, 10, 11], 0, size)])
        with torch.no_grad():
            plain = model(**inputs).logits  # also lets transformers install its own output hooks
        _MODELS[family] = (model, inputs, plain, _hooks(model))
    return _MODELS[family]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_untouched(family):
    model, inputs, plain, hooks = model_of(family)
    assert "forward" not in model.__dict__
    assert getattr(model, "_vtprune_handle", None) is None
    assert _hooks(model) == hooks
    assert not any(hasattr(m, "_vtprune_capture") for m in model.modules())


INVALID = [
    (("fastv",), dict(keep=4, kep=4), "Did you mean 'keep'"),
    (("fastv",), dict(keep=4, layer=0), "layer=0"),
    (("fastv",), dict(keep=4, layer=2.5), "layer=2.5"),
    (("dart",), dict(keep=4, layer=2.5), "layer=2.5"),
    (("keep_all",), dict(layer=2.5), "layer=2.5"),
    (("keep_all",), dict(stage="foo"), "stage='foo'.*'vision'"),
    (("random",), dict(ratio="0.5"), "ratio='0.5'"),
    (("random",), dict(keep=True), "keep=True"),
    (("pyramiddrop",), dict(keep=4, layers=(2.5,)), r"layers=\(2.5,\)"),
    (("hiprune",), dict(keep=4, object_layer=9), "object_layer=9.*1..3"),
    (("occamtoken",), dict(lambda1=float("nan")), "lambda1=nan"),
    (("occamtoken",), dict(neurons="/nonexistent.json"), "neurons='/nonexistent.json'"),
    (("sparsevlm",), dict(keep=4, schedule="papr"), "schedule='papr'"),
    ((("fastv", 8),), {}, r"\(name, \{arguments\}\)"),
    (("fastv",), dict(keep=4, layout="flatt"), "layout='flatt'"),
]


@pytest.mark.parametrize("spec,kwargs,message", INVALID, ids=[f"{s[0]}-{'-'.join(k) or 'tuple'}" for s, k, _ in INVALID])
def test_apply_refuses_invalid_arguments_before_touching_the_model(spec, kwargs, message):
    model = model_of("llava")[0]
    with pytest.raises(ArgumentError, match=message):
        vtprune.apply(model, *spec, **kwargs)
    assert_untouched("llava")


def test_layers_beyond_the_decoder_are_refused_at_apply():
    model = model_of("llava")[0]
    for name, kwargs in (("fastv", dict(keep=4, layer=4)), ("pyramiddrop", dict(keep=4, layers=(1, 9))),
                         ("occamtoken", dict(layer=7))):
        with pytest.raises(VTPruneError, match="layer"):
            vtprune.apply(model, name, **kwargs)
        assert_untouched("llava")


def test_applying_twice_is_refused_with_the_library_error():
    model = model_of("llava")[0]
    with vtprune.pruned(model, "random", keep=4):
        with pytest.raises(AlreadyPrunedError, match="already pruned"):
            vtprune.apply(model, "fastv", keep=4)
    assert_untouched("llava")


def test_errors_are_also_the_builtin_kinds_users_catch():
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, TypeError)
    assert issubclass(AlreadyPrunedError, RuntimeError)


# -- property: any method, any arguments, any family ----------------------------------------------------
METHODS = [m for m in available_methods() if not m.startswith("test_")]
MISSPELT = [m[:-1] for m in METHODS] + [m + "x" for m in METHODS] + ["FastV", "occam-token"]


def _parameter_names(name):
    try:
        params = inspect.signature(method_class(name).__init__).parameters
    except VTPruneError:
        return ["keep"]
    return [p for p in params if p != "self"]


GARBAGE = st.one_of(
    st.integers(-3, 40), st.floats(-2, 50), st.sampled_from([float("nan"), float("inf")]), st.booleans(), st.none(),
    st.text(max_size=4), st.sampled_from(["vision", "projected", "llm", "paper", "slots", "per_channel", "flat"]),
    st.tuples(st.integers(-1, 5)), st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple),
    st.lists(st.floats(0, 1), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
#: values in (or near) each argument's valid range, so that most draws reach the model
PLAUSIBLE = {
    "keep": st.integers(1, 14), "ratio": st.floats(0.05, 0.95), "seed": st.integers(0, 5),
    "layer": st.integers(0, 3), "object_layer": st.integers(1, 4), "alpha": st.floats(0, 1),
    "layers": st.lists(st.integers(1, 3), min_size=1, max_size=3, unique=True).map(lambda l: tuple(sorted(l))),
    "lam": st.floats(0.1, 0.9), "lambda1": st.floats(0, 2), "lambda2": st.floats(0, 3),
    "stage": st.sampled_from(["vision", "projected", "llm"]), "stage1": st.booleans(), "stage2": st.booleans(),
    "contextual_ratio": st.floats(0, 0.9), "important_ratio": st.floats(0, 1), "theta": st.floats(0, 0.9),
    "relevance": st.booleans(), "recycle": st.booleans(), "schedule": st.just(None), "scale": st.floats(0, 20),
    "pivot_visual": st.integers(0, 5), "pivot_text": st.integers(0, 5), "fill": st.sampled_from(["attention", "slots"]),
    "register_mode": st.sampled_from(["per_channel", "signed_max"]), "noise": st.sampled_from(["fixed", "per_call"]),
    "cls_slot": st.booleans(), "truncate": st.sampled_from(["set_order", "attention"]),
    "checkpoint": st.just(str(checkpoint_dir() / "synthetic-d32")),
}


@st.composite
def attempts(draw):
    family = draw(st.sampled_from(FAMILIES))
    name = draw(st.sampled_from(METHODS) if draw(st.integers(0, 9)) else st.sampled_from(MISSPELT))
    names = _parameter_names(name)
    kwargs = {}
    if name in METHODS and method_class(name).needs_budget and draw(st.integers(0, 9)):
        kwargs["keep" if draw(st.booleans()) else "ratio"] = None  # filled below
    for key in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        kwargs[key] = None
    if not draw(st.integers(0, 9)):
        kwargs[draw(st.sampled_from(["kep", "layr", "ratios", "layout", "x"]))] = None
    for key in kwargs:
        valid = PLAUSIBLE.get(key)
        kwargs[key] = draw(valid if valid is not None and draw(st.integers(0, 7)) else GARBAGE)
    return family, name, kwargs


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(attempts())
def test_any_arguments_give_a_correct_run_or_a_library_error(attempt):
    family, name, kwargs = attempt
    model, inputs, plain, _ = model_of(family)
    try:
        handle = vtprune.apply(model, name, **kwargs)
    except VTPruneError as err:
        event(f"apply refused: {type(err).__name__}")
        assert_untouched(family)
        return
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    except BudgetError:
        event("forward refused: BudgetError")  # a budget that this image cannot meet (e.g. keep above its token count): known only now
    except VTPruneError as err:
        # input-dependent refusals (a method that finds nothing to rate, a missing checkpoint)
        event(f"forward refused: {type(err).__name__}")
        assert str(err)
    else:
        event("ran")
        stats = handle.last
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        entering = sum(im.after_pre_llm + im.registers + im.newlines for im in stats.images)
        assert logits.shape[:2] == (1, inputs["input_ids"].shape[1] - visual + entering - _dropped_in_llm(stats))
        assert torch.isfinite(logits).all()
    finally:
        handle.remove()
    assert_untouched(family)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


def _dropped_in_llm(stats) -> int:
    """Visual tokens dropped inside the LLM (the prefill's logits cover the final layout)."""
    if not stats.llm_stages:
        return 0
    return sum(im.after_pre_llm for im in stats.images) - sum(
        stages[max(stages)] for stages in stats.llm_stages.values())
