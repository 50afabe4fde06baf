"""The demo model's training recipe: scene codes decode back to their labels, windows read the right cells."""
import torch

from vtprune.demo import scenes, train


def test_scene_codes_decode_to_the_patch_labels():
    codes = train.scene_codes(160)
    scene = scenes.make_scene(3)
    labels = train.patch_label_tensors(scene)
    features = train.code_features(codes, labels)
    for key in ("color", "shape", "center"):
        assert torch.equal((features @ codes[key].T).argmax(-1), labels[key]), key
    for key in ("row", "col"):  # 24 codes each: a little cross-talk under a dot-product read-out
        assert ((features @ codes[key].T).argmax(-1) == labels[key]).float().mean() >= 0.98, key
    assert train.code_loss(codes, features, labels) < train.code_loss(codes, features.roll(1, 0), labels)


def test_window_batch_labels_match_the_window_cells():
    pixels, cells, labels = train._window_batch(first=0, n_scenes=2, windows=3, step=0)
    assert pixels.shape == (6, 3, train.WINDOW * scenes.PATCH, train.WINDOW * scenes.PATCH)
    full = train.patch_label_tensors(scenes.make_scene(scenes.SPLIT_BASES["train"] + 0))
    for key in ("color", "shape", "row", "col"):
        assert torch.equal(labels[key][0], full[key][cells[0]])
    rows, cols = cells[0] // scenes.GRID, cells[0] % scenes.GRID
    assert int(rows.max() - rows.min()) == int(cols.max() - cols.min()) == train.WINDOW - 1
