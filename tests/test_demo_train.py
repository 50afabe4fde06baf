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


def _objects_matching(scene, labels, colour=None, shape=None, centres=False):
    """Reference mask built from the scene description, not from the question parser."""
    want = torch.zeros(scenes.GRID * scenes.GRID, dtype=torch.bool)
    for o in scene.objects:
        if (colour is None or o.color == colour) and (shape is None or o.shape == shape):
            want |= (labels["color"] == 1 + scenes.COLOR_NAMES.index(o.color)) & \
                    (labels["shape"] == 1 + scenes.SHAPES.index(o.shape))
    return want & (labels["center"] > 0) if centres else want


def test_referent_patches_follow_each_question_template():
    scene = next(s for s in (scenes.make_scene(k) for k in range(50)) if len(s.objects) >= 3)
    labels = train.patch_label_tensors(scene)
    a, b = scene.objects[0], scene.objects[1]
    cases = {
        f"what color is the {a.shape}?": [_objects_matching(scene, labels, shape=a.shape)],
        f"what shape is the {a.color} object?": [_objects_matching(scene, labels, colour=a.color)],
        "how many objects are there?": [_objects_matching(scene, labels, centres=True)],
        f"how many {scenes.PLURALS[b.shape]} are there?": [_objects_matching(scene, labels, shape=b.shape, centres=True)],
        f"how many {b.color} objects are there?": [_objects_matching(scene, labels, colour=b.color, centres=True)],
        f"is there a {a.color} {a.shape}?": [_objects_matching(scene, labels, a.color, a.shape)],
        f"is the {a.name} left or right of the {b.name}?": [_objects_matching(scene, labels, a.color, a.shape),
                                                   _objects_matching(scene, labels, b.color, b.shape)],
    }
    for question, want in cases.items():
        got = train.referent_patches(labels, question)
        assert len(got) == len(want), question
        for g, w in zip(got, want):
            assert w.any() and torch.equal(g, w), question
    assert int(train.referent_patches(labels, "how many objects are there?")[0].sum()) == len(scene.objects)


def test_retrieval_targets_bind_object_words_then_answers():
    encoder = train.TurnEncoder(train.build_processor().tokenizer)
    drawn, ids, labels, mask, pos, kept, questions = train.conversation_batch(encoder, [0, 1, 2], turns=10, background=8)
    patch = [train.patch_label_tensors(s) for s in drawn]
    targets = train.retrieval_targets(encoder, ids, labels, kept, patch, questions)
    assert set(targets) == {train.MENTION_LAYER, train.ANSWER_LAYER}
    object_word = torch.isin(ids, torch.tensor(sorted(encoder.object_words))) & (labels == -100)  # not answers
    where, masks = targets[train.MENTION_LAYER]
    assert len(where) == int(object_word.sum())  # one row per object word
    for (b, t), m in zip(where.tolist(), masks):
        assert object_word[b, t] and (ids[b][m.any(0)] == encoder.image).all()
    where, masks = targets[train.ANSWER_LAYER]
    asked = [q for qs in questions for q in qs]
    assert len(where) == len(asked)
    for (b, t), m, q in zip(where.tolist(), masks, asked):
        assert labels[b, t] == -100 and labels[b, t + 1] != -100  # the position that predicts the answer
        two_objects = len(train.referent_patches(patch[b], q)) == 2
        if two_objects:  # head h reads the h-th object word of this very question
            assert [int(m[h].nonzero()) for h in range(2)] == [int(i) for i in object_word[b, :t].nonzero()[-2:]]
        else:
            assert (ids[b][m.any(0)] == encoder.image).all()
    assert any(len(train.referent_patches(patch[b], q)) == 2 for b, qs in enumerate(questions) for q in qs)


def test_retrieval_loss_rewards_attention_on_the_target():
    encoder = train.TurnEncoder(train.build_processor().tokenizer)
    drawn, ids, labels, mask, pos, kept, questions = train.conversation_batch(encoder, [0, 1], turns=6, background=8)
    patch = [train.patch_label_tensors(s) for s in drawn]
    for where, masks in train.retrieval_targets(encoder, ids, labels, kept, patch, questions).values():
        T = ids.shape[1]
        uniform = torch.full((2, 2, T, T), 1.0 / T)
        on_target = torch.zeros(2, 2, T, T)
        for (b, t), m in zip(where.tolist(), masks):
            for h in range(2):
                if m[h].any():
                    on_target[b, h, t] = m[h].float() / m[h].sum()
        assert train.retrieval_loss(on_target, where, masks) < 1e-4 < train.retrieval_loss(uniform, where, masks)


def test_position_targets_are_the_two_objects_centres_and_the_probe_reads_them():
    encoder = train.TurnEncoder(train.build_processor().tokenizer)
    drawn, ids, labels, mask, pos, kept, questions = train.conversation_batch(encoder, [0, 1, 2], turns=10, background=8)
    patch = [train.patch_label_tensors(s) for s in drawn]
    where, centres = train.position_targets(ids, labels, patch, questions)
    spatial = [(b, q) for b, qs in enumerate(questions) for q in qs if " or " in q]
    assert len(where) == len(spatial) > 0 and centres.shape == (len(spatial), 4)
    for (b, t), c, (sb, q) in zip(where.tolist(), centres, spatial):
        assert b == sb and labels[b, t] == -100 and labels[b, t + 1] != -100
        first, second = (o for name in q.split(" the ")[1:] for o in drawn[b].objects if name.startswith(o.name))
        one_patch = 2 / (train.GRID - 1)  # the mean of an object's patches lies within a patch of its centre
        for obj, (x, y) in ((first, c[:2]), (second, c[2:])):
            assert abs(float(x) - ((obj.cx / scenes.PATCH - 0.5) * one_patch - 1)) < one_patch
            assert abs(float(y) - ((obj.cy / scenes.PATCH - 0.5) * one_patch - 1)) < one_patch
    probe = train.position_probe(16)
    hidden = torch.zeros(len(ids), ids.shape[1], 16)
    hidden[where[:, 0], where[:, 1]] = centres @ torch.linalg.pinv(probe).T  # encodes the centres exactly
    assert float(train.position_loss(hidden, where, centres)) < 1e-8 < float(train.position_loss(hidden * 0, where, centres))


def test_llm_stage_runs_end_to_end_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import LlavaForConditionalGeneration

    log = train.train_llm(str(tmp_path / "llm"), steps=2, batch_size=2, turns=3, eval_every=2)
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert all(s["retrieval"] is not None and s["retrieval"] > 0 for s in log["steps"])  # attention + probe terms
    assert set(log["evals"][-1]) >= set(scenes.QTYPES) | {"overall"}
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llm")
    assert model.get_input_embeddings().num_embeddings == len(train.build_processor().tokenizer)
    assert (tmp_path / "llm" / "train_log.json").is_file()
