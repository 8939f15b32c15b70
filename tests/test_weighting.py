"""Token weighting: each scheme against hand-computed weights, validation, and detachment."""

import math

import pytest
import torch

from llada_trm.training.weighting import WeightingConfig, WeightingConfigError, lower_median, token_weights

LOSS = torch.tensor([[1.0, 3.0, 2.0, 2.0], [5.0, 0.5, 9.0, 2.0]])
KEEP = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]]).bool()  # 7 kept tokens; the 9.0 is not kept


def weights(scheme, loss=LOSS, keep=KEEP, **kwargs):
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in WeightingConfig.__dataclass_fields__}
    return token_weights(WeightingConfig(loss_weighting=scheme, **fields), loss, keep, **kwargs)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_none_is_the_keep_mask():
    assert torch.equal(weights("none"), KEEP.float())


def test_topk_keeps_the_lowest_ceil_fraction_with_ties_by_position():
    # Kept CE sorted: 0.5, 1, 2 (row 0 pos 2), 2 (row 0 pos 3), 2 (row 1 pos 3), 3, 5.
    # ceil(0.5 * 7) = 4: 0.5, 1 and the two earliest 2s; the third 2 (later position) is dropped.
    w = weights("topk", topk_keep_ratio=0.5)
    assert w.tolist() == [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    # ceil(0.7 * 7) = ceil(4.9) = 5: all three 2s.
    assert weights("topk", topk_keep_ratio=0.7).tolist() == [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]
    assert weights("topk", topk_keep_ratio=1.0).tolist() == KEEP.float().tolist()


def test_topk_count_uses_decimal_intent():
    loss = torch.arange(10.0).view(1, 10)
    w = weights("topk", loss=loss, keep=torch.ones(1, 10, dtype=torch.bool), topk_keep_ratio=0.7)
    assert w.tolist() == [[1.0] * 7 + [0.0] * 3]  # 0.7 * 10 is 7.000000000000001 in floating point
    one = weights("topk", loss=loss, keep=torch.ones(1, 10, dtype=torch.bool), topk_keep_ratio=0.01)
    assert one.sum().item() == 1 and one[0, 0].item() == 1  # at least one token is kept


def test_topk_never_selects_a_non_kept_token_even_with_extreme_losses():
    loss = torch.tensor([[float("inf"), 0.0, float("inf")]])
    keep = torch.tensor([[True, False, True]])
    assert weights("topk", loss=loss, keep=keep, topk_keep_ratio=0.5).tolist() == [[1.0, 0.0, 0.0]]


def test_antiop_even_count_uses_the_lower_median():
    # Kept CE: 1, 3, 2, 2, 5, 0.5, 2 -> sorted 0.5 1 2 2 2 3 5, median 2; cap = 1.25 * 2 = 2.5.
    w = weights("antiop", antiop_clip_mult=1.25)
    close(w, [[1.0, 2.5 / 3.0, 1.0, 1.0], [0.5, 1.0, 0.0, 1.0]])
    # Even count: 1, 2, 3, 4 -> lower median 2 (not 2.5); cap = 1.5 * 2 = 3.
    loss = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    w = weights("antiop", loss=loss, keep=torch.ones(1, 4, dtype=torch.bool), antiop_clip_mult=1.5)
    assert w.tolist() == [[0.75, 1.0, 1.0, 1.0]]
    assert lower_median(torch.tensor([4.0, 1.0, 3.0, 2.0])).item() == torch.tensor([4.0, 1.0, 3.0, 2.0]).median().item()


def test_antiop_zero_median_and_nothing_kept():
    loss = torch.tensor([[0.0, 0.0, 0.0, 4.0]])
    keep = torch.ones(1, 4, dtype=torch.bool)
    assert weights("antiop", loss=loss, keep=keep).tolist() == [[1.0, 1.0, 1.0, 0.0]]
    nothing = torch.zeros(1, 4, dtype=torch.bool)
    assert weights("antiop", loss=loss, keep=nothing).tolist() == [[0.0] * 4]


def test_lr_weights_by_hand():
    loss = torch.zeros(1, 3)
    keep = torch.tensor([[True, True, False]])
    p = torch.tensor([[0.5, 0.9, 0.5]])
    p_ref = torch.tensor([[0.7, 0.1, 0.9]])
    w = weights("lr", loss=loss, keep=keep, label_prob=p, ref_label_prob=p_ref)
    close(w, [[1.2, 0.2, 0.0]])
    w = weights("lr", loss=loss, keep=keep, label_prob=p, ref_label_prob=p_ref, lr_weight_alpha=2.0)
    close(w, [[1.4, 0.1, 0.0]])  # 1 + 2 * (0.1 - 0.9) = -0.6 -> floor 0.1


def test_lr_default_label_prob_is_exp_of_minus_ce():
    loss = torch.tensor([[math.log(2.0)]])  # p = 0.5
    w = weights("lr", loss=loss, keep=torch.ones(1, 1, dtype=torch.bool), ref_label_prob=torch.tensor([[0.75]]))
    assert w.item() == pytest.approx(1.25)


def test_lr_without_reference_is_an_error():
    with pytest.raises(WeightingConfigError, match="frozen"):
        WeightingConfig(loss_weighting="lr").validate(has_frozen_reference=False)
    WeightingConfig(loss_weighting="lr").validate(has_frozen_reference=True)
    with pytest.raises(WeightingConfigError, match="ref_label_prob"):
        weights("lr")


def test_dft_is_the_label_probability():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    close(weights("dft", label_prob=p), [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.0, 0.8]])
    close(weights("dft"), torch.where(KEEP, (-LOSS).exp(), 0.0).tolist())


@pytest.mark.parametrize("scheme", ["none", "topk", "antiop", "lr", "dft"])
def test_weights_carry_no_gradient_and_are_zero_outside_kept(scheme):
    loss = LOSS.clone().requires_grad_(True)
    p = (-loss).exp()  # attached to the graph, as the real label probability would be
    w = token_weights(WeightingConfig(loss_weighting=scheme), loss, KEEP, label_prob=p, ref_label_prob=p * 0.5)
    assert not w.requires_grad and w.grad_fn is None
    assert w.shape == LOSS.shape
    assert (w[~KEEP] == 0).all()


@pytest.mark.parametrize(
    "fields,flag",
    [
        ({"loss_weighting": "focal"}, "--loss_weighting"),
        ({"topk_keep_ratio": 0.0}, "--topk_keep_ratio"),
        ({"topk_keep_ratio": 1.5}, "--topk_keep_ratio"),
        ({"antiop_clip_mult": 0.0}, "--antiop_clip_mult"),
        ({"antiop_clip_mult": float("inf")}, "--antiop_clip_mult"),
        ({"lr_weight_alpha": -1.0}, "--lr_weight_alpha"),
        ({"lr_weight_alpha": float("nan")}, "--lr_weight_alpha"),
    ],
)
def test_invalid_settings_name_the_flag(fields, flag):
    with pytest.raises(WeightingConfigError, match=flag) as info:
        WeightingConfig(**fields).validate(has_frozen_reference=True)
    assert isinstance(info.value, ValueError)


def test_unknown_scheme_is_rejected_at_use_too():
    with pytest.raises(WeightingConfigError, match="none, topk, antiop, lr, dft"):
        weights("focal")


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        token_weights(WeightingConfig(), torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
