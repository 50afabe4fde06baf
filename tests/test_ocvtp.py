"""OC-VTP: the pruner's selection rule, training, strict checkpoints, the method on every family, the CLI."""
import contextlib
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.ocvtp import CheckpointError, PrunerConfig, SlotPruner, checkpoint_dir, load_pruner, save_pruner
from vtprune.ocvtp.pruner import select_from_attention
from vtprune.tiny import FAMILIES, Sample, make_inputs, tiny_model

SYNTHETIC = checkpoint_dir() / "synthetic-d32"  # shipped: 32-d towers (the tiny models), block 1


@contextlib.contextmanager
def one_thread():
    """Small models train several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_pruner(dim=8, slot_dim=16, seed=0):
    torch.manual_seed(seed)
    return SlotPruner(PrunerConfig(input_dim=dim, slot_dim=slot_dim, layer=1)).eval()


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_every_budget_gives_exactly_keep_sorted_unique_indices(batch):
    n = 12
    pruner = small_pruner()
    x = torch.randn(batch, n, 8)
    fill = torch.rand(batch, n)
    for keep in range(1, n + 1):
        for scores in (None, fill):
            idx = pruner.select(x, keep, scores)
            assert idx.shape == (batch, keep)
            assert idx.dtype == torch.long
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            if keep > 1:
                assert bool((idx[:, 1:] > idx[:, :-1]).all())


def test_same_input_and_seed_give_the_same_indices_independent_of_the_batch():
    pruner = small_pruner()
    x = torch.randn(4, 20, 8)
    a = pruner.select(x, 5, seed=3)
    assert torch.equal(a, pruner.select(x.clone(), 5, seed=3))
    assert torch.equal(a[2:3], pruner.select(x[2:3], 5, seed=3))  # batch composition does not matter
    # a stochastic draw is available and differs from run to run somewhere
    draws = {tuple(pruner.select(x, 5, noise="per_call").flatten().tolist()) for _ in range(8)}
    assert len(draws) > 1


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 6), n=st.integers(1, 10), keep=st.integers(1, 10),
       seed=st.integers(0, 1000), quantise=st.booleans(), scores=st.booleans())
def test_selection_rule_invariants(b, k, n, keep, seed, quantise, scores):
    keep = min(keep, n)
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, k, n, generator=g)
    if quantise:  # many exact ties
        attn = (attn * 3).round()
    attn = attn.softmax(dim=1)
    fill = (torch.rand(b, n, generator=g) * 2).round() if scores else None
    idx = select_from_attention(attn, keep, fill)
    assert idx.shape == (b, keep)
    for row in idx.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < n
    assert torch.equal(idx, select_from_attention(attn.clone(), keep, fill))
    # every slot's argmax token is kept when the budget allows all of them
    nominated = attn.argmax(dim=2)
    for i in range(b):
        if len(set(nominated[i].tolist())) <= keep:
            assert set(nominated[i].tolist()) <= set(idx[i].tolist())


def test_duplicates_are_filled_by_score_with_ties_to_the_lower_index():
    attn = torch.zeros(1, 3, 6)
    attn[0, :, 4] = torch.tensor([0.9, 0.8, 0.7])  # every slot nominates token 4
    fill = torch.tensor([[0.1, 0.5, 0.5, 0.0, 0.9, 0.2]])
    assert select_from_attention(attn, 3, fill).tolist() == [[1, 2, 4]]
    # two nominated tokens, budget 1: the one with the larger attention wins
    attn = torch.zeros(1, 2, 5)
    attn[0, 0, 1], attn[0, 1, 3] = 0.6, 0.7
    assert select_from_attention(attn, 1).tolist() == [[3]]


# -- training -------------------------------------------------------------------------------------
def test_training_lowers_validation_loss_and_beats_random_selection(tmp_path):
    from vtprune.ocvtp.extract import write_feature_set
    from vtprune.ocvtp.train import compare_with_random, synthetic_clustered_features, train

    feats = synthetic_clustered_features(240, grid=(6, 6), dim=16, seed=0)
    write_feature_set(feats, tmp_path / "features", layer=1, grid=(6, 6), shard_size=100)
    with one_thread():
        result = train(tmp_path / "features", tmp_path / "ckpt", epochs=100, max_steps=150, batch_size=12,
                       slots=(3, 6, 12), slot_dim=32, val_fraction=0.1, val_every=75, progress=False)
    assert result.steps == 150
    assert result.last_val < 0.5 * result.first_val  # held-out, masked validation
    for name in ("pruner.safetensors", "pruner.json", "history.json", "loss.png", "state/progress.json"):
        assert (tmp_path / "ckpt" / name).is_file()
    history = json.loads((tmp_path / "ckpt" / "history.json").read_text())
    assert [h["step"] for h in history["val"]] == [0, 75, 150]

    pruner = load_pruner(tmp_path / "ckpt")
    test_set = synthetic_clustered_features(64, grid=(6, 6), dim=16, seed=123)
    cmp = compare_with_random(pruner, test_set, keep=6)
    assert cmp["ocvtp"] < 0.6 * cmp["random"], cmp

    # resumable: a longer run continues from the saved state instead of starting over
    with one_thread():
        more = train(tmp_path / "features", tmp_path / "ckpt", epochs=100, max_steps=160, batch_size=12,
                     slots=(3, 6, 12), slot_dim=32, val_fraction=0.1, val_every=75, progress=False)
    assert more.steps == 160
    assert [h["step"] for h in more.history["val"]] == [0, 75, 150, 160]


def test_shipped_synthetic_checkpoint_beats_random():
    from vtprune.ocvtp.train import compare_with_random, synthetic_clustered_features

    pruner = load_pruner(SYNTHETIC)
    assert pruner.config.input_dim == 32 and pruner.config.layer == 1
    cmp = compare_with_random(pruner, synthetic_clustered_features(100, dim=32, seed=999), keep=8)
    assert cmp["ocvtp"] < 0.5 * cmp["random"], cmp


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_strict_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    pruner = small_pruner()
    save_pruner(pruner, tmp_path / "ok")
    loaded = load_pruner(tmp_path / "ok")
    x = torch.randn(2, 10, 8)
    assert torch.equal(pruner.select(x, 4), loaded.select(x, 4))
    state = load_file(str(tmp_path / "ok" / "pruner.safetensors"))
    cfg = (tmp_path / "ok" / "pruner.json").read_text()

    def broken(name, tensors, config=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "pruner.safetensors"))
        (d / "pruner.json").write_text(config)
        return d

    missing = dict(state)
    missing.pop("slot_mean")
    with pytest.raises(CheckpointError, match="missing tensors: slot_mean"):
        load_pruner(broken("missing", missing))
    with pytest.raises(CheckpointError, match="unexpected tensors: decoder.mask_token"):
        load_pruner(broken("extra", {**state, "decoder.mask_token": torch.zeros(8)}))
    with pytest.raises(CheckpointError, match="encoder.1.weight has shape"):
        load_pruner(broken("shape", {**state, "encoder.1.weight": torch.zeros(3, 8)}))
    with pytest.raises(CheckpointError, match="Unknown keys"):
        load_pruner(broken("config", state, cfg.replace('"iters"', '"iterations"')))
    with pytest.raises(CheckpointError, match="No OC-VTP pruner config"):
        load_pruner(tmp_path / "nowhere")


# -- the method on every family ----------------------------------------------------------------------
def _sample(family, k=0):
    size = [(112, 112), (84, 140)][k] if family.startswith("qwen") else [(56, 56), (28, 56)][k] \
        if family == "llava_next" else (56, 56)
    return Sample([1, 7, 8], [9, 10, 11], k, size) if k == 0 else Sample([1, 7], [9, 12, 13, 14], 5, size)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_keeps_exactly_k_tokens_per_image(family):
    model = tiny_model(family)
    inputs = make_inputs(model, [_sample(family, 0), _sample(family, 1)])
    keep = 3
    layouts = ["model", "flat"] if family == "llava_next" else ["model"]
    for layout in layouts:
        kwargs = {"layout": layout} if family == "llava_next" else {}
        runs = []
        for _ in range(2):
            with vtprune.pruned(model, "ocvtp", keep=keep, checkpoint=SYNTHETIC, **kwargs) as handle:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
                stats = handle.last
            assert out.shape[0] == 2
            assert [len(im.entering_cells) for im in stats.images] == [keep, keep]
            if layout == "flat" or family != "llava_next":
                assert stats.tokens_entering_llm == [keep, keep]
            assert stats.images[0].info["slots"] == keep + 1  # the public code's CLS place (cls_slot=True)
            runs.append(stats.kept_columns)
        assert runs[0] == runs[1]  # deterministic


def _untouched(model) -> bool:
    """Nothing of vtprune's is on the model: no handle, no forward of its own on the instance."""
    return "forward" not in vars(model) and getattr(model, "_vtprune_handle", None) is None


def test_width_mismatch_and_missing_checkpoint_are_clear_errors_before_the_model_is_patched(tmp_path):
    """The checkpoint is found and checked against the tower by apply() (load_resources), so a missing or
    unfitting one raises there, with the model untouched, not at the first forward."""
    model = tiny_model("llava")
    save_pruner(small_pruner(dim=16), tmp_path / "d16")
    with pytest.raises(CheckpointError, match=r"takes 16-d tokens .* 32-d.*vtprune ocvtp extract"):
        vtprune.apply(model, "ocvtp", keep=4, checkpoint=tmp_path / "d16")
    assert _untouched(model)
    with pytest.raises(CheckpointError, match="no checkpoint shipped with vtprune fits"):
        vtprune.apply(model, "ocvtp", keep=4)
    assert _untouched(model)
    qwen = tiny_model("qwen2_5_vl")
    with pytest.raises(CheckpointError, match="takes 16-d tokens"):
        vtprune.apply(qwen, "ocvtp", keep=4, checkpoint=tmp_path / "d16")
    assert _untouched(qwen)
    inputs = make_inputs(model, [_sample("llava")])
    with vtprune.pruned(model, "ocvtp", keep=3, checkpoint=SYNTHETIC):  # the model still prunes afterwards
        model(**inputs)


# -- extraction and the CLI ---------------------------------------------------------------------------
def _processor(family):
    if family == "llava":
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28,
                                 max_pixels=1 << 20)


def _images(folder, n=6):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cli_extract_then_train(tmp_path, family):
    from safetensors.torch import load_file

    from vtprune.ocvtp.cli import main
    from vtprune.ocvtp.extract import tower_tokens

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "model")
    _processor(family).save_pretrained(tmp_path / "model")
    images = _images(tmp_path / "images")
    feats = tmp_path / "features"
    args = ["extract", "--model", str(tmp_path / "model"), "--images", str(images), "--out", str(feats),
            "--layer", "1", "--batch-size", "4", "--shard-size", "4", "--device", "cpu", "--quiet"]
    if family == "qwen2_5_vl":
        args += ["--image-size", "112"]
    assert main(args) == 0
    index = json.loads((feats / "index.json").read_text())
    n_tok = 16
    assert index["count"] == 6 and index["num_tokens"] == n_tok and index["dim"] == 32 and index["layer"] == 1
    assert [s["count"] for s in index["shards"]] == [4, 2]
    shard0 = load_file(str(feats / "shard-00000.safetensors"))["features"]
    assert shard0.dtype == torch.float16 and shard0.shape == (4, n_tok, 32)

    # the stored tokens are what the method reads at inference (ctx.hidden), CLS removed / units merged
    from PIL import Image

    from vtprune.ocvtp.extract import preprocess

    inputs, _ = preprocess(model, _processor(family), [Image.open(images / "img0.png")],
                           112 if family == "qwen2_5_vl" else None)
    direct = tower_tokens(model, inputs, 1)[0]
    assert torch.allclose(shard0[0].float(), direct, atol=2e-3, rtol=1e-3)

    # resumable: a deleted shard is rewritten, the other is skipped
    os.remove(feats / "shard-00001.safetensors")
    stamp = os.path.getmtime(feats / "shard-00000.safetensors")
    assert main(args) == 0
    assert (feats / "shard-00001.safetensors").is_file()
    assert os.path.getmtime(feats / "shard-00000.safetensors") == stamp

    out = tmp_path / "ckpt"
    assert main(["train", "--features", str(feats), "--out", str(out), "--max-steps", "4", "--batch-size", "2",
                 "--slots", "2,4,64", "--slot-dim", "16", "--val-fraction", "0.34", "--quiet"]) == 0
    for name in ("pruner.safetensors", "pruner.json", "history.json", "loss.png", "state/progress.json"):
        assert (out / name).is_file()
    cfg = json.loads((out / "pruner.json").read_text())
    assert cfg["input_dim"] == 32 and cfg["layer"] == 1 and cfg["tower"]["family"] == family
    # the trained checkpoint prunes its own model
    with vtprune.pruned(model, "ocvtp", keep=5, checkpoint=out) as handle:
        model.generate(**make_inputs(model, [_sample(family)]), max_new_tokens=2, pad_token_id=0)
        assert handle.last.tokens_entering_llm == [5]


def test_extract_features_from_a_generator(tmp_path):
    from PIL import Image

    from vtprune.ocvtp.extract import extract_features, read_index

    model = tiny_model("llava")

    def scenes():
        for i in range(5):
            yield Image.new("RGB", (56, 56), (40 * i, 100, 200 - 30 * i))

    extract_features(model, scenes(), None, tmp_path / "f", processor=_processor("llava"), batch_size=2,
                     shard_size=2, progress=False)
    index = read_index(tmp_path / "f")
    assert index["count"] == 5 and index["layer"] == 1  # default: the paper's relative depth of 3 blocks
    assert index["shards"][0]["sources"] == ["#0", "#1"]


def test_cls_slot_and_truncate_arguments_keep_the_budget_slot_rule(tmp_path):
    """Default: keep + 1 slots and the public code's set-order cut; cls_slot=False with truncate='attention'
    is vtprune's earlier rule (keep slots, the weakest nominee dropped, no read-back)."""
    from vtprune.methods import make_method
    from vtprune.methods.base import ImageContext

    pruner = small_pruner()
    x = torch.randn(1, 36, 8)
    fill = torch.rand(1, 36)
    _, attn_keep = pruner(x, 6, seed=1)
    _, attn_plus = pruner(x, 7, seed=1)
    assert torch.equal(pruner.select(x, 6, fill, seed=1, cls_slot=False), select_from_attention(attn_keep, 6, fill))
    assert torch.equal(pruner.select(x, 6, fill, seed=1), select_from_attention(attn_plus, 6, fill))

    path = save_pruner(pruner, tmp_path / "ckpt")
    ctx = ImageContext(features=x[0], grids=[(6, 6)], crop_slices=[slice(0, 36)], family="llava", image_index=0,
                       providers={"received_attention": lambda: fill[0], "hidden": lambda layer: x[0]})
    old = make_method("ocvtp", keep=6, seed=1, checkpoint=str(path), cls_slot=False, truncate="attention")
    sel = old.select_vision(ctx)
    assert sel.info["slots"] == 6 and torch.equal(sel.keep, select_from_attention(attn_keep, 6, fill)[0])
    new = make_method("ocvtp", keep=6, seed=1, checkpoint=str(path))
    sel = new.select_vision(ctx)
    assert sel.info["slots"] == 7 and sel.keep.numel() == 6
