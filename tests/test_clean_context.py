"""Clean-context (block diffusion) attention: the noisy copy of chunk k sees the prompt, the clean chunks before k
and itself, exactly as when that context is run alone; the clean copy is untouched by the noisy one."""

import pytest
import torch
from conftest import make_config

from llada_trm import LLaDAModelLM
from llada_trm.model import flex_attention as flex

PROMPT, CHUNK, CHUNKS, MASK = 5, 4, 3, 2
CLOSE = dict(rtol=1e-5, atol=1e-5)


def two_copy_batch(generator: torch.Generator, pads=(0, 2)) -> dict:
    """[pads][prompt][x_0 chunks][x_t chunks] per row, with x_t = x_0 with some tokens masked."""
    rows = []
    for pad in pads:
        prompt = torch.randint(3, 64, (PROMPT - pad,), generator=generator)
        clean = torch.randint(3, 64, (CHUNKS * CHUNK,), generator=generator)
        noisy = torch.where(torch.rand(clean.shape, generator=generator) < 0.5, MASK, clean)
        rows.append((pad, prompt, clean, noisy))
    chunks = torch.arange(CHUNKS).repeat_interleave(CHUNK)
    batch = {name: [] for name in ("input_ids", "attention_mask", "chunk_index", "position_ids", "noisy_copy")}
    for pad, prompt, clean, noisy in rows:
        batch["input_ids"].append(torch.cat((torch.ones(pad, dtype=torch.long), prompt, clean, noisy)))
        batch["attention_mask"].append(torch.cat((torch.zeros(pad), torch.ones(PROMPT - pad + 2 * CHUNKS * CHUNK))))
        batch["chunk_index"].append(torch.cat((torch.full((PROMPT,), -1), chunks, chunks)))
        clean_positions = torch.arange(PROMPT + CHUNKS * CHUNK)
        batch["position_ids"].append(torch.cat((clean_positions, clean_positions[PROMPT:])))
        batch["noisy_copy"].append(torch.arange(PROMPT + 2 * CHUNKS * CHUNK) >= PROMPT + CHUNKS * CHUNK)
    return {name: torch.stack(values).long() if name != "noisy_copy" else torch.stack(values)
            for name, values in batch.items()}


def alone(model, batch: dict, k: int) -> torch.Tensor:
    """Logits (B, CHUNK, V) of noisy chunk k run after the prompt and the clean chunks before k, nothing else."""
    clean_end, noisy_start = PROMPT + k * CHUNK, PROMPT + (CHUNKS + k) * CHUNK
    keep = torch.cat((torch.arange(clean_end), torch.arange(noisy_start, noisy_start + CHUNK)))
    logits = model(input_ids=batch["input_ids"][:, keep], attention_mask=batch["attention_mask"][:, keep],
                   chunk_index=batch["chunk_index"][:, keep]).logits
    return logits[:, -CHUNK:]


@pytest.fixture
def model() -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(make_config(n_layers=3)).eval()


def test_each_noisy_chunk_equals_its_clean_context_run_alone(model):
    batch = two_copy_batch(torch.Generator().manual_seed(0))
    logits = model(**batch).logits
    for k in range(CHUNKS):
        start = PROMPT + (CHUNKS + k) * CHUNK
        torch.testing.assert_close(logits[:, start:start + CHUNK], alone(model, batch, k), **CLOSE)
    clean = slice(0, PROMPT + CHUNKS * CHUNK)  # the clean copy: plain block-causal, blind to the noisy copy
    plain = model(input_ids=batch["input_ids"][:, clean], attention_mask=batch["attention_mask"][:, clean],
                  chunk_index=batch["chunk_index"][:, clean]).logits
    real = batch["attention_mask"][:, clean].bool()
    torch.testing.assert_close(logits[:, clean][real], plain[real], **CLOSE)


def test_noisy_chunks_do_not_see_each_other(model):
    batch = two_copy_batch(torch.Generator().manual_seed(1))
    changed = {name: value.clone() for name, value in batch.items()}
    first_noisy = PROMPT + CHUNKS * CHUNK
    changed["input_ids"][:, first_noisy:first_noisy + CHUNK] = 7  # another noisy chunk 0
    before, after = model(**batch).logits, model(**changed).logits
    torch.testing.assert_close(before[:, first_noisy + CHUNK:], after[:, first_noisy + CHUNK:], **CLOSE)
    assert not torch.allclose(before[:, first_noisy:first_noisy + CHUNK], after[:, first_noisy:first_noisy + CHUNK])


def test_noisy_copy_needs_chunk_index_and_positions(model):
    batch = two_copy_batch(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="noisy_copy needs chunk_index and position_ids"):
        model(input_ids=batch["input_ids"], noisy_copy=batch["noisy_copy"])


@pytest.mark.skipif(not flex.flex_available(), reason="this torch build has no FlexAttention")
def test_flex_block_mask_equals_the_dense_mask(model):
    batch = two_copy_batch(torch.Generator().manual_seed(3))
    before = flex.attention_backend()
    try:
        flex.set_attention_backend("sdpa")
        dense = model(**batch).logits
        flex.set_attention_backend("flex")
        with torch.no_grad():
            flexed = model(**batch).logits
    finally:
        flex.set_attention_backend(before)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(flexed[real], dense[real], **CLOSE)


def test_hybrid_clean_context_scores_each_chunk_against_the_clean_chunks_before_it():
    """With clean_context, every chunk's step logits equal those of the hybrid run on the prompt, the clean
    (ground-truth) chunks before it and that chunk as the collator left it, alone."""
    from support import make_batch, make_hybrid

    model = make_hybrid(clean_context=True).eval()
    batch = make_batch([5, 3], [3, 2], 4, masked=[[0, 2], [0, 1]])
    out = model(**batch, return_logits=True)
    plain = make_hybrid(clean_context=False).eval()
    plain.load_state_dict(model.state_dict())
    clean = batch["labels"].where(batch["labels"] != -100, batch["input_ids"])
    for row in range(2):
        chunk_index = batch["chunk_index"][row]
        for k in range(int(chunk_index.max()) + 1):
            this = chunk_index == k
            keep = (torch.arange(len(chunk_index)) < this.nonzero().min()) | this  # no right padding
            alone = dict(input_ids=torch.where(this, batch["input_ids"][row], clean[row])[keep][None],
                         attention_mask=batch["attention_mask"][row][keep][None], chunk_index=chunk_index[keep][None],
                         labels=batch["labels"][row][keep][None])
            expected = plain(**alone, return_logits=True).step_logits[:, 0, -int(this.sum()):]
            torch.testing.assert_close(out.step_logits[:, row, this], expected, **CLOSE)
    assert model(**batch).loss.isfinite()


@pytest.mark.parametrize("draft_feedback", [False, True])
def test_hybrid_copies_only_masked_chunks_and_scores_as_if_every_chunk_were_copied(monkeypatch, draft_feedback):
    """The noisy copy holds only the chunks with a mask token (unmasked ones are scored in the clean sequence),
    and every output equals the layout that copies every chunk and scores all of them on the copy."""
    from support import make_batch, make_hybrid

    from llada_trm.model import hybrid as hybrid_module

    model = make_hybrid(clean_context=True, draft_feedback=draft_feedback).eval()
    batch = make_batch([5, 3], [3, 2], 4, masked=[[0, 2], [1]])  # row 0: an unmasked chunk between masked ones
    widths = []
    model.backbone.register_forward_hook(lambda module, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]),
                                         with_kwargs=True)
    packed = model(**batch, return_logits=True)
    length = batch["input_ids"].shape[1]
    assert widths == [length + 2 * 4]  # row 0 has the most masked chunks: 2 of 4 tokens each

    unpacked_pair = hybrid_module.clean_context_pair
    monkeypatch.setattr(hybrid_module, "clean_context_pair",
                        lambda clean, noisy, mask, chunks, positions=None, copied=None, kept=None:
                        unpacked_pair(clean, noisy, mask, chunks, positions))
    every_chunk = model(**batch, return_logits=True)
    assert widths[-1] == 2 * length
    for name in ("step_logits", "step_token_loss", "final_predictions", "backbone_token_loss", "loss"):
        torch.testing.assert_close(getattr(packed, name), getattr(every_chunk, name), **CLOSE)


@pytest.mark.parametrize("draft_feedback", [False, True])
def test_hybrid_scoring_only_masked_inputs_leaves_out_what_no_scored_position_reads(draft_feedback):
    """With every step scored at masked inputs only (intermediate and final_step_positions "masked", unmasked weight
    0), training packs each row to its real clean positions before its last masked chunk plus its copies: padding
    and the clean chunks from the last masked one on are left out. The loss, the head's gradients and every score
    at a masked position equal the full layout's."""
    from support import make_batch, make_hybrid

    settings = dict(clean_context=True, draft_feedback=draft_feedback, unmasked_chunk_weight=0.0,
                    intermediate_step_positions="masked")
    full, packed = (make_hybrid(**settings, final_step_positions=final).train() for final in ("all", "masked"))
    # Row 0: its last chunk unmasked; row 1: one masked chunk first; row 2: the masked chunk before two unmasked.
    batch = make_batch([5, 3, 6], [3, 2, 4], 4, masked=[[0, 2], [0], [1]])
    widths = []
    for model in (full, packed):
        model.backbone.register_forward_hook(
            lambda module, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    outputs = []
    for model in (full, packed):
        out = model(**batch)
        out.loss.backward()
        outputs.append((out, {n: p.grad for n, p in model.head.named_parameters() if p.grad is not None}))
    (reference, reference_grads), (cut, cut_grads) = outputs
    length = batch["input_ids"].shape[1]
    # real clean positions kept + copies: row 0 5 + 8 + 8, row 1 3 + 4, row 2 6 + 4 + 4; the full layout L + 8
    assert widths == [length + 8, 21]
    masked = (batch["input_ids"] == 2) & (batch["labels"] != -100)
    for name in ("step_token_loss", "final_predictions", "backbone_token_loss"):
        torch.testing.assert_close(getattr(cut, name)[..., masked], getattr(reference, name)[..., masked], **CLOSE)
    torch.testing.assert_close(cut.loss, reference.loss, **CLOSE)
    assert cut_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(cut_grads[name], grad, **CLOSE)
    with torch.no_grad():  # evaluation scores every position, in the full layout
        packed.eval()(**batch)
    assert widths[-1] == length + 8


def test_hybrid_packed_layout_of_a_batch_without_masked_chunks_is_an_empty_step():
    """Nothing masked, nothing scored: the packed layout is one padding column, the loss a zero that backward
    accepts (an empty step, counted as such by the trainer), and no metric is NaN."""
    from support import make_batch, make_hybrid

    model = make_hybrid(clean_context=True, unmasked_chunk_weight=0.0, intermediate_step_positions="masked",
                        final_step_positions="masked").train()
    widths = []
    model.backbone.register_forward_hook(
        lambda module, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    out = model(**make_batch([5, 3], [3, 2], 4, masked=[[], []]))
    out.loss.backward()
    assert widths == [1] and float(out.loss.detach()) == 0.0
    assert all(torch.isfinite(value) for value in out.metrics.as_dict().values())
