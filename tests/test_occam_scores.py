"""OccamToken's pure scoring / threshold functions on hand-built attention tensors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.occamtoken import scores as S


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


# -- stage I --------------------------------------------------------------------------------------
def test_stage1_cls_scores_head_mean_and_register_last():
    attn = softmax_rows(torch.randn(4, 10))  # (H, 9 patches + register)
    patches, reg = S.stage1_cls_scores(attn)
    torch.testing.assert_close(patches, attn.mean(0)[:9])
    torch.testing.assert_close(reg, attn.mean(0)[9])
    # already head-averaged input
    p2, r2 = S.stage1_cls_scores(attn.mean(0))
    torch.testing.assert_close(p2, patches)
    torch.testing.assert_close(r2, reg)
    # several register columns: their mean
    _, r3 = S.stage1_cls_scores(attn, num_registers=2)
    torch.testing.assert_close(r3, attn.mean(0)[8:].mean())
    with pytest.raises(ValueError):
        S.stage1_cls_scores(attn[:, :1])


def test_stage1_keep_is_exactly_the_tokens_above_the_register_threshold():
    scores = torch.tensor([0.05, 0.30, 0.10, 0.20, 0.01])
    keep = S.stage1_keep(scores, torch.tensor(0.2), lambda1=1.0)
    assert keep.tolist() == [1, 3]  # >= is inclusive
    assert keep.dtype == torch.long
    assert S.stage1_keep(scores, 0.2, 0.5).tolist() == [1, 2, 3]
    assert S.stage1_keep(scores, 0.2, 0.0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        S.stage1_keep(scores, 0.2, -1.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), lams=st.lists(st.floats(0.0, 4.0), min_size=2, max_size=6))
def test_kept_count_grows_as_lambda_falls(seed, lams):
    g = torch.Generator().manual_seed(seed)
    attn = softmax_rows(torch.randn(4, 50, generator=g) * 3)
    patches, reg = S.stage1_cls_scores(attn)
    counts = [S.stage1_keep(patches, reg, lam).numel() for lam in sorted(lams, reverse=True)]
    assert counts == sorted(counts)  # λ falling -> count non-decreasing
    # and nested: everything kept at a larger λ is kept at a smaller one
    big, small = max(lams), min(lams)
    assert set(S.stage1_keep(patches, reg, big).tolist()) <= set(S.stage1_keep(patches, reg, small).tolist())


def test_budget_adapts_to_the_input():
    # redundant image: attention nearly flat over the patches; detailed image: a few informative patches
    flat_logits = torch.zeros(1, 101)
    peaked_logits = torch.zeros(1, 101)
    peaked_logits[0, :12] = 3.0
    for logits in (flat_logits, peaked_logits):
        logits[0, -1] = 1.0  # the register
    counts = []
    for logits in (flat_logits, peaked_logits):
        patches, reg = S.stage1_cls_scores(softmax_rows(logits))
        counts.append(S.stage1_keep(patches, reg, 0.5).numel())
    assert counts[0] != counts[1]
    assert counts == [0, 12]


def test_planted_sink_outside_the_candidates_never_survives_and_changes_nothing():
    """An attention sink (BOS / CLS column / any non-candidate) soaks up softmax mass. It is never
    returned (indices address the candidates only), and because the register is scored in the same
    softmax, the relative decision does not depend on how much mass the sink took."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 30, generator=g)  # 5 text rows over [sink, 28 visual, register]
    base[:, 29] = 0.8
    visual = torch.arange(1, 29)
    register = 29
    kept = []
    for sink_mass in (0.1, 0.5, 0.9, 0.99):
        rows = base.clone()
        rows[:, 0] = 0.0
        rows = rows / rows.sum(-1, keepdim=True) * (1 - sink_mass)
        rows[:, 0] = sink_mass
        s_v, s_r = S.stage2_scores(rows, visual, register)
        keep = S.stage2_keep(s_v, s_r, 1.0)
        assert keep.max() < visual.numel()  # candidate indices, never the sink position
        kept.append(visual[keep].tolist())
        assert 0 not in kept[-1]
    assert all(k == kept[0] for k in kept) and 0 < len(kept[0]) < 28
    # stage I: the sink column is dropped by the caller before scoring; same invariance
    cls = torch.rand(31, generator=g)
    decisions = []
    for sink_mass in (0.2, 0.95):
        row = cls.clone()
        row[0] = 0
        row = row / row.sum() * (1 - sink_mass)
        p, r = S.stage1_cls_scores(row[1:])
        decisions.append(S.stage1_keep(p, r, 1.0).tolist())
    assert decisions[0] == decisions[1]


def test_sink_patch_absorbed_by_the_register_no_longer_survives():
    """A patch-level sink competes with the informative patches; with the register absorbing it
    (the sink's mass moved to the register column), the sink patch no longer survives."""
    logits = torch.zeros(1, 41)  # 40 patches + register
    logits[0, :5] = 2.0  # informative
    logits[0, 7] = 6.0  # planted sink patch (before registers)
    logits[0, -1] = -5.0
    p, r = S.stage1_cls_scores(softmax_rows(logits))
    assert 7 in S.stage1_keep(p, r, 1.0).tolist()
    absorbed = logits.clone()
    absorbed[0, 7], absorbed[0, -1] = 0.0, 6.0  # the register took over the sink
    p, r = S.stage1_cls_scores(softmax_rows(absorbed))
    keep = S.stage1_keep(p, r, 0.01).tolist()  # λ1 of the order of the paper's 0.015
    assert 7 not in keep and keep == [0, 1, 2, 3, 4]


def test_stage2_scores_max_over_text_mean_for_register():
    rows = torch.zeros(2, 3, 10)  # (H, text rows, L)
    rows[0, 0, 2] = 0.8  # only one word looks at token 2, one head
    rows[:, :, 5] = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])  # register
    visual = torch.tensor([1, 2, 3])
    s_v, s_r = S.stage2_scores(rows, visual, 5)
    torch.testing.assert_close(s_v, torch.tensor([0.0, 0.4, 0.0]))  # head-mean, then max over rows
    torch.testing.assert_close(s_r, torch.tensor(0.2))
    # text_rows selects the query rows; several registers are averaged
    s_v2, _ = S.stage2_scores(rows, visual, 5, text_rows=[1, 2])
    assert s_v2.tolist() == [0.0, 0.0, 0.0]
    rows[:, :, 6] = 0.4
    _, s_r2 = S.stage2_scores(rows, visual, [5, 6])
    torch.testing.assert_close(s_r2, torch.tensor(0.3))
    assert S.stage2_keep(s_v, s_r, 2.0).tolist() == [1]


def test_stage2_lambda_zero_keeps_everything():
    g = torch.Generator().manual_seed(3)
    rows = softmax_rows(torch.randn(4, 6, 50, generator=g))
    visual = torch.arange(3, 40)
    s_v, s_r = S.stage2_scores(rows, visual, 45)
    assert S.stage2_keep(s_v, s_r, 0.0).tolist() == list(range(visual.numel()))


# -- budget matching ------------------------------------------------------------------------------
def _synthetic_counts(n_samples=60, n_tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_samples, n_tokens, generator=g) ** 3
    ref = scores.mean(1) * (0.5 + torch.rand(n_samples, generator=g))

    def count_fn(lam):
        return (scores >= lam * ref[:, None]).sum(1) + 1  # + the register
    return count_fn


@pytest.mark.parametrize("target", [32.0, 64.0, 128.0, 200.5])
def test_calibrate_lambda_hits_target(target):
    count_fn = _synthetic_counts()
    fit = S.calibrate_lambda(count_fn, target, lo=0.0, hi=20.0)
    assert abs(fit.mean - target) <= 1.0
    counts = count_fn(fit.lam).float()
    assert fit.mean == pytest.approx(float(counts.mean()))
    assert fit.std == pytest.approx(float(counts.std(unbiased=False)))
    assert fit.std > 0  # budgets differ per sample


def test_calibrate_lambda_unreachable_targets_return_the_closest_end():
    count_fn = _synthetic_counts()
    lam, mean, _ = S.calibrate_lambda(count_fn, 1000.0, lo=0.0, hi=20.0)
    assert lam == 0.0 and mean == pytest.approx(301.0)
    lam, mean, _ = S.calibrate_lambda(count_fn, 0.0, lo=0.0, hi=20.0)
    assert lam == 20.0 and mean == pytest.approx(1.0)
    with pytest.raises(ValueError):
        S.calibrate_lambda(count_fn, 10, lo=2.0, hi=1.0)
