"""Methods as configuration + binding: apply() runs a copy bound to the model (family defaults resolved,
resources loaded); the configured method is never changed, so it can be applied to several models."""
import copy
import inspect
import warnings

import pytest
import torch

import vtprune
from vtprune.errors import UnboundMethodError, UnsupportedMethodError
from vtprune.matrix import stage_names, support_matrix
from vtprune.methods import Stage, available_methods, make_method, method_class
from vtprune.methods.occamtoken import DEFAULT_LAMBDA1, OccamToken
from vtprune.ocvtp import checkpoint_dir
from vtprune.occamtoken.neurons import RegisterNeurons
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

NO_NEURONS = RegisterNeurons([], None, -1, "", [], "test: none", {}, {})
SYNTHETIC = checkpoint_dir() / "synthetic-d32"  # shipped: 32-d towers (the tiny models)
_MODELS = {}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def inputs_for(family):
    size = (112, 112) if family.startswith("qwen") else (56, 56)
    return make_inputs(model_of(family), [Sample([1, 7, 8], [9, 10, 11, 12], 0, size)])


def snapshot(method) -> dict:
    return copy.deepcopy(vars(method))


def test_one_configured_occamtoken_keeps_each_familys_lambda1():
    """Applied to LLaVA-1.5, then (still applied there) to LLaVA-NeXT: each model runs with its own
    family's λ1; the LLaVA-1.5 model keeps exactly what a method configured with LLaVA-1.5's λ1 keeps."""
    llava, nxt = model_of("llava"), model_of("llava_next")
    configured = OccamToken(neurons=NO_NEURONS)
    first = vtprune.apply(llava, configured)
    try:
        second = vtprune.apply(nxt, configured)
        second.remove()
        with torch.no_grad():
            llava(**inputs_for("llava"))
    finally:
        first.remove()
    assert DEFAULT_LAMBDA1["llava"] != DEFAULT_LAMBDA1["llava_next"]
    assert first.method.lambda1 == DEFAULT_LAMBDA1["llava"]
    assert second.method.lambda1 == DEFAULT_LAMBDA1["llava_next"]
    assert configured.lambda1 is None and first.configured is configured
    assert f"λ1={DEFAULT_LAMBDA1['llava']}" in first.last.method
    explicit = OccamToken(neurons=NO_NEURONS, lambda1=DEFAULT_LAMBDA1["llava"])
    with vtprune.pruned(llava, explicit) as handle, torch.no_grad():
        llava(**inputs_for("llava"))
    assert handle.last.kept_columns == first.last.kept_columns


CONFIGURED = [  # (method, arguments, family): each changes some state of the method it runs
    ("occamtoken", {"neurons": NO_NEURONS}, "llava_next"),  # λ1, layer, llm_layers, the loaded neurons
    ("pooling", {"keep": 6}, "qwen2_5_vl"),  # stages
    ("hiprune", {"keep": 6}, "llava"),  # object_layer from the tower's depth (check_model)
    ("cdpruner", {"keep": 6}, "llava"),  # the warning flag
    ("ocvtp", {"keep": 3, "checkpoint": SYNTHETIC}, "llava"),  # the tower identity, the resolved checkpoint
    ("fastv", {"keep": 6}, "qwen2_5_vl"),
]


@pytest.mark.parametrize("name,kwargs,family", CONFIGURED, ids=[c[0] for c in CONFIGURED])
def test_the_configured_method_is_unchanged_by_apply_a_forward_and_remove(name, kwargs, family):
    configured = make_method(name, **kwargs)
    before = snapshot(configured)
    model = model_of(family)
    with vtprune.pruned(model, configured) as handle, torch.no_grad():
        model(**inputs_for(family))
    assert handle.method is not configured and handle.configured is configured
    assert handle.last.images[0].after_pre_llm > 0
    assert snapshot(configured) == before


def _default(cls):
    """The method with its defaults and, if it takes one, a budget."""
    takes_budget = "ratio" in inspect.signature(cls.__init__).parameters
    return cls(ratio=0.5) if takes_budget else cls()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stages_the_matrix_reports_are_the_bound_methods(family):
    """For every method with its defaults: the stages bound to ``family`` are ``stages_for(family)``, the
    value the support matrix shows for that family (a method whose stage is an argument shows
    "configurable")."""
    rows = {row["method"]: row for row in support_matrix()}
    for name in available_methods():
        if name.startswith("test_"):
            continue
        cls = method_class(name)
        if not cls.stages_for(family):  # the stage is an argument (keep_all)
            assert rows[name]["stage"] == "configurable"
            continue
        try:
            bound = _default(cls).bind(family, 32)
        except UnsupportedMethodError:
            assert rows[name][family].startswith("no: ")
            continue
        assert bound.stages == cls.stages_for(family), name
        assert stage_names(bound.stages) in rows[name]["stage"], name


@pytest.mark.parametrize("family,stage", [("llava", Stage.VISION), ("qwen2_5_vl", Stage.PROJECTED)])
def test_pooling_runs_at_the_stage_the_matrix_reports(family, stage):
    assert support_matrix()[[r["method"] for r in support_matrix()].index("pooling")]["stage"] \
        == "vision; projected on Qwen2.5-VL, Qwen3-VL"
    assert method_class("pooling").stages_for(family) == (stage,)
    model = model_of(family)
    ran = []
    with vtprune.pruned(model, "pooling", keep=4) as handle, torch.no_grad():
        bound = handle.method
        for hook, hook_stage in (("select_vision", Stage.VISION), ("select_projected", Stage.PROJECTED)):
            inner = getattr(bound, hook)
            setattr(bound, hook, lambda ctx, inner=inner, s=hook_stage: ran.append(s) or inner(ctx))
        model(**inputs_for(family))
    assert ran == [stage]


def test_a_missing_ocvtp_checkpoint_raises_before_the_model_is_patched():
    from vtprune.ocvtp import CheckpointError

    model = model_of("llava")
    tower_forward = model.model.vision_tower.forward
    with pytest.raises(CheckpointError, match="no checkpoint shipped with vtprune fits"):
        vtprune.apply(model, "ocvtp", keep=4)
    assert "forward" not in vars(model) and getattr(model, "_vtprune_handle", None) is None
    assert model.model.vision_tower.forward == tower_forward


def test_an_unbound_occamtoken_refuses_to_patch_the_tower():
    """The register neurons load in load_resources, never inside the tower patch."""
    from vtprune.models.base import adapter_for

    adapter = adapter_for(model_of("llava"))
    with pytest.raises(UnboundMethodError, match="load_resources"):
        OccamToken(neurons=NO_NEURONS).bind("llava", 4).vision_tower_patch(adapter)
    bound = OccamToken(neurons=NO_NEURONS).bind("llava", 4)
    bound.load_resources(adapter)
    assert bound.loaded_neurons == NO_NEURONS and bound.vision_tower_patch(adapter) is not None
