"""generate_with_refinement: the KV cache equals recomputation, a batch decodes as its rows alone, a decoded chunk
is what the training forward predicts for it, adaptive steps, stopping, length limits and argument errors."""

import pytest
import torch
from conftest import shipped_vocab_size
from support import CHUNK, EOS, MASK, PROMPTS, tiny_hybrid

from llada_trm.data.layout import ANSWER_CLOSE
from llada_trm.inference.chunk_decoding import generate_with_refinement, stop_length
from llada_trm.model.hybrid import LLaDATRMHybrid

def force_token(model: LLaDATRMHybrid, token_id: int) -> LLaDATRMHybrid:
    """Give the LM head a bias that makes `token_id` win at every position, whatever the hidden state."""
    old = model.backbone.model.transformer.ff_out
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token_id] = 1e4
    model.backbone.model.transformer.ff_out = head
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_hybrid()


@pytest.mark.parametrize(
    "refine,rounds,threshold", [(True, 1, 0.3), (True, 1, 0.0), (False, 1, None), (True, 2, 0.3), (False, 2, None)]
)
def test_kv_cache_equals_recomputing_the_whole_sequence(model, refine, rounds, threshold):
    kwargs = dict(max_length=22, enable_refinement=refine, decode_steps_per_chunk=rounds,
                  refine_confidence_threshold=threshold, return_trace=True)
    cached = generate_with_refinement(model, PROMPTS, use_cache=True, **kwargs)
    recomputed = generate_with_refinement(model, PROMPTS, use_cache=False, **kwargs)
    assert cached.new_tokens == recomputed.new_tokens
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert [[t.steps for t in row] for row in cached.trace] == [[t.steps for t in row] for row in recomputed.trace]
    assert len(set(map(tuple, cached.new_tokens))) == 3 and len(set(cached.new_tokens[0])) > 1  # not vacuous
    if refine:  # some chunks (0.3) or all (0.0: the committed block then runs its last steps alone) stop early
        steps = {t.steps for row in cached.trace for t in row}
        assert steps - {3} and (threshold > 0 or steps == {1})


@pytest.mark.parametrize("refine", [True, False])
def test_a_batch_decodes_as_each_row_alone(model, refine):
    batched = generate_with_refinement(model, PROMPTS, max_length=22, enable_refinement=refine)
    alone = [generate_with_refinement(model, [p], max_length=22, enable_refinement=refine).new_tokens[0]
             for p in PROMPTS]
    assert batched.new_tokens == alone


def test_refinement_changes_the_output(model):
    with_head = generate_with_refinement(model, PROMPTS, max_length=22).new_tokens
    backbone_only = generate_with_refinement(model, PROMPTS, max_length=22, enable_refinement=False).new_tokens
    assert with_head != backbone_only


def test_a_decoded_chunk_is_the_training_forward_prediction_for_it_masked(model):
    """Generation sees each chunk as training does: context chunks unmasked through the full recursion."""
    prompt = PROMPTS[0]
    out = generate_with_refinement(model, [prompt], max_new_tokens=3 * CHUNK, refine_confidence_threshold=2.0,
                                   ignore_eos=True)
    sequence = out.sequences  # (1, 8 + 12)
    width = sequence.shape[1] - 3 * CHUNK
    chunk_index = torch.tensor([[-1] * width + [k for k in range(3) for _ in range(CHUNK)]])
    attention = (torch.arange(sequence.shape[1]) >= width - len(prompt)).long()[None]
    for k in range(3):
        here = chunk_index[0] == k
        masked = sequence.clone()
        masked[0, here] = MASK
        with torch.no_grad():
            logits = model(input_ids=masked, attention_mask=attention, chunk_index=chunk_index,
                           return_logits=True).step_logits[-1, 0, here]
        logits[:, MASK] = -torch.inf  # generation never commits the mask token
        assert logits.argmax(-1).tolist() == sequence[0, here].tolist()


def test_adaptive_steps_follow_the_threshold(model):
    def steps(**kwargs):
        out = generate_with_refinement(model, PROMPTS, max_length=22, return_trace=True, **kwargs)
        return {t.steps for row in out.trace for t in row}, out.trace

    assert steps(refine_confidence_threshold=0.0, min_recursive_steps=2)[0] == {2}
    used, trace = steps(refine_confidence_threshold=1.5)
    assert used == {3}
    assert all(len(t.confidence) == 3 and all(0 < c <= 1 for c in t.confidence) for row in trace for t in row)
    assert [t.chunk for t in trace[2]] == list(range(5))  # 20 new tokens for the 2-token prompt
    assert steps(enable_refinement=False)[0] == {0}


def test_length_limits_count_the_prompt_or_the_new_tokens(model):
    out = generate_with_refinement(model, PROMPTS, max_length=15, ignore_eos=True)
    assert [len(t) for t in out.new_tokens] == [15 - len(p) for p in PROMPTS]
    out = generate_with_refinement(model, PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert [len(t) for t in out.new_tokens] == [6, 6, 6]
    assert out.sequences.shape == (3, 12 + 2 * CHUNK)
    assert out.sequences[0, 12 + 6:].tolist() == [model.backbone.config.pad_token_id] * 2


def test_sampling_is_reproducible_with_a_generator(model):
    def sample(seed):
        return generate_with_refinement(model, PROMPTS, max_length=22, temperature=1.0,
                                        generator=torch.Generator().manual_seed(seed)).new_tokens

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_eos_stops_after_one_chunk():
    model = force_token(tiny_hybrid(), EOS)
    for refine in (True, False):
        out = generate_with_refinement(model, PROMPTS, max_length=40, enable_refinement=refine, return_trace=True)
        assert out.new_tokens == [[], [], []]
        assert all(len(row) == 1 for row in out.trace)
        assert out.sequences.shape == (3, 12 + CHUNK)


def test_answer_close_token_stops_generation(shipped_tokenizer):
    close_id = shipped_tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)
    model = force_token(tiny_hybrid(vocab=shipped_vocab_size(shipped_tokenizer)), close_id)
    out = generate_with_refinement(model, ["Mia has 3 apples. How many?", "Leo has 2 coins."],
                                   tokenizer=shipped_tokenizer, max_length=60, return_trace=True)
    assert out.new_tokens == [[close_id], [close_id]]
    assert out.texts == [ANSWER_CLOSE, ANSWER_CLOSE]
    assert all(len(row) == 1 for row in out.trace)


def test_answer_close_split_over_tokens_is_found_in_the_text(shipped_tokenizer):
    from llada_trm.inference.decoding_settings import Vocabulary

    pieces = [shipped_tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("7 <", "/answer>", " x")]
    tokens = [t for piece in pieces for t in piece]
    assert shipped_tokenizer.convert_tokens_to_ids(ANSWER_CLOSE) not in tokens
    vocabulary = Vocabulary(mask_id=2, eos_id=1, pad_id=1, answer_close_id=None, tokenizer=shipped_tokenizer)
    keep = stop_length(tokens, 0, vocabulary)
    assert keep == len(pieces[0]) + len(pieces[1])
    assert shipped_tokenizer.decode(tokens[:keep]).endswith(ANSWER_CLOSE)


def test_prompts_with_the_marker_are_kept_and_questions_rendered(shipped_tokenizer):
    from llada_trm.data.layout import render_prompt
    from llada_trm.inference.prompts import prompt_token_lists

    bos = shipped_tokenizer.bos_token_id
    expected = [bos, *shipped_tokenizer(render_prompt("Mia has 3 apples."), add_special_tokens=False)["input_ids"]]
    assert prompt_token_lists("Mia has 3 apples.", shipped_tokenizer, 1) == [expected]
    assert prompt_token_lists(render_prompt("Mia has 3 apples.").rstrip("\n"), shipped_tokenizer, 1) == [expected]
    assert prompt_token_lists(torch.tensor([[1, 1, 5, 6], [7, 8, 9, 10]]), None, 1) == [[5, 6], [7, 8, 9, 10]]


@pytest.mark.parametrize(
    "prompt,kwargs,message",
    [
        ([], {}, "empty prompt"),
        (torch.empty(1, 0, dtype=torch.long), {}, "empty prompt"),
        ([[5, 6], [1, 1]], {}, "empty prompt"),
        ([5] * 61, {"max_length": 200}, "max_sequence_length"),
        ([5] * 10, {"max_length": 10}, "max_length"),
        ("What is 2 + 3?", {}, "tokenizer"),
        ([5, 6], {"decode_steps_per_chunk": 0}, "decode_steps_per_chunk"),
        ([5, 6], {"decode_steps_per_chunk": CHUNK + 1}, "decode_steps_per_chunk"),
        ([5, 6], {"temperature": -1.0}, "temperature"),
        ([5, 6], {"min_recursive_steps": 4}, "min_recursive_steps"),
        ([5, 6], {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_with_refinement(model, prompt, **kwargs)


def test_empty_text_prompt_is_an_error(model, shipped_tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_with_refinement(model, "  ", tokenizer=shipped_tokenizer)


def test_hybrid_methods_delegate(model):
    prompt = torch.tensor([PROMPTS[0]])
    assert model.generate_with_refinement(prompt, max_length=13).new_tokens == \
        generate_with_refinement(model, prompt, max_length=13).new_tokens
    sampled = model.generate(prompt, steps=4, gen_length=4, block_length=4)
    assert sampled.shape == (1, 9) and torch.equal(sampled[:, :5], prompt)
    assert model.training is False


def test_caches_are_copied_only_when_rows_leave_the_batch(model, monkeypatch):
    """Selecting the running rows copies every cache: while no row has finished, the decoder must not do it."""
    from llada_trm.inference import chunk_decoding as refinement_decoding

    selected = []
    original = refinement_decoding.Caches.select
    monkeypatch.setattr(refinement_decoding.Caches, "select",
                        lambda self, rows: selected.append(rows.tolist()) or original(self, rows))
    everyone = generate_with_refinement(model, PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert selected == [] and all(len(tokens) == 12 for tokens in everyone.new_tokens)
    prompts = PROMPTS[:2] + [PROMPTS[2] * 8]  # 5, 9 and 16 tokens: with max_length 21 the last row stops first
    uneven = generate_with_refinement(model, prompts, max_length=21, ignore_eos=True)
    assert selected, "a row that reaches its length first leaves the batch"
    assert [len(t) for t in uneven.new_tokens] == [16, 12, 5]
    alone = [generate_with_refinement(model, [p], max_length=21, ignore_eos=True).new_tokens[0] for p in prompts]
    assert uneven.new_tokens == alone
