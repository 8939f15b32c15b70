"""`head_reads_layers`: the backbone hands the head the last n blocks' outputs, each through its final norm; the head
reads their concatenation in training and in decoding alike, and an n the backbone does not have is refused."""

import pytest
import torch
from support import CHUNK, PROMPTS, make_batch, make_hybrid, tiny_hybrid, tiny_model

from llada_trm.inference.chunk_decoding import generate_with_refinement
from llada_trm.model.configuration_hybrid import HybridConfigError
from llada_trm.training.arguments import UsageError, parse_arguments
from llada_trm.training.trainer import build_model


def test_layer_states_are_the_last_blocks_through_the_final_norm():
    model = tiny_model()  # 2 blocks
    transformer = model.model.transformer
    block_outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: block_outputs.append(out[0]))
             for block in transformer.blocks]
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    chunk_index = torch.tensor([[-1] * 4 + [0] * 4 + [1] * 4] * 2)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, chunk_index=chunk_index, output_hidden_states=True, read_layers=2)
    finally:
        for hook in hooks:
            hook.remove()
    expected = torch.cat([transformer.ln_f(block_outputs[0]), transformer.ln_f(block_outputs[1])], dim=-1)
    assert out.layer_states.shape == (2, 12, 2 * model.config.d_model)
    torch.testing.assert_close(out.layer_states, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.layer_states[..., model.config.d_model:], out.last_hidden_state, rtol=0, atol=0)
    with torch.no_grad():  # one layer: the last hidden state itself
        single = model(input_ids=ids, chunk_index=chunk_index, output_hidden_states=True)
    assert torch.equal(single.layer_states, single.last_hidden_state)
    with pytest.raises(ValueError, match="`read_layers` must be between 1 and the backbone's 2 layers, got 3"):
        model(input_ids=ids, output_hidden_states=True, read_layers=3)


def test_reading_two_layers_with_the_earlier_weights_zero_equals_reading_the_last():
    batch = make_batch([3, 5], [3, 2], 4, masked=[[0, 2], [1]])
    batch.pop("chunk_is_masked")
    one_layer, two_layers = make_hybrid(seed=0), make_hybrid(seed=0, head_reads_layers=2)
    d_model = one_layer.backbone.config.d_model
    assert two_layers.head.in_proj.in_features == 2 * d_model
    two_layers.load_state_dict(one_layer.state_dict() | {"head.in_proj.weight": two_layers.head.in_proj.weight})
    with torch.no_grad():
        two_layers.head.in_proj.weight[:, :d_model] = 0  # the earlier layer's half
        two_layers.head.in_proj.weight[:, d_model:] = one_layer.head.in_proj.weight
    expected = one_layer(**batch, return_logits=True).step_logits
    torch.testing.assert_close(two_layers(**batch, return_logits=True).step_logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # not vacuous: the earlier layer reaches the logits once its weights are not zero
        two_layers.head.in_proj.weight[:, :d_model].normal_(std=0.3)
    assert not torch.allclose(two_layers(**batch, return_logits=True).step_logits, expected, atol=1e-3)


def test_decoding_reads_the_layers_training_read():
    model = tiny_hybrid(head_reads_layers=2)
    kwargs = dict(max_length=22, refine_confidence_threshold=0.3, return_trace=True)
    cached = generate_with_refinement(model, PROMPTS, use_cache=True, **kwargs)
    recomputed = generate_with_refinement(model, PROMPTS, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    # The first chunk after a prompt is the training forward's argmax for it, masked (every step, no early stop).
    prompt = PROMPTS[0]
    out = generate_with_refinement(model, [prompt], max_new_tokens=CHUNK, refine_confidence_threshold=2.0,
                                   ignore_eos=True)
    sequence = out.sequences
    width = sequence.shape[1] - CHUNK
    chunk_index = torch.tensor([[-1] * width + [0] * CHUNK])
    attention = (torch.arange(sequence.shape[1]) >= width - len(prompt)).long()[None]
    masked = sequence.clone()
    masked[0, width:] = model.backbone.config.mask_token_id
    with torch.no_grad():
        logits = model(input_ids=masked, attention_mask=attention, chunk_index=chunk_index,
                       return_logits=True).step_logits[-1, 0, width:]
    logits[:, model.backbone.config.mask_token_id] = -torch.inf
    assert logits.argmax(-1).tolist() == sequence[0, width:].tolist()


def test_layers_the_backbone_does_not_have_are_refused():
    with pytest.raises(HybridConfigError, match=r"`head_reads_layers` \(3\) exceeds the backbone's 2 layers"):
        make_hybrid(head_reads_layers=3)
    # The training program says it in its flags' words (the shipped backbone has 6 layers).
    with pytest.raises(UsageError, match=r"^--head_reads_layers \(7\) exceeds the backbone's 6 layers$"):
        build_model(parse_arguments(["--head_reads_layers", "7"]))
