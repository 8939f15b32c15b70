"""LLaDA's Monte Carlo likelihood estimate: deterministic per seed, equal to a plain reference, and it prefers the
reference reasoning of the tiny backbone's training problems to a corrupted one. No lm-eval needed."""

import pytest
import torch
from transformers import AutoTokenizer

from llada_trm import LLaDAModelLM
from llada_trm.data.layout import encode_prompt, render_prompt, render_reasoning, text_ids
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.inference.likelihood import is_greedy_continuation, masked_diffusion_loglikelihood
from llada_trm.inference.sampler import PassCounter, generate


@pytest.fixture(scope="module")
def shipped():
    return LLaDAModelLM.from_pretrained(TINY_LLADA_PATH).eval(), AutoTokenizer.from_pretrained(TINY_LLADA_PATH)


def pair(tokenizer, problem: dict, answer: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, reasoning + tagged answer ids): the training layout of a problem, its answer replaceable."""
    # the corruption: the tagged answer disagrees with the result of the last step
    text = render_reasoning(problem["reasoning"], answer if answer is not None else problem["answer"])
    return encode_prompt(tokenizer, render_prompt(problem["question"])), text_ids(tokenizer, text)


def reference_estimate(backbone, context: list[int], continuation: list[int], mc_num: int, seed: int) -> float:
    """The estimate written out: per sample, draw l in 1..L, then a permutation whose first l positions are masked;
    one forward per sample; (L / l) times the summed log-probabilities of the masked tokens; the mean."""
    generator = torch.Generator().manual_seed(seed)
    length, mask_id, total = len(continuation), backbone.config.mask_token_id, 0.0
    for _ in range(mc_num):
        count = int(torch.randint(1, length + 1, (1,), generator=generator))
        chosen = set(torch.randperm(length, generator=generator)[:count].tolist())
        row = context + [mask_id if i in chosen else token for i, token in enumerate(continuation)]
        with torch.no_grad():
            logits = backbone(input_ids=torch.tensor([row])).logits[0].double()
        logp = logits.log_softmax(dim=-1)
        total += length / count * sum(float(logp[len(context) + i, continuation[i]]) for i in chosen)
    return total / mc_num


def test_estimate_equals_the_plain_reference_and_counts_its_passes(shipped):
    backbone, tokenizer = shipped
    context, continuation = pair(tokenizer, generate_split("train", 1)[0])
    counter = PassCounter()
    batched = masked_diffusion_loglikelihood(backbone, context, continuation, mc_num=10, seed=3, batch_size=4,
                                             counter=counter)
    assert batched == pytest.approx(reference_estimate(backbone, context, continuation, 10, 3), rel=1e-5, abs=1e-4)
    assert counter.backbone_row_passes == 10 and counter.backbone_forwards == 3


def test_estimate_is_deterministic_per_seed(shipped):
    backbone, tokenizer = shipped
    context, continuation = pair(tokenizer, generate_split("train", 2)[1])
    first = masked_diffusion_loglikelihood(backbone, context, continuation, mc_num=8, seed=0)
    again = masked_diffusion_loglikelihood(backbone, context, continuation, mc_num=8, seed=0, batch_size=3)
    other = masked_diffusion_loglikelihood(backbone, context, continuation, mc_num=8, seed=1)
    assert first == pytest.approx(again, rel=1e-6) and first != other
    assert first < 0


def test_reference_reasoning_is_more_likely_than_a_corrupted_one(shipped):
    backbone, tokenizer = shipped
    problems = generate_split("train", 6)
    gaps = []
    for problem in problems:
        right = masked_diffusion_loglikelihood(backbone, *pair(tokenizer, problem), mc_num=64, seed=0)
        wrong = masked_diffusion_loglikelihood(backbone, *pair(tokenizer, problem, str(int(problem["answer"]) + 3)),
                                               mc_num=64, seed=0)
        gaps.append(right - wrong)
    assert all(gap > 0 for gap in gaps), gaps


def test_is_greedy_holds_for_the_models_own_decode_only(shipped):
    backbone, tokenizer = shipped
    context, continuation = pair(tokenizer, generate_split("train", 1)[0])
    own = torch.tensor([context])
    decoded = generate(backbone, own, steps=8, gen_length=8, block_length=8)[0, len(context):].tolist()
    assert is_greedy_continuation(backbone, context, decoded)
    altered = [*decoded[:-1], (decoded[-1] + 1) % backbone.config.vocab_size]
    assert not is_greedy_continuation(backbone, context, altered)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="empty continuation"):
        masked_diffusion_loglikelihood(None, [1], [], mc_num=2, seed=0)
    with pytest.raises(ValueError, match="mc_num"):
        masked_diffusion_loglikelihood(None, [1], [5], mc_num=0, seed=0)
