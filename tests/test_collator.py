"""Whole-chunk masking collator: layout invariants, mask draw purity, empirical mask rate, padding, arguments."""

import hashlib
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llada_trm.data.collator import ChunkMaskingCollator, draw_masked_chunks, mask_seed, pad_batch
from llada_trm.data.dataset import layout_sample

PAD = EOS = 1
MASK = 2
FAST = settings(max_examples=50, deadline=None)


def make_feature(prompt_len: int, reasoning_len: int, chunk_size: int, sample_id: int, max_length: int = 9999) -> dict:
    """A prepared sample with token ids >= 10 (never pad, EOS or mask) in prompt and reasoning."""
    rng = random.Random(sample_id)
    prompt = [rng.randrange(10, 100) for _ in range(prompt_len)]
    reasoning = [rng.randrange(10, 100) for _ in range(reasoning_len)]
    feature = layout_sample(prompt, reasoning, chunk_size=chunk_size, max_length=max_length,
                            pad_token_id=PAD, eos_token_id=EOS)
    return dict(feature, sample_id=sample_id)


samples = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 60)), min_size=1, max_size=6)


@FAST
@given(samples, st.sampled_from([1, 2, 3, 4, 8, 16]), st.floats(0.01, 1.0), st.integers(0, 2**31), st.integers(0, 5))
def test_masking_invariants(lengths, chunk_size, probability, seed, epoch):
    features = [make_feature(p, r, chunk_size, i) for i, (p, r) in enumerate(lengths)]
    collator = ChunkMaskingCollator(MASK, PAD, chunk_size=chunk_size, mask_probability=probability, seed=seed)
    collator.set_epoch(epoch)
    batch = collator(features)
    width = batch["input_ids"].shape[1]
    assert width % chunk_size == 0
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids, labels, chunk_index = batch["input_ids"][row], batch["labels"][row], batch["chunk_index"][row]
        original = torch.tensor(feature["input_ids"])
        reasoning = chunk_index >= 0
        start = int(reasoning.nonzero()[0])
        assert start % chunk_size == 0, "reasoning starts on a chunk boundary"
        assert bool(reasoning[start:n].all()) and not bool(reasoning[n:].any())
        # labels: -100 exactly outside the reasoning region, ground truth inside (masked or not)
        assert bool((labels[~reasoning] == -100).all())
        assert torch.equal(labels[start:n], original[start:n])
        # prompt and pads never masked, batch padding is whole pad chunks
        assert torch.equal(ids[:start], original[:start])
        assert bool((ids[n:] == PAD).all()) and bool((batch["attention_mask"][row, n:] == 0).all())
        assert int(batch["attention_mask"][row, :start].sum()) == feature["prompt_length"]
        # each chunk entirely mask tokens or entirely ground truth, matching chunk_is_masked
        num_chunks = feature["num_chunks"]
        assert int(batch["num_chunks"][row]) == num_chunks
        for k in range(num_chunks):
            chunk = slice(start + k * chunk_size, start + (k + 1) * chunk_size)
            if batch["chunk_is_masked"][row, k]:
                assert bool((ids[chunk] == MASK).all())
            else:
                assert torch.equal(ids[chunk], original[chunk])
        assert not bool(batch["chunk_is_masked"][row, num_chunks:].any())
        assert bool(batch["chunk_is_masked"][row, :num_chunks].any()), "at least one chunk masked"


@pytest.mark.filterwarnings("ignore:mask_probability=0")
@FAST
@given(samples, st.sampled_from([2, 4, 16]), st.floats(0.0, 1.0), st.integers(0, 1000), st.integers(0, 3),
       st.randoms(use_true_random=False))
def test_mask_draw_depends_only_on_seed_epoch_and_sample_id(lengths, chunk_size, probability, seed, epoch, rnd):
    features = [make_feature(p, r, chunk_size, 100 + i) for i, (p, r) in enumerate(lengths)]
    collator = ChunkMaskingCollator(MASK, PAD, chunk_size=chunk_size, mask_probability=probability, seed=seed)
    collator.set_epoch(epoch)

    def masks_by_id(batch_features):
        batch = collator(batch_features)
        return {int(i): batch["chunk_is_masked"][row, : int(n)].tolist()
                for row, (i, n) in enumerate(zip(batch["sample_id"], batch["num_chunks"]))}

    together = masks_by_id(features)
    shuffled = features[:]
    rnd.shuffle(shuffled)
    assert masks_by_id(shuffled) == together
    one_by_one = {}
    for feature in features:  # every sample alone, next to an unrelated long sample
        one_by_one.update({k: v for k, v in masks_by_id([feature, make_feature(3, 90, chunk_size, 7)]).items()
                           if k != 7})
    assert one_by_one == together


def test_epoch_and_seed_change_the_draw():
    def draws(seed, epoch):
        return [draw_masked_chunks(8, 0.3, seed, epoch, i).tolist() for i in range(50)]

    assert draws(0, 0) == draws(0, 0)
    assert draws(0, 0) != draws(0, 1)
    assert draws(0, 0) != draws(1, 0)


def test_mask_seed_is_a_fixed_function():
    # blake2b is not salted per process (unlike hash()), so other workers and resumed runs get the same seed
    assert mask_seed(0, 0, 0) == int.from_bytes(hashlib.blake2b(b"0:0:0", digest_size=8).digest(), "little")
    assert mask_seed(0, 0, 1) != mask_seed(0, 1, 0)


def expected_masked(k: int, p: float) -> tuple[float, float]:
    """Mean and variance of the number of masked chunks out of k: Binomial(k, p), raised to 1 when it is 0."""
    none_drawn = (1 - p) ** k
    mean = k * p + none_drawn
    second_moment = k * p * (1 - p) + (k * p) ** 2 + none_drawn
    return mean, second_moment - mean**2


@pytest.mark.parametrize("probability", [0.1, 0.3, 0.7])
def test_empirical_masked_chunk_rate(probability):
    chunk_counts = [1, 2, 3, 5, 8] * 600
    masked = total = 0
    mean = variance = 0.0
    for sample_id, k in enumerate(chunk_counts):
        masked += int(draw_masked_chunks(k, probability, 0, 0, sample_id).sum())
        total += k
        m, v = expected_masked(k, probability)
        mean, variance = mean + m, variance + v
    # the one-chunk minimum lifts the rate well above p for short samples: compare with the exact expectation
    assert mean / total > probability
    assert abs(masked - mean) < 5 * math.sqrt(variance), (masked / total, mean / total)


def test_collator_rate_matches_draw_function():
    features = [make_feature(5, 16 * k - 1, 16, i) for i, k in enumerate([1, 2, 4, 6] * 25)]
    batch = ChunkMaskingCollator(MASK, PAD, mask_probability=0.3)(features)
    expected = [draw_masked_chunks(f["num_chunks"], 0.3, 0, 0, f["sample_id"]).tolist() for f in features]
    assert [row[: f["num_chunks"]] for row, f in zip(batch["chunk_is_masked"].tolist(), features)] == expected


def test_probability_zero_masks_nothing_and_warns():
    with pytest.warns(UserWarning, match="mask_probability=0"):
        collator = ChunkMaskingCollator(MASK, PAD, chunk_size=4, mask_probability=0.0)
    features = [make_feature(3, 9, 4, i) for i in range(5)]
    batch = collator(features)
    assert not bool(batch["chunk_is_masked"].any())
    assert not bool((batch["input_ids"] == MASK).any())


def test_probability_one_masks_every_chunk():
    features = [make_feature(3, 9, 4, i) for i in range(5)]
    batch = ChunkMaskingCollator(MASK, PAD, chunk_size=4, mask_probability=1.0)(features)
    reasoning = batch["chunk_index"] >= 0
    assert bool((batch["input_ids"][reasoning] == MASK).all())
    assert not bool((batch["input_ids"][~reasoning] == MASK).any())
    assert batch["chunk_is_masked"].sum().item() == sum(f["num_chunks"] for f in features)


def test_output_keys_and_dtypes():
    features = [make_feature(5, 20, 4, 0), make_feature(9, 3, 4, 1)]
    batch = ChunkMaskingCollator(MASK, PAD, chunk_size=4)(features)
    for name in ("input_ids", "labels", "attention_mask", "chunk_index", "num_chunks", "sample_id"):
        assert batch[name].dtype == torch.long, name
    assert batch["chunk_is_masked"].dtype == torch.bool
    assert batch["chunk_is_masked"].shape == (2, 6)  # K_max: 20 reasoning + EOS -> 6 chunks of 4
    assert batch["num_chunks"].tolist() == [6, 1]
    assert batch["sample_id"].tolist() == [0, 1]


def test_pad_batch_alone_for_the_plain_sft_baseline():
    features = [make_feature(5, 20, 4, 0), make_feature(2, 2, 4, 1)]
    for f in features:
        del f["sample_id"]
    batch = pad_batch(features, PAD, 4)
    assert batch["input_ids"].shape == (2, 32)
    assert "sample_id" not in batch
    assert batch["input_ids"][1, 8:].eq(PAD).all() and batch["labels"][1, 8:].eq(-100).all()
    assert batch["chunk_index"][1, 8:].eq(-1).all() and batch["attention_mask"][1, 8:].eq(0).all()


def test_features_are_not_modified():
    feature = make_feature(5, 20, 4, 0)
    before = {k: list(v) if isinstance(v, list) else v for k, v in feature.items()}
    ChunkMaskingCollator(MASK, PAD, chunk_size=4, mask_probability=1.0)([feature])
    assert feature == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_probability=1.5), "mask_probability must be in \\[0, 1\\], got 1.5"),
        (dict(mask_probability=-0.1), "mask_probability must be in"),
        (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
        (dict(chunk_size=-4), "chunk_size must be a positive integer"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkMaskingCollator(MASK, PAD, **kwargs)


def test_bad_inputs():
    collator = ChunkMaskingCollator(MASK, PAD, chunk_size=4)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        collator.set_epoch(-1)
    feature = make_feature(5, 20, 4, 0)
    with pytest.raises(ValueError, match="not all multiples of chunk_size 8"):
        ChunkMaskingCollator(MASK, PAD, chunk_size=8)([make_feature(1, 20, 4, 0)])  # 28 tokens
    del feature["sample_id"]
    with pytest.raises(ValueError, match="sample_id"):
        collator([feature])


# ------------------------------------------------------------------------------------- partial chunk masking
def test_partial_masking_masks_the_same_chunks_and_keeps_prompt_and_other_chunks():
    features = [make_feature(7 + i, 40 + 13 * i, 16, i) for i in range(6)]
    whole = ChunkMaskingCollator(MASK, PAD, chunk_size=16, mask_probability=0.4, seed=3)(features)
    partial = ChunkMaskingCollator(MASK, PAD, chunk_size=16, mask_probability=0.4, seed=3,
                                   partial_chunk_masking=True)(features)
    assert torch.equal(partial["chunk_is_masked"], whole["chunk_is_masked"])
    for name in ("labels", "attention_mask", "chunk_index"):
        assert torch.equal(partial[name], whole[name])
    is_mask = partial["input_ids"] == MASK
    original = pad_batch(features, PAD, 16)["input_ids"]
    assert bool((partial["input_ids"][~is_mask] == original[~is_mask]).all())  # visible tokens are the originals
    assert not bool(is_mask[partial["chunk_index"] < 0].any())  # prompt and pads are never masked
    assert bool((whole["input_ids"][is_mask] == MASK).all())  # only positions of drawn chunks are masked
    chunk_of = partial["chunk_index"].clamp(min=0)
    for row in range(len(features)):
        for k in partial["chunk_is_masked"][row].nonzero().flatten().tolist():
            assert bool(is_mask[row][(chunk_of[row] == k) & (partial["chunk_index"][row] >= 0)].any())


def test_partial_masking_positions_follow_the_pure_draw():
    features = [make_feature(5, 60, 16, sample_id) for sample_id in (11, 12)]  # 60 + EOS: 4 chunks
    collator = ChunkMaskingCollator(MASK, PAD, chunk_size=16, mask_probability=0.5, seed=9, partial_chunk_masking=True)
    collator.set_epoch(2)
    batch = collator(features)
    for row, feature in enumerate(features):
        drawn = draw_masked_chunks(4, 0.5, 9, 2, feature["sample_id"], partial_chunk_size=16)
        reasoning = batch["chunk_index"][row] >= 0
        assert torch.equal(batch["input_ids"][row][reasoning].view(4, 16) == MASK, drawn)


def test_partial_masking_fraction_follows_the_drawn_rate():
    """Rate r ~ U(0, 1) per masked chunk, each token masked with r, at least one: mean fraction (1 + (C-1)/2) / C,
    and the fractions spread over the whole range (whole-chunk masking would always give 1)."""
    size, fractions = 16, []
    for sample_id in range(600):
        drawn = draw_masked_chunks(4, 0.5, 0, 0, sample_id, partial_chunk_size=size)
        for chunk in drawn[drawn.any(dim=1)]:
            fractions.append(chunk.float().mean().item())
    fractions = torch.tensor(fractions)
    assert len(fractions) > 1000
    assert abs(fractions.mean().item() - (1 + (size - 1) / 2) / size) < 0.02
    assert (fractions < 0.25).float().mean() > 0.15 and (fractions > 0.75).float().mean() > 0.15
    assert fractions.min() >= 1 / size


def test_visible_tokens_of_a_partially_masked_chunk_weigh_as_unmasked():
    from llada_trm.model.losses import chunk_token_weights

    chunk_index = torch.tensor([[-1, 0, 0, 1, 1]])
    chunk_is_masked = torch.tensor([[True, False]])
    by_chunk = chunk_token_weights(chunk_index, chunk_is_masked, 0.3, 0.5)
    assert torch.allclose(by_chunk, torch.tensor([[0.0, 1.3, 1.3, 0.5, 0.5]]))
    by_position = chunk_token_weights(chunk_index, chunk_is_masked, 0.3, 0.5,
                                      position_is_masked=torch.tensor([[False, True, False, False, False]]))
    assert torch.allclose(by_position, torch.tensor([[0.0, 1.3, 0.5, 0.5, 0.5]]))
