"""Issue 21, Qwen adapters: the vectorised M-RoPE index equals transformers' ``get_rope_index`` exactly,
and the per-grid tables the adapters keep equal what transformers computes afresh."""
from __future__ import annotations

import pytest
import torch

from tiny_models import model_of
from vtprune.models.qwen2_5_vl import Qwen25VLAdapter, image_rope_index, rope_table
from vtprune.models.qwen3_vl import Qwen3VLAdapter

FAMILIES = {"qwen2_5_vl": Qwen25VLAdapter, "qwen3_vl": Qwen3VLAdapter}
TEXT, PAD = 7, 0


def _sample(cfg, parts):
    """ids and mm_token_type_ids of one sample: ints are text runs of that length, tuples (t, h, w)
    images (vision start, placeholders, vision end)."""
    ids, grids = [], []
    for p in parts:
        if isinstance(p, int):
            ids += [TEXT + k % 5 for k in range(p)]
        else:
            t, h, w = p
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
            grids.append(list(p))
    return ids, grids


def _batch(cfg, samples, pad="left"):
    rows, grids = zip(*(_sample(cfg, s) for s in samples))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(length - len(r), length) if pad == "left" else slice(0, len(r))
        ids[b, cols] = torch.tensor(r)
        mask[b, cols] = 1
    mm = (ids == cfg.image_token_id).int()
    return ids, mask, mm, torch.tensor([g for gs in grids for g in gs])


LAYOUTS = {
    "one image, text before and after": [[3, (1, 8, 8), 5]],
    "one wide image": [[2, (1, 6, 10), 4]],
    "one tall image, no text before": [[(1, 10, 4), 6]],
    "image last": [[4, (1, 8, 8)]],
    "two images, text between": [[3, (1, 8, 8), 2, (1, 6, 10), 5]],
    "two images, text only before": [[1, (1, 4, 6), (1, 8, 4)]],
    "two frames of one grid": [[2, (2, 4, 6), 3]],
    "left-padded batch of 2": [[3, (1, 8, 8), 5], [2, (1, 6, 10), 1, (1, 4, 4), 9]],
    "batch of 2, equal lengths": [[2, (1, 8, 8), 3], [2, (1, 8, 8), 3]],
}


def _compare(model, ids, mask, mm, grid):
    adapter = FAMILIES[model.config.model_type](model)
    want, want_deltas = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                   attention_mask=mask)
    got = adapter.full_positions(ids, mask, {"image_grid_thw": grid, "mm_token_type_ids": mm}, None)
    got_deltas = model.model.rope_deltas
    vectorised = any(k[0] == "rope" for k in adapter._tables)
    assert vectorised == bool((grid[:, 0] == 1).all())  # frames (t > 1): the model's own get_rope_index
    assert got.dtype == want.dtype and got_deltas.dtype == want_deltas.dtype
    assert torch.equal(got, want), (got - want).abs().amax()
    assert torch.equal(got_deltas, want_deltas), (got_deltas, want_deltas)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_index_equals_transformers(family, layout):
    model = model_of(family)
    _compare(model, *_batch(model.config, LAYOUTS[layout]))


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_index_right_padding_and_no_mask(family):
    model = model_of(family)
    ids, mask, mm, grid = _batch(model.config, LAYOUTS["left-padded batch of 2"], pad="right")
    _compare(model, ids, mask, mm, grid)
    ids, _, mm, grid = _batch(model.config, LAYOUTS["two images, text between"])
    want, want_deltas = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
    got, got_deltas = image_rope_index(ids, mm, None, rope_table(tuple(map(tuple, grid.tolist())), 2, ids.device))
    assert torch.equal(got, want) and torch.equal(got_deltas, want_deltas)


def test_videos_use_the_models_own_index(monkeypatch):
    model = model_of("qwen2_5_vl")
    adapter = Qwen25VLAdapter(model)
    ids, mask, mm, grid = _batch(model.config, LAYOUTS["one image, text before and after"])
    called = []
    original = model.model.get_rope_index
    monkeypatch.setattr(model.model, "get_rope_index", lambda *a, **k: called.append(1) or original(*a, **k))
    adapter.full_positions(ids, mask, {"image_grid_thw": grid, "mm_token_type_ids": mm,
                                       "pixel_values_videos": torch.zeros(1)}, None)
    assert called


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_order_cached_per_grid(family):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    model = model_of(family)
    adapter = FAMILIES[family](model)
    for grid in (torch.tensor([[1, 8, 8]]), torch.tensor([[1, 12, 16], [1, 8, 20]]), torch.tensor([[1, 8, 8]])):
        got = adapter.unit_order(grid)
        if family == "qwen2_5_vl":
            visual = model.model.visual
            window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                                      patch_size=visual.patch_size, kwargs={})
            assert torch.equal(got, torch.argsort(window_index))
        else:
            assert torch.equal(got, torch.arange(int(grid.prod(-1).sum()) // 4))
    assert sum(k[0] == "order" for k in adapter._tables) == 2
    grid = torch.tensor([[1, 8, 8]])
    adapter.unit_order(grid)
    grid[0, 1] = 12  # an in-place change of the same tensor is a new grid
    assert adapter.expected_tokens({"image_grid_thw": grid}) == [24]
