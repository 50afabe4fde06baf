"""The scene generator: deterministic, answers consistent with the scene, well-formed layouts."""
import io

import numpy as np
import pytest

from vtprune.demo import scenes


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_image_and_question():
    a, b = scenes.make_question(1234), scenes.make_question(1234)
    assert (a.question, a.answer, a.qtype) == (b.question, b.answer, b.qtype)
    assert png_bytes(a.image()) == png_bytes(b.image())
    assert png_bytes(scenes.make_question(1235).image()) != png_bytes(a.image())


def test_splits_are_fixed_and_disjoint():
    test = scenes.make_split("test", 10)
    assert [e.seed for e in test] == [e.seed for e in scenes.make_split("test", 10)]
    assert not {e.seed for e in test} & {e.seed for e in scenes.make_split("train", 10)}
    assert {e.qtype for e in scenes.make_split("test", 10)} == set(scenes.QTYPES)


def test_answers_agree_with_the_checker():
    for seed in range(300):
        ex = scenes.make_question(seed)
        assert scenes.check_answer(ex.scene, ex.question) == ex.answer, ex.question


def test_layouts_are_valid_and_include_small_objects():
    small = 0
    for seed in range(200):
        scene = scenes.make_scene(seed)
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        boxes = [o.bbox for o in scene.objects]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= scenes.IMAGE_SIZE and 0 <= y0 < y1 <= scenes.IMAGE_SIZE
            for (u0, v0, u1, v1) in boxes[i + 1:]:
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0  # no overlap
        small += sum(o.size <= 3 * scenes.PATCH for o in scene.objects)
    assert small > 50


def test_background_is_textured_not_flat():
    image = np.asarray(scenes.render(scenes.make_scene(5, n_objects=1)), dtype=np.float32)
    corner = image[:60, :60]
    assert corner.std() > 2.0  # cluttered background, so background patches are not identical


def test_object_centres_are_patch_centres_with_a_patch_between_objects():
    P, G = scenes.PATCH, scenes.GRID
    for seed in range(100):
        scene = scenes.make_scene(seed)
        mask = scenes.object_mask(scene)
        owners = mask.reshape(G, P, G, P).transpose(0, 2, 1, 3).reshape(G * G, P * P)
        assert all(len(set(row[row > 0].tolist())) <= 1 for row in owners)  # no patch shows two objects
        for o in scene.objects:
            cells = o.size // P
            assert cells in scenes.SIZES
            assert o.cx % P == P // 2 and o.cy % P == P // 2
            offset = 0 if cells % 2 else P // 2  # odd widths on the grid, even widths half a patch off
            assert all(v % P == offset for v in o.bbox), o.bbox
        labels = scenes.patch_labels(scene, min_frac=0.1)  # polygons spill a half-pixel (1-px) edge
        touched = np.flatnonzero(labels["color"])
        spans = [o.size // P + (1 - (o.size // P) % 2) for o in scene.objects]
        assert len(touched) <= sum(s * s for s in spans)
        centres = {int(c) for c in np.flatnonzero(labels["center"])}
        assert centres == {(o.cy // P) * G + o.cx // P for o in scene.objects}
        assert labels["center"].sum() == len(scene.objects)  # one centre patch per object


def test_each_object_carries_a_centre_marker_inside_its_centre_patch():
    P, G = scenes.PATCH, scenes.GRID
    marker = np.array(scenes.MARKER_RGB)
    for seed in range(30):
        scene = scenes.make_scene(seed)
        image = np.asarray(scenes.render(scene)).astype(int)
        is_marker = (np.abs(image - marker).sum(-1) == 0)
        centres = np.flatnonzero(scenes.patch_labels(scene)["center"])
        per_patch = is_marker.reshape(G, P, G, P).sum((1, 3)).flatten()
        assert set(np.flatnonzero(per_patch)) == set(centres.tolist())  # markers lie in centre patches only
        assert (per_patch[centres] == scenes.MARKER ** 2).all()  # whole, not split across patches
