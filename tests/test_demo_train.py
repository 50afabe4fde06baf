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


def test_loader_workers_give_the_same_batches_as_the_training_process():
    batches = train._StepBatches(train._vision_batch, 0, 1, 1)  # 1 scene, 1 window per step
    alone = list(train._loader(batches, 3, workers=0))
    parallel = list(train._loader(batches, 3, workers=2))
    assert len(alone) == len(parallel) == 3
    for (p0, c0, l0), (p1, c1, l1) in zip(alone, parallel):
        assert torch.equal(p0, p1) and torch.equal(c0, c1)
        assert all(torch.equal(l0[k], l1[k]) for k in l0)
    assert not torch.equal(alone[0][0], alone[1][0])  # each step its own scenes


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
    where, masks, evenly = targets[train.MENTION_LAYER]
    assert len(where) == int(object_word.sum()) and not evenly.any()  # one row per object word
    for (b, t), m in zip(where.tolist(), masks):
        assert object_word[b, t] and (ids[b][m.any(0)] == encoder.image).all()
    where, masks, evenly = targets[train.ANSWER_LAYER]
    asked = [q for qs in questions for q in qs]
    assert len(where) == len(asked)
    for (b, t), m, even, q in zip(where.tolist(), masks, evenly, asked):
        assert labels[b, t] == -100 and labels[b, t + 1] != -100  # the position that predicts the answer
        refs = train.referent_patches(patch[b], q)
        if len(refs) == 2:  # head h reads the h-th object word of this very question
            assert [int(m[h].nonzero()) for h in range(2)] == [int(i) for i in object_word[b, :t].nonzero()[-2:]]
        elif q.startswith("how many"):  # the counted centres and the sink, evenly
            assert even and bool(m[:, train.COUNT_SINK].all())
            assert int(m[0].sum()) == 1 + int(refs[0].sum()) and (ids[b][m[0]][1:] == encoder.image).all()
        else:
            assert not even and (ids[b][m.any(0)] == encoder.image).all()
    assert any(len(train.referent_patches(patch[b], q)) == 2 for b, qs in enumerate(questions) for q in qs)
    assert evenly.any()


def test_retrieval_loss_rewards_attention_on_the_target():
    encoder = train.TurnEncoder(train.build_processor().tokenizer)
    drawn, ids, labels, mask, pos, kept, questions = train.conversation_batch(encoder, [0, 1], turns=6, background=8)
    patch = [train.patch_label_tensors(s) for s in drawn]
    for where, masks, evenly in train.retrieval_targets(encoder, ids, labels, kept, patch, questions).values():
        T = ids.shape[1]
        uniform = torch.full((2, 2, T, T), 1.0 / T)
        on_target = torch.zeros(2, 2, T, T)
        for (b, t), m in zip(where.tolist(), masks):
            for h in range(2):
                if m[h].any():
                    on_target[b, h, t] = m[h].float() / m[h].sum()
        if not evenly.any():
            assert train.retrieval_loss(on_target, where, masks) < 1e-4 < train.retrieval_loss(uniform, where, masks)
            continue
        # evenly spread rows: spreading exactly over the targets beats lumping the same mass on one of them
        lumped = on_target.clone()
        for (b, t), m, even in zip(where.tolist(), masks, evenly):
            if even and int(m[0].sum()) > 1:
                first = int(m[0].nonzero()[0])
                lumped[b, :2, t] = 0
                lumped[b, :2, t, first] = 1
        spread = train.retrieval_loss(on_target, where, masks, evenly)
        assert spread < train.retrieval_loss(lumped, where, masks, evenly)
        assert spread < train.retrieval_loss(uniform, where, masks, evenly)
        assert train.retrieval_loss(lumped, where, masks) < 1e-4  # without ``evenly`` only the mass counts


def test_count_targets_encode_the_answer_and_the_probe_reads_them():
    encoder = train.TurnEncoder(train.build_processor().tokenizer)
    drawn, ids, labels, mask, pos, kept, questions = train.conversation_batch(encoder, [0, 1, 2], turns=10, background=8)
    where, targets = train.count_targets(encoder, ids, labels, questions)
    counting = [(b, q) for b, qs in enumerate(questions) for q in qs if q.startswith("how many")]
    assert len(where) == len(counting) > 0 and targets.shape == (len(counting), 1)
    for (b, t), target, (sb, q) in zip(where.tolist(), targets, counting):
        assert b == sb and labels[b, t] == -100
        count = int(scenes.NUMBERS.index(scenes.check_answer(drawn[b], q)))
        assert abs(float(target) - (2 / (count + 1) - 1)) < 1e-6
    probe = train.count_probe(16)
    hidden = torch.zeros(len(ids), ids.shape[1], 16)
    hidden[where[:, 0], where[:, 1]] = targets @ torch.linalg.pinv(probe).T
    assert float(train.position_loss(hidden, where, targets, probe=train.count_probe)) < 1e-8
    assert float(train.position_loss(hidden * 0, where, targets, probe=train.count_probe)) > 1e-3


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
