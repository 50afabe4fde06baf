"""The ImageContext the vLLM variant builds equals the HF adapter's, provider by provider.

Both paths call ``vtprune.models.stages.clip_context``; what can still drift apart is how each reads its
tower (transformers' hidden states and attention recorders on the HF path, ``ClipTowerRun`` over vLLM's
own CLIP tower) and how the variant describes the tower (``vtprune_setup``: feature layer, patches). Here
vLLM's CLIP tower is built alone (no engine) with the tiny LLaVA's weights, both paths read the same
pixels, and every provider a method may ask for is compared: one crop as for LLaVA-1.5, two crops with
unpadded patch columns as for LLaVA-NeXT, and with OccamToken's test-time register; and the same on
vLLM's SigLIP tower with the tiny LLaVA-OneVision's weights (no [CLS]).
"""
from __future__ import annotations

import pytest
import torch

from vtprune.methods.base import Stage

#: blocks whose attention maps are compared (vLLM builds the tiny tower up to block 1, the feature layer)
WATCHED = (0, 1)
ATOL = 1e-4  # vLLM's CPU linear layers against torch's


class WatchAll:
    """A vision-stage method that only asks for the attention of the blocks in WATCHED."""

    name = "watch_all"
    stages = (Stage.VISION,)
    attention_layers = WATCHED
    extra_tokens = 0
    forwards_cls = False

    def vision_tower_patch(self, adapter):
        return None


@pytest.fixture(scope="module")
def vllm_config():
    """vLLM's config and a one-rank process group, for building towers without an engine."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29541")
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def vllm_tower(model):
    """vLLM's vision tower for ``model``'s config (built up to the feature layer), with its weights."""
    from vllm.model_executor.models.llava import init_vision_tower_for_llava

    tower = init_vision_tower_for_llava(model.config, None, require_post_norm=False)
    hf_weights = model.model.vision_tower.state_dict().items()
    tower.vision_model.load_weights((k.removeprefix("vision_model."), v) for k, v in hf_weights)
    for module in tower.modules():  # what vLLM's loader does after loading (CPU GEMM dispatch)
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return tower.eval()


def variant_side(mixin, model, tower, family: str):
    """The vtprune side of a vLLM variant (``mixin``) on ``model``'s config and vLLM's ``tower``."""

    class Variant(mixin):
        def __init__(self):
            self.config = model.config
            self.multi_modal_projector = model.model.multi_modal_projector
            self.vision_tower = tower
            self.vtprune_setup(family)

    return Variant()


@pytest.fixture(scope="module")
def paths(vllm_config):
    """(the HF model, its adapter, vLLM's CLIP tower with the same weights, the vLLM variant's vtprune side)."""
    from vtprune.models.llava import LlavaAdapter
    from vtprune.serving.vllm_llava import ClipLlavaPruneMixin
    from vtprune.tiny import tiny_model

    model = tiny_model("llava").eval()
    tower = vllm_tower(model)
    return model, LlavaAdapter(model), tower, variant_side(ClipLlavaPruneMixin, model, tower, "llava")


@pytest.fixture(scope="module")
def siglip_paths(vllm_config):
    """The same for the tiny LLaVA-OneVision: vLLM's SigLIP tower, the OneVision variant's vtprune side."""
    from vtprune.models.llava_onevision import LlavaOnevisionAdapter
    from vtprune.serving.vllm_llava_onevision import SiglipOnevisionPruneMixin
    from vtprune.tiny import tiny_model

    model = tiny_model("llava_onevision").eval()
    tower = vllm_tower(model)
    side = variant_side(SiglipOnevisionPruneMixin, model, tower, "llava_onevision")
    return model, LlavaOnevisionAdapter(model), tower, side


def pixels(count: int) -> torch.Tensor:
    side = 56  # the tiny LLaVA's and LLaVA-OneVision's image size
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(count))


def assert_same_context(hf, vllm, hidden_layers, attention_layers, registers: bool, cls: bool = True):
    assert vllm.grids == hf.grids and vllm.crop_slices == hf.crop_slices and vllm.extra == hf.extra
    assert ("cls_attention" in vllm.capabilities) == ("cls_attention" in hf.capabilities) == cls
    provided = {
        "features": lambda c: c.features,
        **({"cls_attention": lambda c: c.cls_attention} if cls else {}),
        "received_attention": lambda c: c.received_attention,
        "keys": lambda c: c.keys,
        "cls_features": lambda c: c.cls_features,
        "register_features": lambda c: c.register_features,
        **{f"hidden({i})": (lambda c, i=i: c.hidden(i)) for i in hidden_layers},
        **{f"vision_attention({i})": (lambda c, i=i: c.vision_attention(i)) for i in attention_layers},
    }
    if registers:
        provided["register_received_attention"] = lambda c: c.register_received_attention
    for name, read in provided.items():
        want, got = read(hf), read(vllm)
        assert got.shape == want.shape, f"{name}: vLLM {tuple(got.shape)} != HF {tuple(want.shape)}"
        assert torch.allclose(got, want, atol=ATOL), f"{name}: vLLM differs from HF by {(got - want).abs().max()}"


@torch.no_grad()
def test_one_crop_context_equals_hf(paths):
    from vtprune.serving.vllm_plugin import ClipTowerRun

    model, adapter, tower, variant = paths
    x = pixels(2)
    hf_run = adapter.run_tower(x, WatchAll())
    run = ClipTowerRun(tower, x, set(WATCHED))
    for image in range(2):
        hf = adapter.crop_context(hf_run, [image], 0, 0, [(4, 4)])
        assert_same_context(hf, variant.vtprune_context(run, [image]), hidden_layers=(0, 1, -2),
                            attention_layers=WATCHED + (-2,), registers=False)


@torch.no_grad()
def test_crops_with_unpadded_columns_equal_hf(paths):
    from vtprune.serving.vllm_plugin import ClipTowerRun

    model, adapter, tower, variant = paths
    x = pixels(3)
    cols = [torch.arange(16), torch.tensor([0, 1, 4, 5, 8, 9]), torch.tensor([3, 7, 11, 15])]
    hf = adapter.crop_context(adapter.run_tower(x, WatchAll()), [0, 1, 2], 0, 0, [(4, 4)] * 3, keep_cols=cols)
    vllm = variant.vtprune_context(ClipTowerRun(tower, x, set(WATCHED)), [0, 1, 2], cols)
    assert_same_context(hf, vllm, hidden_layers=(0, 1), attention_layers=WATCHED, registers=False)


@torch.no_grad()
def test_register_context_and_selection_equal_hf(paths):
    """OccamToken's stage I: the register appended (and MLP channels redirected onto it) by each path."""
    from vtprune.methods import make_method
    from vtprune.models.stages import append_extras, select_and_project
    from vtprune.serving.vllm_plugin import ClipTowerRun, register_of

    model, adapter, tower, variant = paths
    method = make_method("occamtoken", stage2=False, keep=6, neurons=[[0, 3], [0, 17], [1, 5]]).bind("llava", 4)
    method.load_resources(adapter)
    x = pixels(2)
    hf_run = adapter.run_tower(x, method)
    run = ClipTowerRun(tower, x, {variant.vtprune_shape.feature_block}, register_of(method, None))
    for image in range(2):
        hf = adapter.crop_context(hf_run, [image], 0, 1, [(4, 4)])
        vllm = variant.vtprune_context(run, [image])
        assert_same_context(hf, vllm, hidden_layers=(0, 1), attention_layers=(), registers=True)
        keep, embeds, _ = select_and_project(hf, method, adapter.project)
        ctx, got_keep, got_embeds = variant.vtprune_select(method, run, [image])
        assert torch.equal(got_keep, keep)
        want = append_extras(embeds, hf, method, adapter.project)
        assert torch.allclose(append_extras(got_embeds, ctx, method, variant.multi_modal_projector), want, atol=ATOL)


@torch.no_grad()
def test_siglip_crops_context_equals_hf(siglip_paths):
    from vtprune.serving.vllm_plugin import ClipTowerRun

    model, adapter, tower, variant = siglip_paths
    x = pixels(3)
    cols = [torch.arange(16), torch.tensor([0, 1, 4, 5, 8, 9]), torch.tensor([3, 7, 11, 15])]
    hf = adapter.crop_context(adapter.run_tower(x, WatchAll()), [0, 1, 2], 0, 0, [(4, 4)] * 3, keep_cols=cols)
    run = ClipTowerRun(tower, x, set(WATCHED) | {variant.vtprune_shape.feature_block})  # the last block
    vllm = variant.vtprune_context(run, [0, 1, 2], cols)
    assert_same_context(hf, vllm, hidden_layers=(0, 1, -1), attention_layers=WATCHED + (-1,), registers=False,
                        cls=False)


@torch.no_grad()
def test_siglip_register_context_and_selection_equal_hf(siglip_paths):
    """OccamToken's stage I on SigLIP: the register after the position embeddings, channels redirected."""
    from vtprune.methods import make_method
    from vtprune.models.stages import append_extras, select_and_project
    from vtprune.serving.vllm_plugin import ClipTowerRun, register_of

    model, adapter, tower, variant = siglip_paths
    method = make_method("occamtoken", stage2=False, keep=6, neurons=[[0, 3], [0, 17], [1, 5], [2, 9]])
    method = method.bind("llava_onevision", 4)
    method.load_resources(adapter)
    x = pixels(2)
    hf_run = adapter.run_tower(x, method)
    run = ClipTowerRun(tower, x, {variant.vtprune_shape.feature_block}, register_of(method, None))
    hf = adapter.crop_context(hf_run, [0, 1], 0, 1, [(4, 4)] * 2)
    vllm = variant.vtprune_context(run, [0, 1])
    assert_same_context(hf, vllm, hidden_layers=(0, 1, 2), attention_layers=(), registers=True, cls=False)
    keep, embeds, _ = select_and_project(hf, method, adapter.project)
    ctx, got_keep, got_embeds = variant.vtprune_select(method, run, [0, 1])
    assert torch.equal(got_keep, keep)
    want = append_extras(embeds, hf, method, adapter.project)
    assert torch.allclose(append_extras(got_embeds, ctx, method, variant.multi_modal_projector), want, atol=ATOL)
