"""Plugin logic without an engine: settings, per-image records, front-end refusals, positions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vtprune.serving.vllm_plugin import (Host, ImageSlot, PruneSpec, PrunedPositionsMixin, attach_positions,
                                         image_record, split_positions)

LLAVA = Host("llava", 32, 64, 2, (3, 2))
QWEN = Host("qwen2_5_vl", 32, 64, 2, None)


def config(**kw):
    return SimpleNamespace(**kw)


def test_spec_from_config_and_request():
    spec = PruneSpec.from_config(config(vtprune_method="cls-topk", vtprune_keep=64))
    assert spec == PruneSpec("cls_topk", 64, None, ())
    assert not PruneSpec.from_config(config()).enabled
    assert spec.with_request({}) is spec
    assert spec.with_request({"vtprune_keep": 8}) == PruneSpec("cls_topk", 8, None, ())
    assert spec.with_request({"vtprune_ratio": 0.25}) == PruneSpec("cls_topk", None, 0.25, ())
    assert not spec.with_request({"vtprune_method": "none"}).enabled
    with_args = PruneSpec.from_config(config(vtprune_method="visionzip", vtprune_keep=16,
                                             vtprune_args={"contextual_ratio": 0.25}))
    assert with_args.with_request({"vtprune_keep": 8}).args == {"contextual_ratio": 0.25}
    assert with_args.with_request({"vtprune_method": "random"}).args == {}  # args belong to the server's method
    table = PruneSpec.from_config(config(vtprune_method="random", vtprune_keep=16,
                                         vtprune_args={"visionzip": {"contextual_ratio": 0.25},
                                                       "hiprune": {"object_layer": 1}}))
    assert table.args == {} and table.with_request({"vtprune_method": "hiprune"}).args == {"object_layer": 1}
    assert table.with_request({"vtprune_method": "visionzip"}).build("llava", 2).contextual_ratio == 0.25
    with pytest.raises(ValueError, match="server setting"):
        spec.with_request({"vtprune_args": {"seed": 1}})
    with pytest.raises(ValueError, match="Unknown method"):
        PruneSpec.from_config(config(vtprune_method="cls_topkk", vtprune_keep=4))


def test_record_round_trip():
    server = PruneSpec("random", None, 0.3, (("random", (("seed", 3),)),))
    row = image_record(server, LLAVA, [(8, 8)])
    assert row[3] == round(0.3 * 64) and row[4] == 64
    spec, kept, n = PruneSpec.from_record(row, server)
    assert spec == server and kept == row[3] and n == 64
    off = image_record(PruneSpec(None), LLAVA, [(8, 8)])
    assert PruneSpec.from_record(off, server)[0].enabled is False and off[3] == 64


@pytest.mark.parametrize("method, match", [
    ("fastv", "prunes inside the language model"),
    ("cdpruner", "text embeddings"),
    ("hiprune", "only up to the feature layer"),  # object layer 9 of a 3-block tower wraps past the feature layer
])
def test_front_end_refusals(method, match):
    with pytest.raises(ValueError, match=match):
        image_record(PruneSpec(method, 8), LLAVA, [(8, 8)])


def test_budget_and_family_refusals():
    with pytest.raises(ValueError, match="keep=64 is not below"):
        image_record(PruneSpec("cls_topk", 64), LLAVA, [(8, 8)])
    with pytest.raises(ValueError, match="budget fixed in advance"):
        image_record(PruneSpec("cls_topk"), LLAVA, [(8, 8)])
    with pytest.raises(ValueError, match="visionzip"):
        image_record(PruneSpec("visionzip", 8), QWEN, [(4, 4)])


def test_onevision_front_end_has_no_cls_but_registers():
    """SigLIP: the dry run offers no [CLS] attention (visionzip is refused) but runs OccamToken's stage I,
    one register per crop reaching the LLM."""
    onevision = Host("llava_onevision", 32, 64, 2, (3, 3))
    occam = PruneSpec("occamtoken", 8, None, (("occamtoken", (("stage2", False),)),))
    row = image_record(occam, onevision, [(4, 4)] * 3, fixed_units=5)
    assert row[3] == 8 + 5 + 3 and row[4] == 48
    with pytest.raises(ValueError, match="CLS"):
        image_record(PruneSpec("visionzip", 8), onevision, [(4, 4)])


def test_onevision_records_refuse_down_sampled_crops():
    """The OneVision front end counts newline tokens as fixed units, and refuses (as a request error) an
    image whose crops the model down-samples, pruning on or off."""
    from vtprune.models.llava_onevision import _tiny_config
    from vtprune.serving.vllm_llava_onevision import VTPruneLlavaOnevisionProcessingInfo

    cfg = _tiny_config()  # 56 px crops of 4×4 patches, up to 2×2 crops
    info = VTPruneLlavaOnevisionProcessingInfo.__new__(VTPruneLlavaOnevisionProcessingInfo)  # no vLLM context
    info.get_hf_config = lambda: cfg
    row = info.vtprune_record(PruneSpec("divprune", 8), (112, 112))  # base view + 8×8 unpadded, 8 newlines
    assert row[3] == 8 + 8 and row[4] == 16 + 64
    assert info.vtprune_record(PruneSpec(None), (112, 112))[3] == 16 + 64 + 8
    cfg.vision_aspect_ratio = "anyres_max_1"  # 64 unpadded patches > 1.1² crops of 16: down-sampled
    for spec in (PruneSpec("divprune", 8), PruneSpec(None)):
        with pytest.raises(ValueError, match="down-samples"):
            info.vtprune_record(spec, (112, 112))


def test_position_channels_round_trip_in_bf16():
    embeds = torch.randn(5, 7, dtype=torch.bfloat16)
    rel = torch.tensor([[0, 3, 9], [0, 300, 2], [1, 2, 3], [0, 0, 0], [2899, 2899, 2899]])
    clean, rows, back = split_positions(attach_positions(embeds, rel))
    assert torch.equal(clean, embeds) and torch.equal(rows, torch.arange(5)) and torch.equal(back, rel)


class OneD(PrunedPositionsMixin):
    vtprune_one_d = True
    vtprune_image_token_id = 3

    def vtprune_image_slot(self, f):
        return ImageSlot(f.mm_position.offset, f.mm_position.length, torch.arange(f.n).expand(3, f.n), f.n)


class ThreeD(PrunedPositionsMixin):
    vtprune_image_token_id = 3

    def vtprune_image_slot(self, f):
        rows, cols = f.grid
        idx = torch.arange(rows * cols)
        return ImageSlot(f.mm_position.offset, f.mm_position.length,
                         torch.stack([idx * 0, idx // cols, idx % cols]), max(rows, cols))


def feature(offset, length, **kw):
    return SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=offset, length=length), **kw)


def run_chunks(model, ids, positions, images, chunks):
    """Feed the embeddings' slices chunk by chunk as vLLM's runner does; returns final positions."""
    computed = 0
    delta = None
    for size in chunks:
        lo, hi = computed, computed + size
        slices = []
        for off, emb in images:
            a, b = max(lo - off, 0), min(hi - off, emb.shape[0])
            if a < b:
                slices.append(emb[a:b])
        _, new, delta = model.recompute_mrope_positions(ids, slices, positions, computed)
        positions.copy_(new)
        computed = hi
    return positions, delta


@pytest.mark.parametrize("chunks", [[40], [5, 6, 7, 22], [1] * 40])
def test_one_d_positions_follow_original_layout(chunks):
    # text(2) image A: 10 units kept {1, 4, 7} | image B right after A: 6 units kept {0, 5} | text(3)
    ids = [1, 5] + [3] * 3 + [3] * 2 + [6, 7, 8]
    model = OneD()
    feats = [feature(2, 3, n=10), feature(5, 2, n=6)]
    positions, delta = model.get_mrope_input_positions(ids, feats)
    a = attach_positions(torch.zeros(3, 4), torch.tensor([1, 4, 7])[:, None].expand(-1, 3))
    b = attach_positions(torch.zeros(2, 4), torch.tensor([0, 5])[:, None].expand(-1, 3))
    positions, delta = run_chunks(model, ids, positions, [(2, a), (5, b)], [c for c in chunks if c])
    assert positions[0].tolist() == [0, 1, 3, 6, 9, 12, 17, 18, 19, 20]
    assert delta == 21 - len(ids)  # decoding continues at the unpruned length
    again, delta2 = run_chunks(model, ids, positions.clone(), [(2, a), (5, b)], [len(ids)])  # idempotent
    assert torch.equal(again, positions) and delta2 == delta


def test_three_d_positions_follow_original_grid():
    # text(2) <start> image 3x4 grid kept units {0, 5, 11} <end> text(2)
    ids = [1, 2, 5] + [3] * 3 + [6, 7, 8]
    model = ThreeD()
    positions, delta = model.get_mrope_input_positions(ids, [feature(3, 3, grid=(3, 4))])
    emb = attach_positions(torch.zeros(3, 4), torch.tensor([[0, 0, 0], [0, 1, 1], [0, 2, 3]]))
    positions, delta = run_chunks(model, ids, positions, [(3, emb)], [4, 5])
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3
    assert positions[:, 3:6].T.tolist() == [[3, 3, 3], [3, 4, 4], [3, 5, 6]]
    assert positions[:, 6:].tolist() == [[7, 8, 9]] * 3  # base 3 + max(3, 4)
    assert delta == 10 - len(ids)


def test_three_d_image_at_prompt_start_and_touching_images():
    from vtprune.serving.vllm_plugin import check_qwen_placeholders

    ids = [3] * 2 + [6, 7]  # an image first (vLLM's dummy prompts do this), then text
    model = ThreeD()
    positions, delta = model.get_mrope_input_positions(ids, [feature(0, 2, grid=(2, 2))])
    emb = attach_positions(torch.zeros(2, 4), torch.tensor([[0, 0, 1], [0, 1, 0]]))
    positions, delta = run_chunks(model, ids, positions, [(0, emb)], [4])
    assert positions.T.tolist() == [[0, 0, 1], [0, 1, 0], [2, 2, 2], [3, 3, 3]] and delta == 0
    ranges = [SimpleNamespace(offset=1, length=2), SimpleNamespace(offset=3, length=2)]
    with pytest.raises(ValueError, match="may not touch"):
        check_qwen_placeholders([5, 3, 3, 3, 3, 6], ranges, 3)
    check_qwen_placeholders([5, 3, 3, 6, 5, 3, 3, 6], [ranges[0], SimpleNamespace(offset=5, length=2)], 3)
