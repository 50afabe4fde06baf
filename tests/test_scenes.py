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


def test_objects_lie_on_the_patch_grid_with_a_patch_between_them():
    for seed in range(100):
        scene = scenes.make_scene(seed)
        for o in scene.objects:
            assert all(v % scenes.PATCH == 0 for v in o.bbox), o.bbox
            assert o.size // scenes.PATCH in scenes.SIZES
        labels = scenes.patch_labels(scene, min_frac=0.1)  # polygons spill a half-pixel (1-px) edge
        touched = np.flatnonzero(labels["color"])
        assert len(touched) <= sum((o.size // scenes.PATCH) ** 2 for o in scene.objects)
        assert labels["center"].sum() == len(scene.objects)  # one centre patch per object
