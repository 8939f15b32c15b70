"""Token-level truncation: worked examples, hand cases, properties, a per-sequence reference, config, logging."""

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llada_trm.training.truncation import (
    TRUNCATION_PRESETS,
    TruncationConfig,
    TruncationConfigError,
    linear_quantile,
    truncation_decisions,
    truncation_keep_mask,
)
from llada_trm.training.truncation_log import TruncationLogger, truncation_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "truncation.md"


def on(**fields) -> TruncationConfig:
    return TruncationConfig(enable=True, **fields)


def decide(losses, cfg, valid=None, generator=None):
    loss = torch.tensor(losses, dtype=torch.float32)
    if loss.dim() == 1:
        loss = loss.unsqueeze(0)
    valid = torch.ones_like(loss, dtype=torch.bool) if valid is None else torch.tensor(valid).view_as(loss).bool()
    return truncation_decisions(loss, valid, cfg, generator), valid


def masked_positions(decision, valid, row=0):
    return (valid[row] & ~decision.keep[row]).nonzero().flatten().tolist()


# --- worked examples (docs/architecture.md §10) -----------------------------------------------------------------------


def test_worked_example_prefix_protection():
    cfg = on(threshold=4.0, min_high_run=2, include_trigger=True, min_prefix_tokens=3)
    d, valid = decide([0.1, 0.2, 5.0, 5.1, 0.3], cfg)
    assert d.trigger.tolist() == [2]
    assert d.start.tolist() == [3]
    assert masked_positions(d, valid) == [3, 4]
    assert d.masked_count.tolist() == [2]


def test_worked_example_max_mask_ratio():
    d, valid = decide([9.0] * 10, on(threshold=4.0, max_mask_ratio=0.5))
    assert d.trigger.tolist() == [0]
    assert d.start.tolist() == [5]
    assert masked_positions(d, valid) == [5, 6, 7, 8, 9]


# --- hand-computed cases ----------------------------------------------------------------------------------


def test_include_trigger_false_starts_after_trigger():
    d, valid = decide([0.1, 3.0, 0.2, 0.1], on(include_trigger=False))
    assert d.trigger.tolist() == [1]
    assert masked_positions(d, valid) == [2, 3]


def test_min_high_run_longer_than_any_run_masks_nothing():
    d, valid = decide([3.0, 3.0, 0.0, 3.0, 3.0], on(min_high_run=3))
    assert d.trigger.tolist() == [-1]
    assert d.start.tolist() == [5]
    assert d.keep.all()


def test_min_high_run_finds_first_long_enough_run():
    d, valid = decide([3.0, 0.0, 3.0, 3.0, 3.0, 0.0], on(min_high_run=3))
    assert d.trigger.tolist() == [2]
    assert masked_positions(d, valid) == [2, 3, 4, 5]


def test_start_at_or_past_valid_len_masks_nothing():
    d, _ = decide([0.0, 0.0, 0.0, 5.0], on(min_prefix_tokens=10))
    assert (d.trigger.tolist(), d.start.tolist(), d.masked_count.tolist()) == ([3], [4], [0])
    d, _ = decide([0.0, 0.0, 0.0, 5.0], on(include_trigger=False))  # start = trigger + 1 = valid_len
    assert (d.trigger.tolist(), d.start.tolist(), d.masked_count.tolist()) == ([3], [4], [0])
    assert d.keep.all()


def test_absolute_threshold_is_strict_and_exact():
    d, _ = decide([0.5, 2.0, 0.5], on(threshold=2.0))
    assert d.trigger.tolist() == [-1]
    # float32(0.1) is slightly above 0.1, so it is high for threshold 0.1 (compared in float64).
    d, _ = decide([0.0, 0.1], on(threshold=0.1))
    assert d.trigger.tolist() == [1]


def test_max_mask_ratio_uses_decimal_intent():
    d, _ = decide([9.0] * 10, on(max_mask_ratio=0.7))
    assert d.start.tolist() == [3] and d.masked_count.tolist() == [7]


def test_mask_high_only():
    d, valid = decide([5.0, 0.0, 5.0, 0.0, 5.0], on(mask_mode="mask_high_only", min_prefix_tokens=1))
    assert masked_positions(d, valid) == [2, 4]
    assert d.trigger.tolist() == [0]  # the first high token, even inside the protected prefix
    assert d.start.tolist() == [2]


def test_ratio_batch_scope():
    # Row 0: valid losses 1..4; row 1: 5..10; padding (invalid) carries huge losses that must not count.
    loss = [[1, 2, 3, 4, 99, 99], [5, 6, 7, 8, 9, 10]]
    valid = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    cfg = on(threshold_mode="ratio", ratio=0.25, ratio_scope="batch", mask_mode="mask_high_only")
    d, v = decide(loss, cfg, valid)
    # 10 values, rank 0.75 * 9 = 6.75 -> lerp(7, 8, 0.75) = 7.75; high: 8, 9, 10.
    assert d.threshold.tolist() == [7.75, 7.75]
    assert masked_positions(d, v, 0) == []
    assert masked_positions(d, v, 1) == [3, 4, 5]
    assert torch.quantile(torch.arange(1.0, 11.0), 0.75).item() == 7.75


def test_ratio_sequence_scope():
    loss = [[1, 2, 3, 4, 99, 99], [5, 6, 7, 8, 9, 10]]
    valid = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    cfg = on(threshold_mode="ratio", ratio=0.25, ratio_scope="sequence")
    d, v = decide(loss, cfg, valid)
    # Row 0: rank 0.75 * 3 = 2.25 -> 3.25 (high: 4); row 1: rank 3.75 -> lerp(8, 9, 0.75) = 8.75 (high: 9, 10).
    assert d.threshold.tolist() == [3.25, 8.75]
    assert d.trigger.tolist() == [3, 4]
    assert masked_positions(d, v, 0) == [3]
    assert masked_positions(d, v, 1) == [4, 5]


def test_ratio_one_makes_every_token_high():
    d, _ = decide([[0.3, 0.1, 0.2]], on(threshold_mode="ratio", ratio=1.0, mask_mode="mask_high_only"))
    assert d.threshold.tolist() == [pytest.approx(0.1)]
    assert d.masked_count.tolist() == [3]


def test_non_contiguous_valid_positions_and_padding():
    # Valid order: [0.1, 3.0, 3.0, 0.1]; the padding between the two highs does not break the run.
    loss = [0.1, 99.0, 3.0, 99.0, 3.0, 0.1, 99.0]
    valid = [1, 0, 1, 0, 1, 1, 0]
    d, v = decide(loss, on(min_high_run=2), valid)
    assert d.trigger.tolist() == [1]
    assert d.start.tolist() == [1]
    assert d.keep[0].tolist() == [True, False, False, False, False, False, False]
    assert masked_positions(d, v) == [2, 4, 5]
    m = truncation_metrics(torch.tensor([loss]), v, d.keep)
    assert m["truncation/batch_ratio"] == pytest.approx(3 / 4)
    assert m["truncation/raw_loss"] == pytest.approx((0.1 + 3.0 + 3.0 + 0.1) / 4)


def test_row_without_valid_tokens():
    loss = [[5.0, 5.0, 5.0], [0.0, 5.0, 0.0]]
    valid = [[0, 0, 0], [1, 1, 1]]
    for cfg in (on(), on(threshold_mode="ratio", ratio_scope="sequence"), on(mask_mode="mask_random")):
        d, v = decide(loss, cfg, valid, torch.Generator().manual_seed(0))
        assert d.keep[0].tolist() == [False, False, False]
        assert (d.trigger[0].item(), d.start[0].item(), d.masked_count[0].item()) == (-1, 0, 0)


def test_disabled_keeps_exactly_the_valid_positions():
    valid = torch.tensor([[True, False, True], [False, False, True]])
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    d = truncation_decisions(torch.full((2, 3), 50.0), valid, TruncationConfig(mask_mode="mask_random"), g)
    assert torch.equal(d.keep, valid)
    assert d.trigger.tolist() == [-1, -1] and d.start.tolist() == [2, 1] and d.masked_count.tolist() == [0, 0]
    assert torch.equal(g.get_state(), state)


def test_keep_mask_matches_decision_and_loss_is_detached():
    loss = torch.tensor([[0.1, 3.0, 0.2]], requires_grad=True)
    valid = torch.ones(1, 3, dtype=torch.bool)
    keep = truncation_keep_mask(loss * 2, valid, on())
    assert keep.tolist() == [[True, False, False]]
    assert not keep.requires_grad


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        truncation_decisions(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), on())


def test_linear_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(6, 11, generator=g) * 5
    counts = torch.tensor([1, 2, 5, 7, 11, 0])
    padded = torch.where(torch.arange(11) < counts.unsqueeze(1), values, torch.tensor(float("inf")))
    for q in (0.0, 0.1, 0.5, 0.9, 1 - 0.1, 1 - 0.3, 1.0):
        got = linear_quantile(padded, counts, q)
        for r in range(5):
            assert got[r].item() == torch.quantile(values[r, : counts[r]], q).item()
        assert math.isnan(got[5].item())


# --- a plain per-sequence reference and properties --------------------------------------------------------


def reference_masked(loss, valid, cfg, draws=None):
    """Per-row list of masked valid indices i, written straight from docs/architecture.md §10 with Python loops."""
    rows = [[(l, j) for j, (l, ok) in enumerate(zip(lr, vr)) if ok] for lr, vr in zip(loss.tolist(), valid.tolist())]
    if not cfg.enable:
        return [[] for _ in rows]

    def quantile(values):  # torch.quantile is the reference for the linear interpolation
        return torch.quantile(torch.tensor(values), 1 - cfg.ratio).item() if values else None

    batch_q = quantile([l for row in rows for l, _ in row])
    result = []
    for b, row in enumerate(rows):
        n = len(row)
        if cfg.threshold_mode == "absolute":
            high = [l > cfg.threshold for l, _ in row]
        else:
            t = batch_q if cfg.ratio_scope == "batch" else quantile([l for l, _ in row])
            high = [t is not None and l >= t for l, _ in row]
        p = cfg.min_prefix_tokens
        if cfg.mask_mode == "mask_random":
            masked = [i for i, (_, j) in enumerate(row) if i >= p and draws[b][j] < cfg.random_ratio]
        elif cfg.mask_mode == "mask_high_only":
            masked = [i for i in range(n) if high[i] and i >= p]
        else:
            r = cfg.min_high_run
            trigger = next((i for i in range(n - r + 1) if all(high[i : i + r])), None)
            masked = []
            if trigger is not None:
                start = trigger if cfg.include_trigger else trigger + 1
                start = max(start, p, math.ceil(n * (1 - cfg.max_mask_ratio) - 1e-9))
                masked = list(range(start, n))
        result.append(masked)
    return result


def implementation_masked(decision, valid):
    out = []
    for keep_row, valid_row in zip(decision.keep.tolist(), valid.tolist()):
        kept_valid = [k for k, ok in zip(keep_row, valid_row) if ok]
        out.append([i for i, k in enumerate(kept_valid) if not k])
    return out


LOSS_VALUES = st.one_of(
    st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.9999, 2.0, 2.0001, 3.0, 5.0]),
    st.floats(0.0, 8.0, width=32),
)


@st.composite
def batches(draw):
    b = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    loss = draw(st.lists(st.lists(LOSS_VALUES, min_size=length, max_size=length), min_size=b, max_size=b))
    valid = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=b, max_size=b))
    return torch.tensor(loss, dtype=torch.float32), torch.tensor(valid)


@st.composite
def configs(draw, mask_modes=("after_first_high", "mask_high_only", "mask_random")):
    return TruncationConfig(
        enable=draw(st.booleans()) or draw(st.booleans()),  # enabled 3 times in 4
        threshold_mode=draw(st.sampled_from(["absolute", "ratio"])),
        threshold=draw(st.sampled_from([0.1, 1.0, 2.0, 3.0])),
        ratio=draw(st.sampled_from([0.05, 0.1, 0.3, 0.5, 1.0])),
        ratio_scope=draw(st.sampled_from(["batch", "sequence"])),
        mask_mode=draw(st.sampled_from(mask_modes)),
        include_trigger=draw(st.booleans()),
        min_prefix_tokens=draw(st.integers(0, 6)),
        max_mask_ratio=draw(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(0.01, 1.0)),
        min_high_run=draw(st.integers(1, 4)),
        random_ratio=draw(st.sampled_from([0.1, 0.5, 1.0])),
    )


@settings(deadline=None, max_examples=150)
@given(batch=batches(), cfg=configs(), seed=st.integers(0, 2**31 - 1))
def test_vectorised_equals_per_sequence_reference(batch, cfg, seed):
    loss, valid = batch
    d = truncation_decisions(loss, valid, cfg, torch.Generator().manual_seed(seed))
    draws = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)).tolist()
    expected = reference_masked(loss, valid, cfg, draws)
    assert implementation_masked(d, valid) == expected
    assert d.masked_count.tolist() == [len(m) for m in expected]
    valid_len = valid.sum(dim=1).tolist()
    assert d.start.tolist() == [m[0] if m else n for m, n in zip(expected, valid_len)]


@settings(deadline=None, max_examples=100)
@given(batch=batches(), cfg=configs(), seed=st.integers(0, 2**31 - 1))
def test_properties_all_modes(batch, cfg, seed):
    loss, valid = batch
    d = truncation_decisions(loss, valid, cfg, torch.Generator().manual_seed(seed))
    assert not (d.keep & ~valid).any()  # kept is a subset of valid
    rank = valid.long().cumsum(dim=1) - 1
    prefix = valid & (rank < cfg.min_prefix_tokens)
    assert d.keep[prefix].all()
    assert torch.equal(d.masked_count, (valid & ~d.keep).sum(dim=1))


@settings(deadline=None, max_examples=100)
@given(batch=batches(), cfg=configs(mask_modes=("after_first_high",)))
def test_after_first_high_masks_a_bounded_suffix(batch, cfg):
    loss, valid = batch
    d = truncation_decisions(loss, valid, cfg)
    for masked, n in zip(implementation_masked(d, valid), valid.sum(dim=1).tolist()):
        assert len(masked) <= n - math.ceil(n * (1 - cfg.max_mask_ratio) - 1e-9)
        assert masked == list(range(n - len(masked), n))  # a suffix of the valid positions


def test_mask_random_is_reproducible_and_has_the_right_rate():
    loss = torch.zeros(32, 512)
    valid = torch.rand(32, 512, generator=torch.Generator().manual_seed(1)) < 0.8
    for p in (0.1, 0.5):
        cfg = on(mask_mode="mask_random", random_ratio=p, min_prefix_tokens=16)
        a = truncation_decisions(loss, valid, cfg, torch.Generator().manual_seed(7))
        b = truncation_decisions(loss, valid, cfg, torch.Generator().manual_seed(7))
        c = truncation_decisions(loss, valid, cfg, torch.Generator().manual_seed(8))
        assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, c.keep)
        rank = valid.long().cumsum(dim=1) - 1
        eligible = valid & (rank >= 16)
        rate = (eligible & ~a.keep).sum().item() / eligible.sum().item()
        n = eligible.sum().item()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)


# --- metrics ----------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 7.0, 7.0], [9.0, 9.0, 9.0, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    m = truncation_metrics(loss, valid, keep)
    assert set(m) == {
        "truncation/batch_ratio", "truncation/mean_seq_ratio", "truncation/max_seq_ratio",
        "truncation/truncated_seqs", "truncation/raw_loss", "truncation/raw_ppl",
    }
    assert m["truncation/batch_ratio"] == pytest.approx(2 / 6)
    assert m["truncation/mean_seq_ratio"] == pytest.approx((0.5 + 0.0) / 2)  # the empty row does not count
    assert m["truncation/max_seq_ratio"] == pytest.approx(0.5)
    assert m["truncation/truncated_seqs"] == 1
    assert m["truncation/raw_loss"] == pytest.approx(12 / 6)
    assert m["truncation/raw_ppl"] == pytest.approx(math.exp(2.0))


def test_metrics_without_valid_tokens_are_not_nan():
    m = truncation_metrics(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    assert all(math.isfinite(v) for v in m.values())
    assert m["truncation/raw_ppl"] == 1.0


# --- configuration ----------------------------------------------------------------------------------------


FULL_ENV = {
    "TRUNCATION_ENABLE": "yes",
    "TRUNCATION_THRESHOLD_MODE": "Ratio",
    "TRUNCATION_THRESHOLD": "3.5",
    "TRUNCATION_RATIO": "0.2",
    "TRUNCATION_RATIO_SCOPE": "sequence",
    "TRUNCATION_MASK_MODE": "mask_high_only",
    "TRUNCATION_INCLUDE_TRIGGER": "0",
    "TRUNCATION_MIN_PREFIX_TOKENS": "16",
    "TRUNCATION_MAX_MASK_RATIO": "0.5",
    "TRUNCATION_MIN_HIGH_RUN": "3",
    "TRUNCATION_RANDOM_RATIO": "0.25",
    "TRUNCATION_LOG_EVERY_N_STEPS": "10",
    "TRUNCATION_LOG_DETAILED": "TRUE",
    "TRUNCATION_LOG_DETAILED_EVERY_N_STEPS": "20",
    "TRUNCATION_DEBUG": " no ",
    "PATH": "/usr/bin",  # unrelated variables are ignored
}


def test_defaults_and_every_variable_read():
    assert TruncationConfig.from_env({}) == TruncationConfig()
    assert TruncationConfig.from_env(FULL_ENV) == TruncationConfig(
        enable=True, threshold_mode="ratio", threshold=3.5, ratio=0.2, ratio_scope="sequence",
        mask_mode="mask_high_only", include_trigger=False, min_prefix_tokens=16, max_mask_ratio=0.5,
        min_high_run=3, random_ratio=0.25, log_every_n_steps=10, log_detailed=True,
        log_detailed_every_n_steps=20, debug=False,
    )


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("Yes", True), ("1", True),
                                        ("false", False), ("No", False), ("0", False), (" yes ", True)])
def test_boolean_spellings(text, value):
    assert TruncationConfig.from_env({"TRUNCATION_ENABLE": text}).enable is value


@pytest.mark.parametrize(
    "var,value,allowed",
    [
        ("TRUNCATION_ENABLE", "maybe", "true/false/1/0/yes/no"),
        ("TRUNCATION_DEBUG", "2", "true/false/1/0/yes/no"),
        ("TRUNCATION_LOG_DETAILED", "", "true/false/1/0/yes/no"),
        ("TRUNCATION_THRESHOLD_MODE", "abs", "absolute, ratio"),
        ("TRUNCATION_RATIO_SCOPE", "global", "batch, sequence"),
        ("TRUNCATION_MASK_MODE", "truncate", "after_first_high, mask_high_only, mask_random"),
        ("TRUNCATION_RATIO", "0", "(0, 1]"),
        ("TRUNCATION_RATIO", "1.5", "(0, 1]"),
        ("TRUNCATION_RANDOM_RATIO", "-0.1", "(0, 1]"),
        ("TRUNCATION_MAX_MASK_RATIO", "0", "(0, 1]"),
        ("TRUNCATION_MIN_PREFIX_TOKENS", "-1", ">= 0"),
        ("TRUNCATION_MIN_PREFIX_TOKENS", "3.5", "integer"),
        ("TRUNCATION_MIN_HIGH_RUN", "0", ">= 1"),
        ("TRUNCATION_LOG_EVERY_N_STEPS", "0", ">= 1"),
        ("TRUNCATION_LOG_DETAILED_EVERY_N_STEPS", "often", "integer"),
        ("TRUNCATION_THRESHOLD", "abc", "number"),
        ("TRUNCATION_THRESHOLD", "nan", "finite"),
        ("TRUNCATION_THRESHOLD", "inf", "finite"),
        ("TRUNCATION_RATIO", "ten percent", "number"),
    ],
)
def test_invalid_environment_values_name_the_variable(var, value, allowed):
    with pytest.raises(TruncationConfigError) as info:
        TruncationConfig.from_env({var: value})
    assert var in str(info.value) and allowed in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_truncation_variable_is_rejected():
    with pytest.raises(TruncationConfigError) as info:
        TruncationConfig.from_env({"TRUNCATION_THRESHOLD_MOD": "ratio"})
    assert "unknown environment variable TRUNCATION_THRESHOLD_MOD " in str(info.value)
    assert "TRUNCATION_THRESHOLD_MODE" in str(info.value)


def test_override_beats_environment():
    env = {"TRUNCATION_ENABLE": "1", "TRUNCATION_THRESHOLD": "3.0", "TRUNCATION_MASK_MODE": "mask_random"}
    cfg = TruncationConfig.from_env(env, {"threshold": 1.5, "truncation_mask_mode": "mask_high_only", "enable": None})
    assert (cfg.enable, cfg.threshold, cfg.mask_mode) == (True, 1.5, "mask_high_only")
    assert TruncationConfig.from_env(env, {"min_prefix_tokens": "8"}).min_prefix_tokens == 8


def test_bad_override_names_the_flag():
    with pytest.raises(TruncationConfigError, match=r"--truncation_threshold_mode must be one of absolute, ratio"):
        TruncationConfig.from_env({"TRUNCATION_THRESHOLD_MODE": "ratio"}, {"threshold_mode": "quantile"})
    with pytest.raises(TruncationConfigError, match=r"--truncation_ratio must be in \(0, 1\]"):
        TruncationConfig.from_env({}, {"ratio": 2.0})
    with pytest.raises(TruncationConfigError, match=r"--truncation_enable must be a boolean"):
        TruncationConfig.from_env({}, {"enable": "sometimes"})
    with pytest.raises(TruncationConfigError, match=r"unknown flag --truncation_treshold"):
        TruncationConfig.from_env({}, {"treshold": 1.0})


def test_direct_construction_is_validated():
    with pytest.raises(TruncationConfigError, match="TRUNCATION_MASK_MODE"):
        TruncationConfig(mask_mode="everything")
    with pytest.raises(TruncationConfigError, match="TRUNCATION_MIN_HIGH_RUN"):
        TruncationConfig(min_high_run=0)


EXPECTED_PRESETS = {
    "baseline": TruncationConfig(enable=False),
    "A1": on(threshold_mode="absolute", threshold=2.0, mask_mode="after_first_high"),
    "A1b": on(threshold=2.0, include_trigger=False),
    "A2": on(threshold=2.0, min_prefix_tokens=32, max_mask_ratio=0.5, min_high_run=2),
    "A3": on(threshold_mode="ratio", ratio=0.1, min_prefix_tokens=32, max_mask_ratio=0.5, min_high_run=2),
    "A4": on(threshold=2.0, mask_mode="mask_high_only", min_prefix_tokens=32),
    "A5": on(mask_mode="mask_random", random_ratio=0.1, min_prefix_tokens=32),
}


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_presets_give_the_ladder_configs(name):
    assert set(TRUNCATION_PRESETS) == set(EXPECTED_PRESETS)
    assert TruncationConfig.from_preset(name, environ={}) == EXPECTED_PRESETS[name]
    assert TruncationConfig.from_preset(name.lower(), environ={}) == EXPECTED_PRESETS[name]


def test_preset_precedence_flag_over_preset_over_environment():
    env = {"TRUNCATION_THRESHOLD": "3.0", "TRUNCATION_LOG_DETAILED": "true", "TRUNCATION_LOG_EVERY_N_STEPS": "5"}
    with pytest.warns(UserWarning, match="TRUNCATION_THRESHOLD"):
        cfg = TruncationConfig.from_preset("A2", environ=env)
    assert cfg.threshold == 2.0  # preset beats the environment
    assert cfg.log_detailed and cfg.log_every_n_steps == 5  # logging still comes from the environment
    with pytest.warns(UserWarning):
        cfg = TruncationConfig.from_preset("A2", environ=env, overrides={"threshold": 2.5, "min_prefix_tokens": None})
    assert cfg.threshold == 2.5 and cfg.min_prefix_tokens == 32  # a given flag beats the preset
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an environment value equal to the preset's is not worth a warning
        TruncationConfig.from_preset("A2", environ={"TRUNCATION_ENABLE": "1", "TRUNCATION_THRESHOLD": "2"})


def test_preset_errors():
    with pytest.raises(TruncationConfigError) as info:
        TruncationConfig.from_preset("A9", environ={})
    assert "A9" in str(info.value) and all(name in str(info.value) for name in TRUNCATION_PRESETS)
    with pytest.raises(TruncationConfigError, match="TRUNCATION_ENABLED"):
        TruncationConfig.from_preset("A1", environ={"TRUNCATION_ENABLED": "1"})


def test_describe_and_to_dict():
    cfg = EXPECTED_PRESETS["A3"]
    text = cfg.describe()
    assert text.splitlines()[0].startswith("Token-level truncation: enabled")
    assert "TRUNCATION_MIN_HIGH_RUN" in text and "= 2" in text
    assert TruncationConfig(**cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["threshold_mode"] == "ratio"
    assert "disabled" in TruncationConfig().describe().splitlines()[0]


def test_documented_commands_match_the_presets():
    """Each ladder block in docs/truncation.md: its environment form equals its preset form."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    seen = set()
    for block in blocks:
        preset = re.search(r"--truncation_preset (\w+)", block)
        if not preset:
            continue
        env_lines = [line for line in block.splitlines() if line.startswith("TRUNCATION_")]
        assert len(env_lines) == 1, block
        assignments = env_lines[0].split(" python ")[0].split()
        env = dict(a.split("=", 1) for a in assignments)
        assert TruncationConfig.from_env(env) == TruncationConfig.from_preset(preset.group(1), environ={})
        seen.add(preset.group(1))
    assert seen == set(TRUNCATION_PRESETS)
    text = DOC.read_text()
    if "Measured ladder" in text:  # a measured section must name the command that produced it
        assert "python -m llada_trm.ablate" in text.split("Measured ladder", 1)[1]


# --- logger -----------------------------------------------------------------------------------------------


def logged_batch(cfg):
    loss = torch.tensor([[0.1, 3.0, 0.2, 0.0], [0.1, 0.1, 0.1, 9.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    return truncation_decisions(loss, valid, cfg), loss, valid


def test_logger_main_process_writes_detailed_records(tmp_path, capsys):
    cfg = on(log_every_n_steps=2, log_detailed=True, log_detailed_every_n_steps=3)
    decision, loss, valid = logged_batch(cfg)
    logger = TruncationLogger(tmp_path / "run", cfg, is_main_process=True)
    results = {step: logger.maybe_log(step, decision, torch.tensor([11, 12]), loss, valid) for step in (1, 2, 3, 6)}
    assert results[1] is None and results[3] is None
    assert results[2]["truncation/batch_ratio"] == pytest.approx(3 / 7)
    assert results[2]["truncation/truncated_seqs"] == 2
    lines = (tmp_path / "run" / "truncation_detailed.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 3, 6, 6]
    assert records[0] == {"step": 3, "sample_id": 11, "valid_len": 3, "trigger": 1, "start": 1,
                          "masked_count": 2, "threshold": 2.0}
    assert records[1] == {"step": 3, "sample_id": 12, "valid_len": 4, "trigger": 3, "start": 3,
                          "masked_count": 1, "threshold": 2.0}
    assert capsys.readouterr().out == ""  # no debug output unless asked


def test_logger_other_processes_write_and_print_nothing(tmp_path, capsys):
    cfg = on(log_every_n_steps=1, log_detailed=True, log_detailed_every_n_steps=1, debug=True)
    decision, loss, valid = logged_batch(cfg)
    logger = TruncationLogger(tmp_path, cfg, is_main_process=False)
    metrics = logger.maybe_log(1, decision, ["a", "b"], loss, valid)
    assert metrics is not None  # every process gets the numbers; only the main one writes them
    assert not (tmp_path / "truncation_detailed.jsonl").exists()
    assert capsys.readouterr().out == ""


def test_logger_debug_prints_one_line_per_sequence(tmp_path, capsys):
    cfg = on(debug=True)
    decision, loss, valid = logged_batch(cfg)
    TruncationLogger(tmp_path, cfg, is_main_process=True).maybe_log(7, decision, ["a", "b"], loss, valid)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "sample a" in out[0] and "trigger=1" in out[0] and "masked=2" in out[0]
    assert not (tmp_path / "truncation_detailed.jsonl").exists()


def test_logger_writes_null_threshold_for_mask_random(tmp_path):
    cfg = on(mask_mode="mask_random", log_detailed=True, log_detailed_every_n_steps=1)
    decision, loss, valid = logged_batch(cfg)
    TruncationLogger(tmp_path, cfg, is_main_process=True).maybe_log(1, decision, [0, 1], loss, valid)
    records = [json.loads(line) for line in (tmp_path / "truncation_detailed.jsonl").read_text().splitlines()]
    assert [r["threshold"] for r in records] == [None, None]
    assert [r["trigger"] for r in records] == [-1, -1]
