"""Draft feedback (`draft_feedback`): each refinement step's argmax tokens, embedded by the backbone and projected,
enter the next step's x at the still-masked positions. Checked against a plain step-by-step reference, for its
effect on the output, for decoding (cache, training equality) and for a checkpoint round trip."""

import pytest
import torch
import torch.nn.functional as F
from support import make_batch, make_hybrid
from support import CHUNK, MASK, PROMPTS, tiny_hybrid

from llada_trm.inference.chunk_decoding import generate_with_refinement
from llada_trm.model.head import RefinementState
from llada_trm.model.hybrid import LLaDATRMHybrid


def drafting_hybrid(**overrides) -> LLaDATRMHybrid:
    model = make_hybrid(draft_feedback=True, **overrides).eval()
    torch.nn.init.normal_(model.head.draft_proj.weight, std=0.3)  # a draft that visibly moves the head
    return model


def reference_step_logits(model: LLaDATRMHybrid, batch: dict) -> list[torch.Tensor]:
    """Every step's logits (B, L, V) by hand: step 1 on x; step s + 1 on x plus draft_proj(wte(argmax of step s))
    at the masked positions, zero elsewhere."""
    ids = batch["input_ids"]
    hidden = model.backbone_hidden_states(ids, batch["attention_mask"], batch["chunk_index"])
    context = model.head_context(hidden, batch["attention_mask"], batch["chunk_index"])
    x = model.head.in_proj(hidden)
    is_masked = (ids == MASK)[..., None]
    state, draft, logits = RefinementState(x, model.head.z_init.expand_as(x)), torch.zeros_like(x), []
    for _ in range(model.config.max_recursive_steps):
        state = model.head.step(state, x + draft, context)
        step_logits = model.backbone.lm_head(hidden + model.head.out_proj(state.y))
        logits.append(step_logits)
        embedded = model.backbone.get_input_embeddings()(step_logits.argmax(-1))
        draft = F.linear(embedded, model.head.draft_proj.weight) * is_masked
    return logits


def test_the_forward_equals_the_step_by_step_reference():
    model = drafting_hybrid()
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    with torch.no_grad():
        out = model(**batch, return_logits=True)
        reference = reference_step_logits(model, batch)
    supervised = out.supervised_mask
    for step, expected in enumerate(reference):
        assert torch.allclose(out.step_logits[step][supervised], expected[supervised], atol=1e-5, rtol=1e-5)


def test_changing_the_draft_changes_the_head_output_from_the_second_step_on():
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    drafting = drafting_hybrid()
    plain = make_hybrid().eval()  # the same backbone (same seed); the drafting head's weights but draft_proj
    plain.head.load_state_dict({k: v for k, v in drafting.head.state_dict().items() if not k.startswith("draft_proj")})
    with torch.no_grad():
        without = plain(**batch, return_logits=True).step_logits
        fed = drafting(**batch, return_logits=True).step_logits
        drafting.head.draft_proj.weight.mul_(-1.0)  # the same tokens, read the other way
        flipped = drafting(**batch, return_logits=True).step_logits
        drafting.head.draft_proj.weight.zero_()  # no draft at all
        silent = drafting(**batch, return_logits=True).step_logits
    masked = batch["input_ids"] == MASK
    assert torch.allclose(fed[0], without[0], atol=1e-6)  # the first step has no draft yet
    assert (fed[1:][:, masked] - flipped[1:][:, masked]).abs().max() > 1e-2
    assert torch.allclose(silent, without, atol=1e-6)


def test_the_loss_trains_draft_proj():
    model = drafting_hybrid().train()
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    model(**batch).loss.backward()
    assert model.head.draft_proj.weight.grad is not None and model.head.draft_proj.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def drafting_decoder():
    model = tiny_hybrid(draft_feedback=True)
    torch.nn.init.normal_(model.head.draft_proj.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("rounds,threshold", [(1, 0.3), (2, 0.3), (1, 0.0)])
def test_the_kv_cache_equals_recomputation_with_drafts(drafting_decoder, rounds, threshold):
    kwargs = dict(max_length=22, decode_steps_per_chunk=rounds, refine_confidence_threshold=threshold)
    cached = generate_with_refinement(drafting_decoder, PROMPTS, use_cache=True, **kwargs)
    recomputed = generate_with_refinement(drafting_decoder, PROMPTS, use_cache=False, **kwargs)
    assert cached.new_tokens == recomputed.new_tokens
    plain = tiny_hybrid()  # the drafting decoder's weights but draft_proj
    plain.head.load_state_dict({k: v for k, v in drafting_decoder.head.state_dict().items()
                                if not k.startswith("draft_proj")})
    silent = tiny_hybrid(draft_feedback=True)
    silent.load_state_dict(drafting_decoder.state_dict())
    silent.head.draft_proj.weight.data.zero_()
    assert generate_with_refinement(silent, PROMPTS, **kwargs).new_tokens == \
        generate_with_refinement(plain, PROMPTS, **kwargs).new_tokens
    plain_tokens = generate_with_refinement(plain, PROMPTS, **kwargs).new_tokens
    if threshold == 0:  # every chunk stops after one step: no draft is ever read
        assert cached.new_tokens == plain_tokens
    else:
        assert cached.new_tokens != plain_tokens


def test_a_decoded_chunk_is_the_training_forward_prediction_with_drafts(drafting_decoder):
    prompt = PROMPTS[0]
    out = generate_with_refinement(drafting_decoder, [prompt], max_new_tokens=3 * CHUNK,
                                   refine_confidence_threshold=2.0, ignore_eos=True)
    sequence = out.sequences
    width = sequence.shape[1] - 3 * CHUNK
    chunk_index = torch.tensor([[-1] * width + [k for k in range(3) for _ in range(CHUNK)]])
    attention = (torch.arange(sequence.shape[1]) >= width - len(prompt)).long()[None]
    for k in range(3):
        here = chunk_index[0] == k
        masked = sequence.clone()
        masked[0, here] = MASK
        with torch.no_grad():
            logits = drafting_decoder(input_ids=masked, attention_mask=attention, chunk_index=chunk_index,
                                      return_logits=True).step_logits[-1, 0, here]
        logits[:, MASK] = -torch.inf
        assert logits.argmax(-1).tolist() == sequence[0, here].tolist()


def test_a_saved_drafting_hybrid_reloads_with_its_draft_projection(tmp_path):
    model = drafting_hybrid()
    model.save_pretrained(tmp_path / "hybrid")  # head and config; the frozen backbone is passed back in
    loaded = LLaDATRMHybrid.from_pretrained(tmp_path / "hybrid", backbone=model.backbone).eval()
    assert loaded.config.draft_feedback
    assert torch.equal(loaded.head.draft_proj.weight, model.head.draft_proj.weight)
    batch = make_batch([5], [2], 4, [[1]])
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).loss, model(**batch).loss, atol=1e-6)
