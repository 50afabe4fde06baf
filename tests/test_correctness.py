"""Correctness under every input: multi-stage in-LLM positions, per-call state after errors, hooks,
batch invariance, mixed image / text-only batches, optional processor fields, dispatched models."""
import pytest
import torch

import vtprune
from vtprune.errors import InputError, VTPruneError
from vtprune.methods import Method, Selection, Stage, available_methods, method_class
from vtprune.ocvtp import checkpoint_dir
from vtprune.models.families import get as get_family
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model
from reference import capture_language_model_inputs, reference_logits
from tiny_models import model_of, size_of


def sample(family, k=0, seed=0):
    before, after = ([1, 7, 8], [9, 10, 11, 12]) if k == 0 else ([1, 7], [9, 13, 14, 15, 16, 17])
    return Sample(before, after, seed, size_of(family, k))


def greedy(model, inputs, n=6):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[0, 1, 2, 3, 4, 5, 6])
    return out.sequences, torch.stack(out.logits, 1)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def text_only(model, n=100):
    ids = torch.arange(7, 7 + n).remainder(50).add(7).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


MULTI_STAGE = {
    "pyramiddrop": dict(keep=4, layers=(1, 2, 3)),
    "sparsevlm": dict(keep=4, layers=(1, 2, 3), recycle=False),
}


# -- 1. multi-stage in-LLM pruning: original or contiguous positions at every stage ---------------
POSITIONS = [(f, "original") for f in FAMILIES] + [(f, "contiguous") for f in FAMILIES if f.startswith("llava")]


@pytest.mark.parametrize("family,positions", POSITIONS)
@pytest.mark.parametrize("name", sorted(MULTI_STAGE))
def test_multi_stage_llm_pruning_equals_a_masked_full_recompute(family, positions, name):
    """Every stage keeps its columns at their original positions (or renumbers them without gaps):
    the pruned prefill and the cached decoding equal a layer-by-layer recompute on exactly the
    columns each stage kept."""
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    with vtprune.pruned(model, name, positions=positions, **MULTI_STAGE[name]) as handle:
        seq, logits = greedy(model, inputs)
    stats = handle.stats[0]
    stages = {layer: cols[0] for layer, cols in stats.stage_columns.items()}
    assert len(stages) == 3 and len(stages[1]) > len(stages[3])  # three real stages, each dropping tokens
    full = dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = (seq == model.config.image_token_id).int()
    captured = capture_language_model_inputs(model, **full)
    image_columns = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten().tolist()
    prompt_len = inputs["input_ids"].shape[1]
    ref, cols = reference_logits(model, captured, stats.entering_columns[0], None, image_columns, prompt_len,
                                 None, stages=stages, positions_mode=positions)
    steps = [cols.index(prompt_len - 1 + t) for t in range(logits.shape[1])]
    assert (ref[steps] - logits[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("family,positions", POSITIONS)
@pytest.mark.parametrize("name", sorted(MULTI_STAGE))
def test_multi_stage_batch_equals_each_sample_alone(family, positions, name):
    model = model_of(family)
    samples = [sample(family, 0, seed=0), sample(family, 1, seed=4)]
    with vtprune.pruned(model, name, positions=positions, **MULTI_STAGE[name]):
        seq_b, logits_b = greedy(model, make_inputs(model, samples))
        for i, s in enumerate(samples):
            seq_a, logits_a = greedy(model, make_inputs(model, [s]))
            assert torch.equal(seq_b[i, -6:], seq_a[0, -6:])
            assert (logits_b[i] - logits_a[0]).abs().max() <= 1e-4


# -- 2. no state survives an exception -------------------------------------------------------------
class FailsOnce(Method):
    """Raises ``error`` on its first selection, then keeps the first half of the tokens."""

    name = "test_fails_once"

    def __init__(self, stage, error):
        super().__init__()
        self.stages = (Stage(stage),)
        self.llm_layers = (1, 2) if stage == "llm" else ()
        self.error, self.calls = error, 0

    def _select(self, n):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return Selection(keep=torch.arange(max(1, n // 2)))

    def select_vision(self, ctx):
        return self._select(ctx.num_tokens)

    def select_llm(self, ctx):
        return self._select(len(ctx.visual))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["vision", "llm"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_an_error_inside_a_method_leaves_model_and_handle_working(family, stage, error):
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    plain_text = text_only(model)
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-capturing hooks on a first run; they stay
    hooks_before = hook_count(model)
    method = FailsOnce(stage, error)
    with vtprune.pruned(model, method) as handle:
        hooks_applied = hook_count(model)
        with pytest.raises(type(error)), torch.no_grad():
            model(**inputs)
        assert handle._installation._call is None
        assert hook_count(model) == hooks_applied
        # text-only calls through the still-active handle are the plain model's, shape included
        assert torch.equal(text_only(model), plain_text)
        with torch.no_grad():
            first = model(**inputs).logits
            second = model(**inputs).logits
        assert torch.equal(first, second) and len(handle.stats) == 2
    assert hook_count(model) == hooks_before
    assert not any(hasattr(m, "_vtprune_capture") for m in model.modules())
    assert torch.equal(text_only(model), plain_text)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
@pytest.mark.parametrize("name,kwargs", [("occamtoken", dict(neurons=[(99, 0)]))])
def test_a_method_failing_to_patch_the_tower_leaves_no_hook(family, name, kwargs):
    # (OC-VTP without a checkpoint fails earlier, in apply(): tests/test_binding.py)
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-capturing hooks on a first run; they stay
    hooks_before = hook_count(model)
    with vtprune.pruned(model, name, **kwargs):
        hooks_applied = hook_count(model)
        for _ in range(2):
            with pytest.raises(VTPruneError), torch.no_grad():
                model(**inputs)
            assert hook_count(model) == hooks_applied
    assert hook_count(model) == hooks_before


# -- 4. a sample's selection never depends on its batch ----------------------------------------------
def _run_args(name, family):
    """Arguments for a budgeted run of ``name`` on the tiny ``family`` model."""
    cls = method_class(name)
    kwargs = {"keep": 4}
    if name in ("pyramiddrop", "sparsevlm"):
        kwargs["layers"] = (1, 2, 3)
    if name == "sparsevlm":
        kwargs["recycle"] = False
    if name == "visionzip":
        kwargs["keep"] = 8  # its budget holds one [CLS] per crop (five on the tiny LLaVA-NeXT), then patches
    if name == "occamtoken":
        kwargs = {"keep": 4, "layer": 1}
    if name == "ocvtp":
        kwargs["checkpoint"] = checkpoint_dir() / "synthetic-d32"  # shipped: the tiny models' 32-d towers
    layout = (get_family(family).full_grid_layout if cls.needs_full_grid else None) or "model"
    return dict(kwargs, layout=layout)


#: every (family, method) pair the method supports (refusals are tested in test_methods_e2e); keep_all
#: has no budget and is tested against the plain model in test_core
SUPPORTED = [(family, name) for name in available_methods() if not name.startswith("test_") and name != "keep_all"
             for family in FAMILIES if family not in method_class(name).unsupported]


@pytest.mark.parametrize("family,name", SUPPORTED)
def test_every_method_selects_the_same_tokens_batched_and_alone(family, name):
    """generate() numbers a left-padded sample's positions from its first real token, so a sample's
    tokens, positions and selection must not depend on what else is in the batch."""
    args = _run_args(name, family)
    model = model_of(family)
    samples = [sample(family, 0, seed=0), sample(family, 1, seed=4)]
    with vtprune.pruned(model, name, **args) as handle:
        seq_b, logits_b = greedy(model, make_inputs(model, samples), n=2)
        kept_b = [im.kept_cells for im in handle.last.images]
        stages_b = handle.last.llm_stages
        for i, s in enumerate(samples):
            seq_a, logits_a = greedy(model, make_inputs(model, [s]), n=2)
            assert handle.last.images[0].kept_cells == kept_b[i], f"{name} kept other tokens in a batch"
            assert handle.last.llm_stages.get(0) == stages_b.get(i)
            assert torch.equal(seq_b[i, -2:], seq_a[0, -2:])
            assert (logits_b[i] - logits_a[0]).abs().max() <= 1e-4


# -- 5. mixed batches: an image sample and a text-only sample ---------------------------------------
def _mixed_inputs(model, family):
    """Sample 0 with an image, sample 1 text only (left-padded to the same length)."""
    image = make_inputs(model, [sample(family)])
    ids = image["input_ids"]
    text = torch.tensor([1, 7, 8, 9, 10, 11, 12, 13])
    row = torch.zeros_like(ids[0])
    row[-len(text):] = text
    mask = torch.zeros_like(image["attention_mask"][0])
    mask[-len(text):] = 1
    mixed = dict(image, input_ids=torch.stack([ids[0], row]), attention_mask=torch.cat([image["attention_mask"],
                                                                                      mask[None]]))
    if "mm_token_type_ids" in mixed:
        mixed["mm_token_type_ids"] = (mixed["input_ids"] == model.config.image_token_id).int()
    if "image_sizes" in mixed:
        mixed["image_sizes"] = image["image_sizes"]
    alone_text = {"input_ids": text[None], "attention_mask": torch.ones(1, len(text), dtype=torch.long)}
    return mixed, image, alone_text


@pytest.mark.parametrize("family,name", SUPPORTED)
def test_mixed_image_and_text_only_batch_equals_each_alone(family, name):
    args = _run_args(name, family)
    model = model_of(family)
    mixed, image, text = _mixed_inputs(model, family)
    with vtprune.pruned(model, name, **args) as handle:
        with torch.no_grad():
            both = model(**mixed).logits
            alone_image = model(**image).logits
        with torch.no_grad():
            alone_text = model(**text).logits
    assert (both[0, -alone_image.shape[1]:] - alone_image[0]).abs().max() <= 1e-4
    assert (both[1, -alone_text.shape[1]:] - alone_text[0]).abs().max() <= 1e-4


# -- 6. keep_all equals the plain model on every input the plain model accepts -----------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["vision", "llm"])
def test_keep_all_without_an_attention_mask_equals_the_plain_model(family, stage):
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    del inputs["attention_mask"]
    with torch.no_grad():
        plain = model(**inputs).logits
        with vtprune.pruned(model, "keep_all", stage=stage, layer=2):
            kept = model(**inputs).logits
    assert (plain - kept).abs().max() <= 1e-5


#: two image sizes a family lays out differently: LLaVA-NeXT 1×2 and 2×1 crops (same crop count), Qwen2.5-VL
#: grids whose window orders differ
SIZES_IN_TURN = {"llava_next": [(28, 56), (56, 28)], "qwen2_5_vl": [(112, 112), (84, 140)],
                 "qwen3_vl": [(112, 112), (84, 140)]}


@pytest.mark.parametrize("family", sorted(SIZES_IN_TURN))
def test_one_apply_serves_images_of_every_size_in_turn(family):
    """What an adapter keeps from call to call per image size (LLaVA-NeXT's unit layout, Qwen's window
    order) must never serve an image of another size: one apply() on images of sizes a, b, a selects and
    computes what a fresh apply() does on each."""
    model = model_of(family)
    a, b = (make_inputs(model, [Sample([1, 7, 8], [9, 10, 11, 12], 0, size)]) for size in SIZES_IN_TURN[family])

    def run(handle, x):
        with torch.no_grad():
            return model(**x).logits, handle.last.kept_columns

    fresh = []
    for x in (a, b):
        with vtprune.pruned(model, "cls_topk", keep=6) as handle:
            fresh.append(run(handle, x))
    with vtprune.pruned(model, "cls_topk", keep=6) as handle:
        in_turn = [run(handle, x) for x in (a, b, a)]
    for (logits, kept), (want_logits, want_kept) in zip(in_turn, fresh + fresh[:1]):
        assert kept == want_kept and (logits - want_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_inputs_without_mm_token_type_ids_are_refused_before_running(family):
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    with torch.no_grad():
        model(**inputs)
    del inputs["mm_token_type_ids"]
    hooks = hook_count(model)
    with vtprune.pruned(model, "keep_all", stage="vision") as handle:
        with pytest.raises(InputError, match="mm_token_type_ids"), torch.no_grad():
            model(**inputs)
        assert handle.stats == [] and hook_count(model) == hooks


# -- 10. remove() restores a forward set on the instance; dispatched models prune ------------------
def test_remove_restores_an_instance_forward():
    model = tiny_model("llava")
    marker = model.forward  # a bound method stored on the instance, as accelerate's hooks do
    model.forward = marker
    with vtprune.pruned(model, "fastv", keep=4):
        assert model.__dict__["forward"] is not marker
    assert model.__dict__["forward"] is marker


def test_pruning_a_model_with_an_offloaded_decoder(tmp_path):
    import accelerate
    plain = tiny_model("llava")
    dispatched = tiny_model("llava")
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model": "disk", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(dispatched, device_map=device_map, offload_dir=str(tmp_path))
    assert "forward" in dispatched.__dict__
    hook_forward = dispatched.__dict__["forward"]
    inputs = make_inputs(plain, [sample("llava")])
    results = []
    for model in (plain, dispatched):
        with vtprune.pruned(model, "pyramiddrop", keep=4, layers=(1, 2, 3)) as handle:
            seq, logits = greedy(model, inputs)
            results.append((seq, logits, handle.last.kept_columns))
    assert torch.equal(results[0][0], results[1][0]) and results[0][2] == results[1][2]
    assert (results[0][1] - results[1][1]).abs().max() <= 1e-5
    assert dispatched.__dict__["forward"] is hook_forward


def test_flat_layout_decoding_continues_the_rewritten_prompt():
    """LLaVA-NeXT layout='flat' lays an image out with another token count than the processor's
    placeholders: cached decoding must continue from the rewritten prompt, i.e. equal one prefill of
    the prompt plus the generated tokens."""
    model = model_of("llava_next")
    inputs = make_inputs(model, [sample("llava_next", 1, seed=4)])
    n = 4
    with vtprune.pruned(model, "keep_all", stage="vision", layout="flat") as handle:
        seq, step_logits = greedy(model, inputs, n=n)
        rewritten = handle.last.images[0].after_pre_llm
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert rewritten != placeholders  # the layout really changed the token count
        with torch.no_grad():
            full = model(**dict(inputs, input_ids=seq, attention_mask=torch.ones_like(seq))).logits
    assert (full[0, -(n + 1):-1] - step_logits[0]).abs().max() <= 1e-4


# -- 9. no deprecation warning from vtprune's own calls into transformers ---------------------------
@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_pruned_generate_uses_no_deprecated_transformers_argument(family, monkeypatch):
    import warnings

    import transformers.utils.generic as generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(msg))
    model = model_of(family)
    inputs = make_inputs(model, [sample(family)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with vtprune.pruned(model, "pyramiddrop", keep=4, layers=(1, 2)):
            greedy(model, inputs, n=2)
            with torch.no_grad():
                model(**inputs, use_cache=False)
    assert not [m for m in logged if "deprecated" in m]
