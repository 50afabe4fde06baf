"""Exactness and batching of the pipeline on tiny models of all four families."""
import pytest
import torch

import vtprune
from vtprune.methods import Method, Selection, Stage, sorted_topk
from vtprune.tiny import FAMILIES, Sample, make_inputs
from reference import capture_language_model_inputs, reference_logits
from tiny_models import model_of, size_of

TOL = 1e-5


def one(family, k=0, seed=0):
    before, after = ([1, 7, 8], [9, 10, 11]) if k == 0 else ([1, 7], [9, 12, 13, 14, 15, 16])
    return Sample(before, after, seed, size_of(family, k))


def greedy(model, inputs, n=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0,
                             suppress_tokens=[0, 1, 2, 3, 4, 5, 6])
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["vision", "projected", "llm"])
def test_keep_all_reproduces_the_model(family, stage):
    model = model_of(family)
    inputs = make_inputs(model, [one(family, 0), one(family, 1, seed=1)])
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_seq, _ = greedy(model, inputs)
    with vtprune.pruned(model, "keep_all", stage=stage, layer=2):
        with torch.no_grad():
            logits = model(**inputs).logits
        seq, _ = greedy(model, inputs)
    assert (logits - ref_logits).abs().max() <= TOL
    assert torch.equal(seq, ref_seq)


class PerImageBudget(Method):
    """Keeps a different, image-dependent number of tokens: exercises ragged batches."""

    name = "test_per_image"

    def __init__(self, stage, layer=2):
        super().__init__()
        self.stages = (Stage(stage),)
        self.llm_layers = (layer,) if stage == "llm" else ()

    def _pick(self, scores):
        # the count depends on the content (like adaptive methods), not on the batch
        k = 1 + int(1e5 * float(scores.detach().abs().mean())) % (len(scores) - 1)
        return Selection(keep=sorted_topk(scores, k))

    def select_vision(self, ctx):
        return self._pick(ctx.features.float().sum(dim=-1))

    select_projected = select_vision

    def select_llm(self, ctx):
        return self._pick(ctx.attention(torch.tensor([ctx.last])).mean(0)[0][ctx.visual])


def _reference_check(model, family, method_factory, prune_layer, positions="original"):
    sample = one(family, 0)
    inputs = make_inputs(model, [sample])
    with vtprune.pruned(model, method_factory(), positions=positions) as handle:
        seq, logits = greedy(model, inputs)
        stats = handle.stats[0]
    full = dict(inputs)
    full["input_ids"] = seq
    full["attention_mask"] = torch.ones_like(seq)
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = (seq == model.config.image_token_id).int()
    captured = capture_language_model_inputs(model, **full)
    image_columns = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten().tolist()
    prompt_len = inputs["input_ids"].shape[1]
    ref, cols = reference_logits(model, captured, stats.entering_columns[0], stats.kept_columns[0], image_columns,
                                 prompt_len, prune_layer, positions_mode=positions)
    steps = [cols.index(prompt_len - 1 + t) for t in range(logits.shape[1])]
    assert len(stats.kept_columns[0]) < len(image_columns)
    assert (ref[steps] - logits[0]).abs().max() <= 1e-4


POSITIONS = [(f, "original") for f in FAMILIES] + [(f, "contiguous") for f in FAMILIES if f.startswith("llava")]


@pytest.mark.parametrize("family,positions", POSITIONS)
def test_vision_pruning_equals_hand_built_reference(family, positions):
    model = model_of(family)
    _reference_check(model, family, lambda: vtprune.make_method("random", ratio=0.4, seed=3), None, positions)


@pytest.mark.parametrize("family,positions", POSITIONS)
def test_llm_pruning_and_cached_decoding_equal_reference(family, positions):
    model = model_of(family)
    _reference_check(model, family, lambda: vtprune.make_method("fastv", ratio=0.4, layer=2), 2, positions)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["vision", "projected", "llm"])
def test_batch_of_two_equals_each_alone(family, stage):
    model = model_of(family)
    with vtprune.pruned(model, PerImageBudget(stage)) as handle:
        for second_seed in range(5, 15):  # find a second image whose kept count differs
            samples = [one(family, 0, seed=0), one(family, 1, seed=second_seed)]
            batch = make_inputs(model, samples)
            handle.reset_stats()
            seq_b, logits_b = greedy(model, batch)
            kept_batch = [len(c) for c in handle.stats[0].kept_columns]
            if kept_batch[0] != kept_batch[1]:
                break
        assert kept_batch[0] != kept_batch[1]
        assert batch["attention_mask"].min() == 0  # left padding is present
        for i, s in enumerate(samples):
            alone = make_inputs(model, [s])
            seq_a, logits_a = greedy(model, alone)
            assert torch.equal(seq_b[i, -8:], seq_a[0, -8:])
            assert (logits_b[i] - logits_a[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_is_kept_and_remove_restores(family):
    model = model_of(family)
    inputs = make_inputs(model, [one(family, 0)])
    with torch.no_grad():
        before = model(**inputs).logits
    handle = vtprune.apply(model, "fastv", ratio=0.5)
    assert model.config._attn_implementation == "sdpa"
    assert model.model.language_model.layers[1].self_attn.config._attn_implementation == "sdpa"
    with torch.no_grad():
        pruned_logits = model(**inputs).logits
    assert model.model.language_model.layers[1].self_attn.config._attn_implementation == "sdpa"
    handle.remove()
    with torch.no_grad():
        after = model(**inputs).logits
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = len(handle.last.kept_columns[0])
    assert kept < visual
    assert pruned_logits.shape[1] == before.shape[1] - visual + kept  # logits cover the kept tokens
    assert torch.equal(before, after)
    assert "forward" not in model.__dict__


def test_batch_without_image_passes_through():
    model = model_of("llava")
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with vtprune.pruned(model, "random", keep=4) as handle:
            out = model(input_ids=ids).logits
    assert torch.equal(ref, out)
    assert handle.stats == []


def test_stats_report_tokens_and_layer_average():
    model = model_of("llava")
    inputs = make_inputs(model, [one("llava")])
    with vtprune.pruned(model, "fastv", keep=4, layer=2) as handle:
        with torch.no_grad():
            model(**inputs)
    stats = handle.stats[0]
    layers = model.config.text_config.num_hidden_layers
    assert stats.tokens_entering_llm == [16]
    assert stats.llm_stages == {0: {2: 4}}
    assert stats.layer_averaged(layers) == [pytest.approx((16 * 2 + 4 * (layers - 2)) / layers)]
    assert stats.method_seconds > 0
