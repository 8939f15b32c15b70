"""Code paths that meet tensors on an accelerator: they run on every device this machine has (CPU always)."""

import pytest
import torch
from support import make_batch, make_hybrid

from llada_trm.training.debug_view import format_chunk_inspection

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_debug_view_works_on_the_batch_device(device, shipped_tokenizer):
    model = make_hybrid(chunk_size=4, steps=2).to(device)
    batch = {k: v.to(device) for k, v in make_batch([5, 3], [3, 2], 4, masked=[[1], [0]]).items()}
    with torch.no_grad():
        output = model(**batch)
    text = format_chunk_inspection(shipped_tokenizer, batch, output)
    assert "Masked 4/" in text and "Masked chunks: [1]" in text
    assert "Chunk 1/3: loss=" in text and ", weight=1.30" in text and ", weight=1.00" in text


@pytest.mark.parametrize("device", DEVICES)
def test_packed_scoring_trains_on_the_batch_device_and_the_debug_view_names_what_was_not_scored(device, shipped_tokenizer):
    """The 8B config's scoring (clean context, every step at masked inputs only: the packed layout) trains on the
    device; the debug view marks the unmasked chunks, which weigh 0 and were not scored."""
    model = make_hybrid(chunk_size=4, steps=2, clean_context=True, draft_feedback=True, unmasked_chunk_weight=0.0,
                        intermediate_step_positions="masked", final_step_positions="masked").to(device).train()
    batch = {k: v.to(device) for k, v in make_batch([5, 3], [3, 2], 4, masked=[[1], [0]]).items()}
    output = model(**batch)
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.head.out_proj.weight.grad.abs().sum() > 0
    text = format_chunk_inspection(shipped_tokenizer, batch, output)
    assert "Chunk 0/3: not scored, weight=0.00" in text and "Chunk 1/3: loss=" in text
    assert "Chunk 2/3: not scored" in text


@pytest.mark.parametrize("device", DEVICES)
def test_fused_lm_head_loss_under_bf16_autocast_matches_the_plain_path(device):
    """Under autocast the LM head's matmul runs in bf16 in both paths (autocast's dtype, not the weight's)."""
    model = make_hybrid(chunk_size=4, steps=2).to(device).train()
    batch = {k: v.to(device) for k, v in make_batch([5, 3], [3, 2], 4, masked=[[1], [0]]).items()}
    losses, grads = [], []
    for return_logits in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            output = model(**batch, return_logits=return_logits)
        output.loss.backward()
        losses.append(output.step_token_loss.detach())
        grads.append(model.head.out_proj.weight.grad.clone())
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-3)
