"""Test-time registers (vtprune.occamtoken) on tiny CLIP towers with hand-rigged register neurons."""
from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vtprune.occamtoken.cli import add_calibrate_registers_arguments, calibrate_registers_cli
from vtprune.occamtoken.diagnostics import cls_attention_probs, effective_attended_tokens, register_diagnostic
from vtprune.occamtoken import intervention  # not test_time_register itself: pytest would collect it as a test
from vtprune.occamtoken.neuron_cache import (cache_path, cached_calibrations, default_cache_dir, latest_calibration,
                                             load_or_calibrate)
from vtprune.occamtoken.neuron_search import auto_outlier_threshold, calibrate_register_neurons, first_outlier_block
from vtprune.occamtoken.neurons import RegisterNeurons
from vtprune.occamtoken.towers import redirect_activations, tower_identity
from vtprune.errors import InputError, UnsupportedModelError

D_TRIGGER, D_SINK = 3, 7  # residual dims: the trigger read by the first neuron, the sink direction
RIGGED = {(0, 5), (1, 17), (1, 40)}
DENSE = (1, 50)  # large on every token: must be removed by the sparsity filter
SINK_POSITIONS = (5, 20)  # token positions (CLS = 0) that become high-norm outliers


def _config(**kw) -> CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=56, patch_size=7, projection_dim=32)
    base.update(kw)
    return CLIPVisionConfig(**base)


def make_tower(rig: bool = True, seed: int = 0, cls_outlier: bool = False, **cfg) -> CLIPVisionModel:
    """A tiny CLIP tower (64 patches). Rigged: tokens 5 and 20 carry a large trigger in their position
    embedding; neuron (0, 5) reads it and writes a huge value into the sink direction; neurons (1, 17)
    and (1, 40) read the sink direction and amplify it -> high-norm outliers at the last layer made by
    exactly those three sparse neurons. Neuron (1, 50) is large everywhere (not sparse)."""
    torch.manual_seed(seed)
    m = CLIPVisionModel(_config(**cfg)).eval()
    if not rig:
        return m
    with torch.no_grad():
        pe = m.embeddings.position_embedding.weight
        for p in SINK_POSITIONS:
            pe[p, D_TRIGGER] += 50.0
        if cls_outlier:
            pe[0, D_TRIGGER] += 50.0

        def rig_neuron(layer, n, read, gain=3.0, bias=-9.0, out=20.0):
            mlp = m.encoder.layers[layer].mlp
            mlp.fc1.weight[n].zero_()
            mlp.fc1.weight[n, read] = gain
            mlp.fc1.bias[n] = bias
            mlp.fc2.weight[:, n].zero_()
            mlp.fc2.weight[D_SINK, n] = out

        rig_neuron(0, 5, D_TRIGGER)
        rig_neuron(1, 17, D_SINK)
        rig_neuron(1, 40, D_SINK)
        dense = m.encoder.layers[DENSE[0]].mlp
        dense.fc1.weight[DENSE[1]].zero_()
        dense.fc1.bias[DENSE[1]] = 10.0
    return m


def images(n_batches=3, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 56, 56, generator=g) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def tower():
    return make_tower()


@pytest.fixture(scope="module")
def neurons(tower):
    """The three rigged neurons: blocks 0..1 by hand (the default stops at block 0, where the outliers
    appear; (1, 17) and (1, 40) only amplify them)."""
    return calibrate_register_neurons(tower, images(), top_k=3, highest_layer=1, progress=False)


# -- calibration ---------------------------------------------------------------------------------
def test_calibration_recovers_rigged_neurons(tower, neurons):
    assert set(neurons.neurons) == RIGGED
    assert neurons.settings["highest_layer"] == 1 and neurons.settings["highest_layer_rule"] == "given"
    assert neurons.found and neurons.message == ""
    assert neurons.detection_layer == 2 and neurons.threshold is not None
    assert 10 < neurons.threshold < 400  # between the normal (~8) and the outlier (~460) norms
    assert neurons.stats["images_with_outliers"] == neurons.stats["num_images"] == 12
    assert neurons.tower == tower_identity(tower)
    assert len(neurons.scores) == 3 and all(s > 5 for s in neurons.scores)
    # by default the search stops at block 0, where (0, 5) makes the outliers appear
    auto = calibrate_register_neurons(tower, images(), top_k=3, progress=False)
    assert auto.settings["highest_layer"] == 0 and auto.settings["highest_layer_rule"] == "first_outlier_block"
    assert auto.neurons[0] == (0, 5) and {layer for layer, _ in auto.neurons} == {0}
    assert len(auto.stats["peak_patch_norms"]) == 3 and auto.stats["peak_patch_norms"][0] > auto.threshold
    # a given threshold finds the same; the dense neuron never appears, even with a generous top_k
    fixed = calibrate_register_neurons(tower, images(), top_k=10, highest_layer=1, outlier_threshold=100.0,
                                         progress=False)
    assert set(fixed.neurons[:3]) == RIGGED
    assert DENSE not in fixed.neurons
    assert fixed.settings["threshold_rule"] == "given"
    # highest_layer restricts the layers
    low = calibrate_register_neurons(tower, images(), top_k=1, highest_layer=0, progress=False)
    assert low.neurons == [(0, 5)]


def test_sparsity_filter_off_admits_dense_neuron(tower):
    rn = calibrate_register_neurons(tower, images(1), top_k=4, highest_layer=1, outlier_threshold=100.0,
                                      sparsity=0.0, progress=False)
    assert DENSE in rn.neurons


def test_cls_is_never_an_outlier():
    plain = calibrate_register_neurons(make_tower(), images(), outlier_threshold=100.0, progress=False)
    with_cls = calibrate_register_neurons(make_tower(cls_outlier=True), images(), outlier_threshold=100.0,
                                            progress=False)
    assert with_cls.stats["outliers_per_image"] == plain.stats["outliers_per_image"]


def test_no_outliers_gives_empty_list_and_register_still_works():
    plain = make_tower(rig=False)
    rn = calibrate_register_neurons(plain, images(1), progress=False)
    assert rn.neurons == [] and not rn.found and "no outlier" in rn.message
    forced = calibrate_register_neurons(plain, images(1), outlier_threshold=1e6, progress=False)
    assert forced.neurons == [] and "no outlier" in forced.message and forced.threshold == 1e6
    x = images(1)[0]
    with intervention.test_time_register(plain, rn):
        out = plain(x)
    assert out.last_hidden_state.shape[1] == 66


def test_auto_threshold_rule():
    g = torch.Generator().manual_seed(0)
    normal = 8 + torch.rand(1000, generator=g)
    assert auto_outlier_threshold(normal) is None  # unimodal: no outliers
    mixed = torch.cat([normal, torch.tensor([300.0, 320.0, 410.0])])
    thr = auto_outlier_threshold(mixed)
    assert thr is not None and 9.0 < thr < 300.0
    too_many = torch.cat([normal, torch.full((400,), 300.0)])  # 28 % "outliers": not rare -> no gap qualifies
    assert auto_outlier_threshold(too_many) is None
    spread = torch.cat([normal, torch.tensor([40.0, 300.0, 2000.0])])  # a widely spread outlier mode
    thr = auto_outlier_threshold(spread)
    assert 9.0 < thr < 40.0  # the lowest wide gap, not the widest one (300 -> 2000)
    tail = torch.exp(torch.randn(5000, generator=g) * 0.3 + 2.0)  # unimodal log-normal: no outliers
    assert auto_outlier_threshold(tail) is None


# -- a planted attention sink: the default search and the register, end to end --------------------
SINK_CAUSES = {(1, 5), (1, 9)}  # block 1: fire on a flat bright patch and write the outlier
SINK_READERS = {(3, 20), (3, 21)}  # block 3: fire on the outlier and amplify it (larger activations)
SINK_PATCH, SINK_SIDE = 7, 56  # 8 x 8 = 64 patches


def make_sink_tower(seed: int = 0) -> CLIPVisionModel:
    """A 6-block CLIP tower (random weights) with a hand-planted outlier and attention sink:

    * the patch embedding writes the mean of channel 0 over the patch into dim ``D_TRIGGER`` (a flat
      bright patch: large, a noise patch: small);
    * the causes, neurons 5 and 9 of block 1, fire on a large trigger and write into dim ``D_SINK``:
      the bright patch leaves block 1 as a high-norm outlier token (norm ~110, the others ~8);
    * the readers, neurons 20 and 21 of block 3, fire on a large ``D_SINK`` (only the outlier) and
      amplify it (norm ~810); their activations are larger than the causes';
    * blocks 2-5: in every head the key reads ``D_SINK`` and the query has a constant bias along it,
      so every token, CLS included, attends to the outlier: the attention sink.
    """
    torch.manual_seed(seed)
    m = CLIPVisionModel(_config(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                image_size=SINK_SIDE, patch_size=SINK_PATCH)).eval()
    with torch.no_grad():
        trigger = m.embeddings.patch_embedding.weight[D_TRIGGER]
        trigger.zero_()
        trigger[0] = 1.5 / SINK_PATCH ** 2

        def plant(layer, n, read, gain, bias, out):
            mlp = m.encoder.layers[layer].mlp
            mlp.fc1.weight[n].zero_()
            mlp.fc1.weight[n, read], mlp.fc1.bias[n] = gain, bias
            mlp.fc2.weight[:, n].zero_()
            mlp.fc2.weight[D_SINK, n] = out

        for layer, n in SINK_CAUSES:
            plant(layer, n, D_TRIGGER, 3.0, -9.0, 10.0)
        for layer, n in SINK_READERS:
            plant(layer, n, D_SINK, 6.0, -30.0, 20.0)
        for block in m.encoder.layers[2:]:
            attn = block.self_attn
            for head in range(attn.num_heads):
                attn.k_proj.weight[head * attn.head_dim, D_SINK] = 1.0
                attn.q_proj.bias[head * attn.head_dim] = 5.0
    return m


def sink_images(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Noise images with one flat bright patch each, at a random cell; and those cells (0-based patches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SINK_SIDE, SINK_SIDE, generator=g)
    side = SINK_SIDE // SINK_PATCH
    cells = torch.randint(0, side * side, (n,), generator=g).tolist()
    for i, cell in enumerate(cells):
        r, c = divmod(cell, side)
        x[i, :, r * SINK_PATCH:(r + 1) * SINK_PATCH, c * SINK_PATCH:(c + 1) * SINK_PATCH] = 3.0
    return x, cells


@pytest.fixture(scope="module")
def sink_tower():
    return make_sink_tower()


@pytest.fixture(scope="module")
def sink_calibration():
    return [sink_images(8, seed)[0] for seed in range(4)]


def _participation(p: torch.Tensor) -> torch.Tensor:
    """1 / Σp² of the head-mean distribution, per image (another effective number of attended tokens)."""
    p = p.float().mean(1)
    p = p / p.sum(-1, keepdim=True)
    return 1.0 / (p ** 2).sum(-1)


def test_planted_sink_tower_is_what_it_claims(sink_tower):
    x, cells = sink_images(4, 100)
    with torch.no_grad():
        hidden = sink_tower(x, output_hidden_states=True).hidden_states
    patches = [h[:, 1:].norm(dim=-1) for h in hidden]  # hidden[b + 1] = output of block b
    assert patches[1].max() < 20  # block 0: no outlier
    assert patches[2].argmax(1).tolist() == cells and patches[2].max(1).values.min() > 50  # block 1 makes it
    cls = cls_attention_probs(sink_tower, x, layer=-2).mean(1)[:, 1:]  # the feature layer, over patches
    assert cls.argmax(1).tolist() == cells and cls.max(1).values.min() > 0.9  # the sink


def test_default_highest_layer_stops_where_the_outliers_appear(sink_tower, sink_calibration):
    rn = calibrate_register_neurons(sink_tower, sink_calibration, progress=False)  # every default
    assert rn.settings["highest_layer"] == 1 and rn.settings["highest_layer_rule"] == "first_outlier_block"
    peaks = rn.stats["peak_patch_norms"]
    assert len(peaks) == 6 and peaks[0] < rn.threshold < peaks[1]
    assert set(rn.neurons[:2]) == SINK_CAUSES
    assert all(layer <= 1 for layer, _ in rn.neurons)  # no reader of the outlier
    # searching every block (the former default), the readers outrank the causes
    every = calibrate_register_neurons(sink_tower, sink_calibration, highest_layer=-1, progress=False)
    assert set(every.neurons[:2]) == SINK_READERS and SINK_CAUSES <= set(every.neurons)
    assert first_outlier_block([8.0, 111.0, 111.0, 810.0], 99.0) == 1
    assert first_outlier_block([8.0, 9.0], 99.0) == 1  # none above: the last block


def test_register_absorbs_the_planted_sink(sink_tower, sink_calibration):
    """OccamToken's sanity number on the planted tower: n_eff of the CLS attention over the patches at
    the feature layer rises once the default-calibrated neurons move the outlier onto the register
    (the paper: 42 -> 281 on LLaVA-1.5's CLIP); the register alone, nothing redirected, changes nothing."""
    x, _ = sink_images(8, 200)
    best_two = calibrate_register_neurons(sink_tower, sink_calibration, top_k=2, progress=False)
    default = calibrate_register_neurons(sink_tower, sink_calibration, progress=False)
    for neurons in (best_two, default):
        d = register_diagnostic(sink_tower, x, neurons, layer=-2)
        assert d["n_eff_without"] < 1.5 and d["n_eff_with"] > 25  # measured 1.07 -> 34.4 of 64 patches
        assert d["register_attention"] > 0.9
    nothing = register_diagnostic(sink_tower, x, [], layer=-2)
    assert nothing["n_eff_with"] < 1.5 and nothing["register_attention"] < 0.01
    # the same with 1 / Σp², computed here from the raw CLS attention rows
    without = cls_attention_probs(sink_tower, x, layer=-2)
    with intervention.test_time_register(sink_tower, best_two):
        with_reg = cls_attention_probs(sink_tower, x, layer=-2)
    assert _participation(without[..., 1:]).max() < 1.5
    assert _participation(with_reg[..., 1:-1]).min() > 10


# -- the intervention ----------------------------------------------------------------------------
def test_redirect_per_channel_by_hand():
    h = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6) * torch.tensor([1.0, -1.0]).view(2, 1, 1)
    h[1, 2, 1] = 99.0
    ch = torch.tensor([1, 4])
    out = redirect_activations(h, ch)
    other = [0, 2, 3, 5]
    assert torch.equal(out[:, :, other], h[:, :, other])
    assert torch.equal(out[:, 0, :], h[:, 0, :])  # CLS untouched
    assert torch.all(out[:, 1:-1][:, :, ch] == 0)
    assert torch.equal(out[:, -1, ch], h[:, 1:-1, ch].amax(1))  # per batch element
    assert out[1, -1, 1] == 99.0
    assert h[1, 2, 1] == 99.0  # input not modified


def test_redirect_signed_max_by_hand():
    h = torch.zeros(2, 5, 4)
    h[0, 0, 1] = -50.0  # CLS holds the largest magnitude (negative): the reference's sign_max sees CLS too
    h[0, 2, 3] = 7.0
    h[1, 3, 1] = 4.0
    h[1, 1, 3] = -3.0
    h[:, :, 0] = 11.0  # an unlisted channel
    ch = torch.tensor([1, 3])
    out = redirect_activations(h, ch, mode="signed_max")
    assert torch.equal(out[0, -1, ch], torch.tensor([-50.0, -50.0]))
    assert torch.equal(out[1, -1, ch], torch.tensor([4.0, 4.0]))
    assert torch.all(out[:, 1:-1][:, :, ch] == 0) and torch.equal(out[:, 0], h[:, 0])
    assert torch.equal(out[..., 0], h[..., 0])
    with pytest.raises(InputError):
        redirect_activations(h, ch, mode="bogus")


def _record(module, store):
    return module.register_forward_pre_hook(lambda mod, args: store.append(args[0].detach().clone()))


@pytest.mark.parametrize("mode", ["per_channel", "signed_max"])
def test_intervention_moves_listed_channels_only(tower, neurons, mode):
    x = images(1)[0]
    by_layer = neurons.by_layer()
    before, after, handles = {}, {}, []
    for layer in by_layer:
        before[layer], after[layer] = [], []
        handles.append(_record(tower.encoder.layers[layer].mlp.fc2, before[layer]))
    try:
        with intervention.test_time_register(tower, neurons, mode=mode):
            for layer in by_layer:  # registered after the redirect hook: sees its result
                handles.append(_record(tower.encoder.layers[layer].mlp.fc2, after[layer]))
            tower(x)
    finally:
        for h in handles:
            h.remove()
    for layer, ch in by_layer.items():
        a, b = before[layer][0], after[layer][0]
        assert a.shape == b.shape == (4, 66, 64)
        rest = [c for c in range(64) if c not in ch]
        assert torch.equal(a[:, :, rest], b[:, :, rest])
        assert torch.equal(a[:, 0], b[:, 0])  # CLS
        assert torch.all(b[:, 1:-1][:, :, ch] == 0)
        if mode == "per_channel":
            assert torch.equal(b[:, -1, ch], a[:, 1:-1, ch].amax(1))
        else:
            flat = a[:, :, ch].flatten(1)
            hi, lo = flat.amax(1), flat.amin(1)
            expected = torch.where(hi.abs() > lo.abs(), hi, lo)
            assert torch.equal(b[:, -1, ch], expected[:, None].expand(-1, len(ch)))


def test_register_absorbs_the_outliers(tower, neurons):
    x = images(1)[0]
    with torch.no_grad():
        plain = tower(x).last_hidden_state.norm(dim=-1)
        with intervention.test_time_register(tower, neurons):
            reg = tower(x).last_hidden_state.norm(dim=-1)
    assert plain[:, list(SINK_POSITIONS)].min() > 100
    assert reg[:, 1:-1].max() < 50  # patches no longer carry the sink ...
    assert reg[:, -1].min() > 100  # ... the register does


def test_intervention_is_per_batch_element(tower, neurons):
    x = images(1)[0][:2]
    with torch.no_grad(), intervention.test_time_register(tower, neurons):
        both = tower(x, output_hidden_states=True)
        alone = [tower(x[i:i + 1], output_hidden_states=True) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(both.last_hidden_state[i], alone[i].last_hidden_state[0], atol=1e-5, rtol=1e-5)
        for hb, ha in zip(both.hidden_states, alone[i].hidden_states):
            torch.testing.assert_close(hb[i], ha[0], atol=1e-5, rtol=1e-5)


def _hook_counts(m):
    return sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())


def test_hooks_removed_on_exit_and_on_error(tower, neurons):
    x = images(1)[0]
    with torch.no_grad():
        ref = tower(x, output_hidden_states=True)
    n_hooks = _hook_counts(tower)
    with intervention.test_time_register(tower, neurons):
        assert _hook_counts(tower) == n_hooks + 1 + len(neurons.by_layer())
    assert _hook_counts(tower) == n_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with intervention.test_time_register(tower, neurons):
            raise RuntimeError("boom")
    assert _hook_counts(tower) == n_hooks
    with torch.no_grad():
        again = tower(x, output_hidden_states=True)
    assert torch.equal(again.last_hidden_state, ref.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(again.hidden_states, ref.hidden_states))


def test_empty_register_changes_patches_only_through_attention():
    m = make_tower(rig=False)
    x = images(1)[0]
    with torch.no_grad():
        ref = m(x, output_hidden_states=True)
        with intervention.test_time_register(m, []):
            out = m(x, output_hidden_states=True)
            s = out.last_hidden_state.shape[1]
            mask = torch.zeros(x.shape[0], 1, s, s)
            mask[..., -1] = torch.finfo(torch.float32).min  # nobody may attend to the register
            blocked = m(x, output_hidden_states=True, attention_mask=mask)
    n = ref.last_hidden_state.shape[1] - 1
    assert out.last_hidden_state.shape[1] == n + 2
    assert all(h.shape[1] == n + 2 for h in out.hidden_states)
    # the register enters as a zero token: after the pre-norm it is the pre-norm's bias
    torch.testing.assert_close(out.hidden_states[0][:, -1], m.pre_layrnorm.bias.expand(x.shape[0], -1))
    assert torch.isfinite(out.last_hidden_state[:, -1]).all()
    # attending to it changes the other tokens; blocking that attention restores them exactly
    assert not torch.allclose(out.last_hidden_state[:, :-1], ref.last_hidden_state, atol=1e-6)
    torch.testing.assert_close(blocked.last_hidden_state[:, :-1], ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_invalid_use_is_reported(tower, neurons):
    n_hooks = _hook_counts(tower)
    with pytest.raises(InputError, match="outside"):
        with intervention.test_time_register(tower, [(7, 1)]):
            pass
    with pytest.raises(InputError, match="MLP width"):
        with intervention.test_time_register(tower, [(0, 640)]):
            pass
    with pytest.raises(InputError, match="mode"):
        with intervention.test_time_register(tower, neurons, mode="max"):
            pass
    with pytest.raises(InputError, match="already active"):
        with intervention.test_time_register(tower, neurons):
            with intervention.test_time_register(tower, neurons):
                pass
    assert _hook_counts(tower) == n_hooks


def test_resolves_tower_inside_a_vlm():
    from vtprune.tiny import tiny_model

    vlm = tiny_model("llava")
    assert tower_identity(vlm) == tower_identity(vlm.model.vision_tower)
    x = torch.randn(1, 3, 56, 56)
    with intervention.test_time_register(vlm, []):
        out = vlm.model.vision_tower(x, output_hidden_states=True)
    assert out.hidden_states[-2].shape[1] == 16 + 2


def _qwen_tower(family):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    from vtprune.tiny import tiny_config

    cls = Qwen3VLVisionModel if family == "qwen3_vl" else Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(0)
    return cls._from_config(tiny_config(family).vision_config).eval()


QWEN_GRIDS = torch.tensor([[1, 4, 4], [1, 4, 8]])  # 16 + 32 patches -> 4 + 8 merged tokens
QWEN_N = [16, 32]


def _qwen_pixels(seed=0):
    return torch.randn(sum(QWEN_N), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def _drop_registers(t, sizes=QWEN_N, k=4):
    return torch.cat([seg[:-k] for seg in t.split([n + k for n in sizes])])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_register_layout(family):
    qt = _qwen_tower(family)
    pv = _qwen_pixels()
    seen = {}

    def grab(key):
        def hook(module, args, kwargs):
            seen[key] = (args[0].clone(), [t.clone() for t in kwargs["position_embeddings"]], kwargs["cu_seqlens"])
        return hook

    h = qt.blocks[0].register_forward_pre_hook(grab("ref"), with_kwargs=True)
    with torch.no_grad():
        ref = qt(pv, grid_thw=QWEN_GRIDS)
    h.remove()
    hs = [qt.blocks[0].register_forward_pre_hook(grab("reg"), with_kwargs=True),
          qt.blocks[1].register_forward_pre_hook(grab("reg_full"), with_kwargs=True)]  # block 1: full attention
    with torch.no_grad(), intervention.test_time_register(qt, []) as copies:
        out = qt(pv, grid_thw=QWEN_GRIDS, output_hidden_states=True)
    for h in hs:
        h.remove()
    assert seen["reg_full"][2].tolist() == [0, 20, 56]
    assert copies == 4
    assert out.last_hidden_state.shape[0] == sum(QWEN_N) + 8
    assert all(hs.shape[0] == sum(QWEN_N) + 8 for hs in out.hidden_states)
    assert out.pooler_output.shape[0] == ref.pooler_output.shape[0] + 2  # one merged register per image
    for feat in getattr(out, "deepstack_features", None) or []:
        assert feat.shape[0] == out.pooler_output.shape[0]
    (x_ref, pe_ref, cu_ref), (x_reg, pe_reg, cu_reg) = seen["ref"], seen["reg"]
    # patch rows enter block 0 exactly as without the register; register rows are zero tokens
    torch.testing.assert_close(_drop_registers(x_reg), x_ref)
    regs = torch.cat([seg[-4:] for seg in x_reg.split([n + 4 for n in QWEN_N])])
    assert torch.all(regs == 0)
    # rotary: patches keep their rotation, the register gets none (cos 1, sin 0)
    cos, sin = pe_reg
    torch.testing.assert_close(_drop_registers(cos), pe_ref[0])
    torch.testing.assert_close(_drop_registers(sin), pe_ref[1])
    assert torch.all(torch.cat([s[-4:] for s in cos.split([n + 4 for n in QWEN_N])]) == 1)
    assert torch.all(torch.cat([s[-4:] for s in sin.split([n + 4 for n in QWEN_N])]) == 0)
    if family == "qwen3_vl":  # full attention: each image's segment grows by its 4 register copies
        assert cu_ref.tolist() == [0, 16, 48] and cu_reg.tolist() == [0, 20, 56]
    else:  # block 0 is windowed: the register group is a window of its own after the image's windows
        assert cu_ref.tolist() == [0, 16, 32, 48] and cu_reg.tolist() == [0, 16, 20, 36, 52, 56]
    # hooks are gone afterwards
    with torch.no_grad():
        again = qt(pv, grid_thw=QWEN_GRIDS)
    assert torch.equal(again.pooler_output, ref.pooler_output)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_register_is_per_image_and_redirects(family):
    qt = _qwen_tower(family)
    pv = _qwen_pixels(1)
    neurons = [(0, 3), (1, 10), (1, 20)]
    before, after = [], []
    h1 = _record(qt.blocks[1].mlp.down_proj if family == "qwen2_5_vl" else qt.blocks[1].mlp.linear_fc2, before)
    with torch.no_grad(), intervention.test_time_register(qt, neurons):
        site = qt.blocks[1].mlp.down_proj if family == "qwen2_5_vl" else qt.blocks[1].mlp.linear_fc2
        h2 = _record(site, after)
        both = qt(pv, grid_thw=QWEN_GRIDS)
        h1.remove(), h2.remove()
        alone = [qt(pv[:16], grid_thw=QWEN_GRIDS[:1]), qt(pv[16:], grid_thw=QWEN_GRIDS[1:])]
    torch.testing.assert_close(both.pooler_output, torch.cat([a.pooler_output for a in alone]), atol=1e-5, rtol=1e-5)
    a, b = before[0], after[0]
    ch = [10, 20]
    rest = [c for c in range(a.shape[1]) if c not in ch]
    assert torch.equal(a[:, rest], b[:, rest])
    start = 0
    for n in QWEN_N:
        seg_a, seg_b = a[start:start + n + 4], b[start:start + n + 4]
        assert torch.all(seg_b[:n][:, ch] == 0)
        assert torch.equal(seg_b[n:][:, ch], seg_a[:n][:, ch].amax(0).expand(4, -1))
        start += n + 4


def test_qwen_tower_calibrates():
    qt = _qwen_tower("qwen3_vl")
    batch = {"pixel_values": _qwen_pixels(), "image_grid_thw": QWEN_GRIDS}
    rn = calibrate_register_neurons(qt, [batch], top_k=4, outlier_threshold=0.0, progress=False)
    assert len(rn.neurons) == 4 and rn.stats["num_images"] == 2
    assert rn.tower.startswith("qwen3_vl_vision-h32-l3")
    with pytest.raises(UnsupportedModelError, match="CLS"):
        cls_attention_probs(qt, batch)


# -- diagnostics ---------------------------------------------------------------------------------
def test_effective_attended_tokens():
    assert effective_attended_tokens(torch.full((10,), 0.1)).item() == pytest.approx(10.0)
    assert effective_attended_tokens(torch.eye(5)[0]).item() == pytest.approx(1.0)
    two_heads = torch.stack([torch.eye(4)[0], torch.eye(4)[1]])  # (H=2, K=4), each head one-hot elsewhere
    assert effective_attended_tokens(two_heads).item() == pytest.approx(2.0)  # head-mean distribution
    assert effective_attended_tokens(two_heads, per_head=True).item() == pytest.approx(1.0)
    batch = torch.stack([two_heads, torch.full((2, 4), 0.25)])
    torch.testing.assert_close(effective_attended_tokens(batch), torch.tensor([2.0, 4.0]))
    # rows are renormalised: a column subset of a distribution is fine
    assert effective_attended_tokens(torch.tensor([0.2, 0.2, 0.6])[:2]).item() == pytest.approx(2.0)


def test_cls_attention_matches_eager_attention(neurons):
    m = make_tower()
    m.set_attn_implementation("eager")
    x = images(1)[0][:2]
    with torch.no_grad():
        eager = m(x, output_attentions=True).attentions
        for layer in (0, -2, -1):
            mine = cls_attention_probs(m, x, layer)
            torch.testing.assert_close(mine, eager[layer][:, :, 0].float(), atol=1e-5, rtol=1e-4)
        with intervention.test_time_register(m, neurons):
            eager_r = m(x, output_attentions=True).attentions
            mine_r = cls_attention_probs(m, x, -2)
    assert mine_r.shape == (2, 4, 66)
    torch.testing.assert_close(mine_r, eager_r[-2][:, :, 0].float(), atol=1e-5, rtol=1e-4)


def test_register_diagnostic(tower, neurons):
    d = register_diagnostic(tower, images(1)[0], neurons, layer=-2)
    assert d["num_patches"] == 64 and len(d["per_image_with"]) == 4
    assert 1.0 <= d["n_eff_without"] <= 64.0 and 1.0 <= d["n_eff_with"] <= 64.0
    assert 0.0 < d["register_attention"] < 1.0


# -- identity, JSON, cache, CLI -------------------------------------------------------------------
def test_identity_is_keyed_to_the_weights(tower):
    ident = tower_identity(tower)
    assert ident.startswith("clip_vision_model-h32-l3-img56-p7-")
    twin = copy.deepcopy(tower)
    assert tower_identity(twin) == ident
    with torch.no_grad():
        twin.encoder.layers[0].mlp.fc1.weight[0, 0] += 1.0
    assert tower_identity(twin) != ident
    with torch.no_grad():
        other = copy.deepcopy(tower)
        other.encoder.layers[2].mlp.fc1.bias[3] += 1.0
    assert tower_identity(other) != ident


def test_json_round_trip(tmp_path, neurons):
    text = neurons.to_json()
    assert json.loads(text)["kind"] == "vtprune.register_neurons"
    assert RegisterNeurons.from_json(text) == neurons
    path = tmp_path / "n.json"
    neurons.to_json(path)
    assert RegisterNeurons.from_json(path) == neurons
    assert RegisterNeurons.from_json(str(path)) == neurons
    empty = RegisterNeurons([], message="none")
    assert RegisterNeurons.from_json(empty.to_json()) == empty
    with pytest.raises(InputError):
        RegisterNeurons.from_json(tmp_path / "missing.json")
    with pytest.raises(InputError):
        RegisterNeurons.from_json("{not json")


def test_cache_load_or_calibrate(tmp_path, monkeypatch, tower, neurons):
    calls = []

    def images_fn():
        calls.append(1)
        return images()

    first = load_or_calibrate(tower, images_fn, cache_dir=tmp_path, top_k=3, highest_layer=1, progress=False)
    second = load_or_calibrate(tower, images_fn, cache_dir=tmp_path, top_k=3, highest_layer=1, progress=False)
    assert len(calls) == 1 and first == second and set(first.neurons) == RIGGED
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(tower_identity(tower))
    # other settings -> another file; changed weights -> another identity -> recalibrated
    load_or_calibrate(tower, images_fn, cache_dir=tmp_path, top_k=2, progress=False)
    assert len(calls) == 2
    changed = copy.deepcopy(tower)
    with torch.no_grad():
        changed.embeddings.patch_embedding.weight.mul_(1.5)
    load_or_calibrate(changed, images_fn, cache_dir=tmp_path, top_k=3, progress=False)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    # the user's own neurons win
    mine = RegisterNeurons([(0, 1)])
    assert load_or_calibrate(tower, images_fn, cache_dir=tmp_path, neurons=mine) is mine
    assert load_or_calibrate(tower, neurons={1: [2, 3]}).neurons == [(1, 2), (1, 3)]
    # the environment variable moves the default cache; nothing cached + no images -> clear error
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "registers"
    with pytest.raises(InputError, match="calibrate"):
        load_or_calibrate(tower)
    load_or_calibrate(tower, images(), top_k=3, progress=False)
    assert len(list((tmp_path / "env" / "registers").glob("*.json"))) == 1


def test_cli_calibrates_a_tower_directory(tmp_path, capsys):
    from PIL import Image
    from transformers import CLIPImageProcessor

    model_dir = tmp_path / "tower"
    make_tower().save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(model_dir)
    img_dir = tmp_path / "imgs" / "sub"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (60 + i, 70, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    parser = add_calibrate_registers_arguments(argparse.ArgumentParser())
    out = tmp_path / "neurons.json"
    args = parser.parse_args(["--model", str(model_dir), "--images", str(tmp_path / "imgs"), "--num-images", "5",
                              "--top-k", "3", "--highest-layer", "1", "--batch-size", "2", "--out", str(out),
                              "--cache-dir", str(tmp_path / "cache"), "--quiet", "--device", "cpu"])
    assert calibrate_registers_cli(args) == 0
    rn = RegisterNeurons.from_json(out)
    assert set(rn.neurons) == RIGGED and rn.stats["num_images"] == 5
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert "register neurons" in capsys.readouterr().out


def test_latest_calibration_any_settings_this_tower_only(tmp_path, tower):
    """OccamToken's cache lookup: the newest calibration of *this* tower whatever its settings; files
    of other towers (newer, or renamed to this tower's name) and unreadable files are never used."""
    import os

    ident = tower_identity(tower)
    assert latest_calibration(tower, tmp_path / "missing") is None
    old = RegisterNeurons([(0, 5)], tower=ident, settings={"top_k": 10})
    new = RegisterNeurons([(1, 17), (0, 5)], tower=ident, settings={"top_k": 2, "highest_layer": 1})
    old_path = cache_path(ident, tmp_path)
    new_path = cache_path(ident, tmp_path, top_k=2, highest_layer=1)
    old.to_json(old_path)
    new.to_json(new_path)
    os.utime(old_path, ns=(10**18, 10**18))
    os.utime(new_path, ns=(2 * 10**18, 2 * 10**18))
    assert latest_calibration(tower, tmp_path) == new
    os.utime(old_path, ns=(3 * 10**18, 3 * 10**18))  # recalibrated with the defaults: that one now
    assert latest_calibration(tower, tmp_path) == old
    # newer files of another tower: one under its own name, one renamed to look like this tower's
    other = copy.deepcopy(tower)
    with torch.no_grad():
        other.embeddings.patch_embedding.weight.mul_(1.5)
    stale = RegisterNeurons([(2, 1)], tower=tower_identity(other))
    stale.to_json(cache_path(other, tmp_path))
    renamed = cache_path(ident, tmp_path, top_k=7)
    stale.to_json(renamed)
    (tmp_path / f"{cache_path(ident, tmp_path, top_k=8).name}").write_text("{not json")
    for path in tmp_path.glob("*.json"):
        if path not in (old_path, new_path):
            os.utime(path, ns=(4 * 10**18, 4 * 10**18))
    assert latest_calibration(tower, tmp_path) == old
    assert [p for p, _ in cached_calibrations(tower, tmp_path)] == [old_path, new_path]
    assert latest_calibration(other, tmp_path) == stale
