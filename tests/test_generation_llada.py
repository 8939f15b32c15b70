"""Plain LLaDA sampling: token-identical to a transcription of the official algorithm, transfer schedule,
randomness, left-padded batches and argument checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from support import MASK, random_prompt, tiny_model

from llada_trm.inference.sampler import generate, gumbel_argmax, transfer_schedule

def official_reference(model, prompt, steps, gen_length, block_length, cfg_scale=0.0, temperature=0.0,
                       remasking="low_confidence", generator=None, mask_id=MASK):
    """The official LLaDA `generate`, written out plainly (unpadded prompts, float64, per-row top-k).

    The official code draws its noise over the whole sequence from the global RNG; `generate` draws it from
    `generator` over the answer up to the current block's end only (nothing else can be committed). To
    compare sampled runs draw for draw, this transcription draws there too; other positions get unused
    placeholders.
    """
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for b in range(num_blocks):
        start = prompt_length + b * block_length
        end = start + block_length
        mask_num = (x[:, start:end] == mask_id).sum(dim=1)
        counts = [[int(n) // steps + (1 if i < int(n) % steps else 0) for i in range(steps)] for n in mask_num]
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, un = model(input_ids=torch.cat([x, un_x])).logits.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(input_ids=x).logits
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                noise = torch.full(logits.shape, 0.5, dtype=torch.float64)
                noise[:, prompt_length:end] = torch.rand(
                    (batch, end - prompt_length, logits.shape[-1]), generator=generator, dtype=torch.float64
                )
                x0 = (logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.zeros(x0.shape, dtype=torch.float64)
                x0_p[:, prompt_length:end] = torch.rand((batch, end - prompt_length), generator=generator,
                                                        dtype=torch.float64)
            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=torch.float64))
            for row in range(batch):
                chosen = torch.topk(confidence[row], k=counts[row][i]).indices
                x[row, chosen] = x0[row, chosen]
    return x


def record_mask_counts(model, suppress_mask_prediction=False):
    """Wrap model.forward to record the mask tokens per row of every call's (conditional) input."""
    calls = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        calls.append((ids == MASK).sum(dim=1))
        out = forward(*args, **kwargs)
        if suppress_mask_prediction:  # committed tokens then always leave the masked set
            out.logits[..., MASK] = -1e4  # finite: classifier-free guidance subtracts logits
        return out

    model.forward = recording_forward
    return calls


@pytest.mark.parametrize("steps, gen_length, block_length", [(8, 8, 8), (4, 8, 8), (8, 16, 4), (6, 12, 4), (12, 8, 8)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_matches_official_algorithm_at_temperature_zero(steps, gen_length, block_length, cfg_scale):
    model = tiny_model()
    prompt = random_prompt(2, 5)
    ours = generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
    reference = official_reference(model, prompt, steps, gen_length, block_length, cfg_scale)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("temperature, remasking", [(0.8, "low_confidence"), (0.0, "random"), (1.5, "random")])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_matches_official_algorithm_when_sampling(temperature, remasking, cfg_scale):
    model = tiny_model()
    prompt = random_prompt(2, 5)
    kwargs = dict(steps=6, gen_length=12, block_length=4, cfg_scale=cfg_scale, temperature=temperature,
                  remasking=remasking)
    ours = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    reference = official_reference(model, prompt, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(ours, reference)


class ScriptedModel(torch.nn.Module):
    """Logits from a fixed random table, except at the first answer position: there the mask id is predicted
    with near certainty until two answer tokens are committed, then token 7 is."""

    def __init__(self, prompt_length: int):
        super().__init__()
        self.config = make_config(max_sequence_length=64)
        self.prompt_length = prompt_length
        self.table = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1).clone()
        committed = (input_ids[:, self.prompt_length :] != MASK).sum(dim=1)
        first = logits[:, self.prompt_length]
        first[committed < 2, MASK] = 50.0
        first[committed >= 2, 7] = 50.0
        return SimpleNamespace(logits=logits)


def test_matches_official_algorithm_when_masks_are_left_over_from_earlier_blocks():
    """Committing the mask id leaves a position masked; the official sampler keeps it a candidate in later
    blocks (only positions after the current block are excluded)."""
    prompt = random_prompt(2, 5)
    model = ScriptedModel(prompt_length=5)
    ours = generate(model, prompt, steps=8, gen_length=16, block_length=4)
    reference = official_reference(model, prompt, 8, 16, 4, 0.0)
    assert torch.equal(ours, reference)
    assert (ours[:, 5] == 7).all(), "the first answer position is filled in a later block"


def test_matches_official_algorithm_when_the_model_predicts_the_mask_token():
    model = tiny_model()
    with torch.no_grad():
        model.model.transformer.ff_out.weight[MASK] *= 2.5
    prompt = random_prompt(2, 5)
    ours = generate(model, prompt, steps=8, gen_length=16, block_length=4)
    reference = official_reference(model, prompt, 8, 16, 4, 0.0)
    assert (ours[:, 5:] == MASK).any(), "the test needs a model that sometimes predicts the mask id"
    assert (ours[:, 5:] != MASK).any()
    assert torch.equal(ours, reference)


def test_transfer_schedule_spreads_the_remainder_over_the_first_steps():
    assert transfer_schedule(torch.tensor([8, 7, 2, 0]), 3).tolist() == [[3, 3, 2], [3, 2, 2], [1, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "steps, gen_length, block_length, expected",
    [
        (6, 16, 8, [3, 3, 2, 3, 3, 2]),
        (4, 8, 8, [2, 2, 2, 2]),
        (12, 8, 8, [1] * 8 + [0] * 4),
        (6, 12, 4, [2] * 6),
    ],
)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_tokens_committed_per_step_follow_the_schedule(steps, gen_length, block_length, expected, cfg_scale):
    model = tiny_model()
    calls = record_mask_counts(model, suppress_mask_prediction=True)
    prompt = random_prompt(2, 4)
    out = generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
    assert len(calls) == steps
    # With cfg the forward sees [x, unconditional x]: the conditional half is the first batch rows.
    counts = [c[: prompt.shape[0]] for c in calls] + [(out == MASK).sum(dim=1)]
    committed = [(before - after).tolist() for before, after in zip(counts, counts[1:])]
    assert committed == [[n, n] for n in expected]
    assert counts[0].tolist() == [gen_length, gen_length] and counts[-1].tolist() == [0, 0]


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_prompt_is_never_changed_even_when_it_contains_mask_tokens(cfg_scale):
    model = tiny_model()
    prompt = random_prompt(2, 6)
    prompt[0, 2] = MASK
    prompt[1, 0] = MASK
    for remasking in ("low_confidence", "random"):
        out = generate(model, prompt, steps=4, gen_length=8, block_length=4, cfg_scale=cfg_scale,
                       remasking=remasking, temperature=0.7, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 14)
        assert torch.equal(out[:, :6], prompt)


def test_temperature_zero_is_deterministic():
    model = tiny_model()
    prompt = random_prompt(3, 5)
    runs = [generate(model, prompt, steps=8, gen_length=16, block_length=8) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert not (runs[0][:, 5:] == MASK).all()


def test_random_remasking_is_seeded_and_differs_from_low_confidence():
    model = tiny_model()
    prompt = random_prompt(2, 5)
    kwargs = dict(steps=8, gen_length=16, block_length=8, remasking="random")
    seeded = lambda seed: generate(model, prompt, generator=torch.Generator().manual_seed(seed), **kwargs)  # noqa: E731
    low_confidence = generate(model, prompt, steps=8, gen_length=16, block_length=8)
    assert torch.equal(seeded(0), seeded(0))
    assert not torch.equal(seeded(0), seeded(1))
    assert not torch.equal(seeded(0), low_confidence)


def test_sampling_with_temperature_is_seeded():
    model = tiny_model()
    prompt = random_prompt(2, 5)
    kwargs = dict(steps=8, gen_length=16, block_length=4, temperature=1.0, cfg_scale=0.5)
    seeded = lambda seed: generate(model, prompt, generator=torch.Generator().manual_seed(seed), **kwargs)  # noqa: E731
    assert torch.equal(seeded(3), seeded(3))
    assert not torch.equal(seeded(3), seeded(4))
    assert not torch.equal(seeded(3), generate(model, prompt, steps=8, gen_length=16, block_length=4, cfg_scale=0.5))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_batch_equals_one_by_one(cfg_scale):
    model = tiny_model()
    lengths = [3, 7, 5]
    prompts = [random_prompt(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.full((len(lengths), width), 1, dtype=torch.long)  # pad id; any id works, it is never attended
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        attention_mask[row, width - len(p) :] = 1
    kwargs = dict(steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale)
    batched = generate(model, batch, attention_mask=attention_mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], **kwargs)
        assert torch.equal(batched[row, width:], alone[0, len(p) :]), f"row {row}"
        assert torch.equal(batched[row, :width], batch[row])


def test_model_mode_is_restored_and_no_graph_is_built():
    model = tiny_model().train()
    out = generate(model, random_prompt(1, 4), steps=2, gen_length=4, block_length=4)
    assert model.training and not out.requires_grad
    model.eval()
    generate(model, random_prompt(1, 4), steps=2, gen_length=4, block_length=4)
    assert not model.training


def test_mask_id_defaults_to_the_config_and_can_be_overridden():
    model = tiny_model()
    prompt = random_prompt(1, 4)
    assert torch.equal(
        generate(model, prompt, steps=4, gen_length=8, block_length=8),
        generate(model, prompt, steps=4, gen_length=8, block_length=8, mask_id=MASK),
    )
    # With another mask id the first model call sees other input tokens, hence another answer.
    calls = record_mask_counts(model)
    generate(model, prompt, steps=4, gen_length=8, block_length=8, mask_id=5)
    assert calls[0].item() == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(prompt=torch.zeros(0, 4, dtype=torch.long)), "empty prompt"),
        (dict(prompt=torch.tensor([5, 6, 7])), "2-D"),
        (dict(prompt=torch.ones(2, 4)), "integer token ids"),
        (dict(attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])), r"empty prompt.*row\(s\) \[0\]"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), "attention_mask shape"),
        (dict(gen_length=12, block_length=8), "multiple of block_length"),
        (dict(steps=6, gen_length=16, block_length=4), r"multiple of the number of blocks \(4\)"),
        (dict(steps=0), "steps must be positive"),
        (dict(steps=-4), "steps must be positive"),
        (dict(gen_length=0), "gen_length must be positive"),
        (dict(block_length=0), "block_length must be positive"),
        (dict(gen_length=64, block_length=64), "max_sequence_length"),
        (dict(remasking="top_p"), "unknown remasking 'top_p'"),
        (dict(temperature=-0.5), "temperature"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(overrides, message):
    model = tiny_model()
    kwargs = dict(prompt=random_prompt(2, 4), steps=4, gen_length=8, block_length=8)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)


def test_missing_mask_id_raises():
    model = tiny_model()
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_id"):
        generate(model, random_prompt(1, 4), steps=4, gen_length=8, block_length=8)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_argmax_samples_the_tempered_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    draws = gumbel_argmax(logits.expand(1, 40000, 4), temperature, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()
    assert torch.allclose(frequencies, torch.softmax(logits.double() / temperature, dim=0), atol=0.01)
    assert torch.equal(gumbel_argmax(logits[None], 0.0, None), torch.tensor([3]))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_stop_tokens_end_early_with_the_same_text_up_to_the_stop(cfg_scale):
    model, prompt = tiny_model(), random_prompt(3, 5)
    full = generate(model, prompt, steps=16, gen_length=16, block_length=4, cfg_scale=cfg_scale)
    answers = full[:, 5:]
    stop_ids = tuple(answers[:, 5].tolist())  # every row holds one of them by the end of the second block
    early = generate(model, prompt, steps=16, gen_length=16, block_length=4, cfg_scale=cfg_scale,
                     stop_token_ids=stop_ids)
    assert (early[:, 5 + 8:] == model.config.mask_token_id).all()  # the last two blocks were never decoded
    for full_row, early_row in zip(answers.tolist(), early[:, 5:].tolist()):
        end = min(full_row.index(t) for t in stop_ids if t in full_row) + 1
        assert end <= 8 and early_row[:end] == full_row[:end]
    absent = next(t for t in range(3, 64) if t not in answers)
    assert torch.equal(generate(model, prompt, steps=16, gen_length=16, block_length=4, cfg_scale=cfg_scale,
                                stop_token_ids=(absent,)), full)
