"""Attention rows recorded from an SDPA model equal the same layer run in eager mode."""
import pytest
import torch

from vtprune.attention import record_attention
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model


def eager_twin(model):
    twin = type(model)._from_config(model.config, attn_implementation="eager").eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_rows_match_eager(family):
    model = tiny_model(family)
    size = (112, 112) if family.startswith("qwen") else (56, 56)
    inputs = make_inputs(model, [Sample([1, 7, 8], [9, 10, 11], 0, size), Sample([1], [9, 12, 13], 1, size)])
    layer = model.model.language_model.layers[1]
    with torch.no_grad(), record_attention(layer.self_attn) as rec:
        model(**inputs)
    assert model.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        eager = eager_twin(model)(**inputs, output_attentions=True).attentions[1]
    mask = inputs["attention_mask"].bool()
    for b in range(2):
        rows = torch.nonzero(mask[b]).flatten()
        got = rec.last.rows(b, rows)[:, :, mask[b]]
        want = eager[b][:, rows][:, :, mask[b]]
        assert (got - want).abs().max() < 1e-5
        # a chosen subset of rows (the last token) is the same slice
        assert torch.allclose(rec.last.rows(b, [rows[-1]])[:, 0], eager[b][:, rows[-1]], atol=1e-5)


def test_clip_cls_row_matches_eager():
    model = tiny_model("llava")
    pixels = make_inputs(model, [Sample([1], [2], 0)])["pixel_values"]
    tower = model.model.vision_tower
    with torch.no_grad(), record_attention(tower.encoder.layers[1].self_attn) as rec:
        tower(pixels)
    with torch.no_grad():
        eager = eager_twin(model).model.vision_tower(pixels, output_attentions=True).attentions[1]
    assert torch.allclose(rec.last.rows(0, [0])[:, 0], eager[0][:, 0], atol=1e-6)
    assert torch.allclose(rec.last.rows(0), eager[0], atol=1e-6)


def test_each_recording_sees_the_config_as_it_is_now_and_restores_it():
    """record_attention reuses one copy of a module's config across recordings (copying costs more than
    the rest): a change made to the config in between must reach the next recording, and every
    recording must leave the module with its own config object."""
    model = tiny_model("llava")
    attn = model.model.language_model.layers[1].self_attn
    config = attn.config
    with record_attention(attn):
        assert attn.config is not config and attn.config._attn_implementation == "vtprune_capture"
        assert attn.config.attention_dropout == config.attention_dropout == 0.0
    assert attn.config is config and "_vtprune_capture" not in attn.__dict__
    config.attention_dropout = 0.25
    try:
        with record_attention(attn) as outer, record_attention(attn) as inner:  # nested, then handed back
            assert attn.config.attention_dropout == 0.25 and attn.config._attn_implementation == "vtprune_capture"
            with torch.no_grad():
                model(**make_inputs(model, [Sample([1], [9, 10], 0)]))
        assert len(inner.calls) == 1 and not outer.calls
        assert attn.config is config and config._attn_implementation == "sdpa"
    finally:
        config.attention_dropout = 0.0
