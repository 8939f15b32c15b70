"""Hybrid model: vectorised deep supervision vs the naive per-chunk loop, causality, init, gradients, checkpoints."""

import pytest
import torch
from conftest import make_config
from support import make_batch, make_hybrid

from llada_trm import LLaDAModelLM
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.losses import chunk_token_weights, deep_supervision_loss

def naive_per_chunk_losses(model, batch):
    """For each sample and chunk i, run backbone and head on [prompt, chunks 0..i] alone; keep chunk i's losses."""
    steps = model.config.max_recursive_steps
    result = torch.zeros(steps, *batch["input_ids"].shape)
    for b in range(batch["input_ids"].shape[0]):
        chunk_index = batch["chunk_index"][b]
        for i in range(int(chunk_index.max()) + 1):
            end = int((chunk_index == i).nonzero().max()) + 1
            piece = {k: v[b : b + 1, :end] for k, v in batch.items() if k != "chunk_is_masked"}
            out = model(**piece, chunk_is_masked=batch["chunk_is_masked"][b : b + 1])
            here = chunk_index[:end] == i
            result[:, b, :end][:, here] = out.step_token_loss[:, 0, here]
    return result


@pytest.mark.parametrize(
    "chunk_size,prompt_lengths,chunk_counts,masked",
    [
        (4, [5, 8], [3, 2], [[0, 2], [1]]),
        (3, [2, 7, 4], [1, 3, 2], [[0], [], [0, 1]]),
        (5, [9], [4], [[1, 3]]),
    ],
)
def test_vectorised_losses_equal_naive_per_chunk_loop(chunk_size, prompt_lengths, chunk_counts, masked):
    model = make_hybrid(chunk_size=chunk_size).eval()
    batch = make_batch(prompt_lengths, chunk_counts, chunk_size, masked)
    with torch.no_grad():
        vectorised = model(**batch).step_token_loss
        naive = naive_per_chunk_losses(model, batch)
    assert vectorised.abs().sum() > 0
    torch.testing.assert_close(vectorised, naive, rtol=1e-5, atol=1e-6)


def test_head_attention_never_sees_a_later_chunk():
    model = make_hybrid().eval()
    batch = make_batch([4], [3], 4, [[0]])
    hidden = torch.randn(1, 16, 32)
    later = hidden.clone()
    later[:, 12:] += torch.randn(1, 4, 32)
    context = model.head_context(hidden, batch["attention_mask"], batch["chunk_index"])
    with torch.no_grad():
        outs = []
        for h in (hidden, later):
            x = model.head.in_proj(h)
            state = model.head.initial_state(x)
            for _ in range(3):
                state = model.head.step(state, x, context)
            outs.append(state.y)
    torch.testing.assert_close(outs[0][:, :12], outs[1][:, :12])
    assert not torch.allclose(outs[0][:, 12:], outs[1][:, 12:])


def test_later_chunk_never_changes_earlier_logits_end_to_end():
    model = make_hybrid().eval()
    batch = make_batch([4], [3], 4, [[1]])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 12:] = torch.randint(3, 64, (1, 4))
    with torch.no_grad():
        a = model(**batch, return_logits=True).step_logits
        b = model(**changed, return_logits=True).step_logits
    torch.testing.assert_close(a[:, :, :12], b[:, :, :12])


def test_at_initialisation_hybrid_logits_equal_backbone_logits():
    torch.manual_seed(0)
    backbone = LLaDAModelLM(make_config()).eval()
    model = LLaDATRMHybrid(HybridConfig(chunk_size=4, max_recursive_steps=3, head_hidden_size=16, head_heads=2), backbone)
    batch = make_batch([5, 3], [2, 3], 4, [[0], [1, 2]])
    with torch.no_grad():
        out = model(**batch, return_logits=True)
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             chunk_index=batch["chunk_index"]).logits
    supervised = out.supervised_mask
    for step in range(3):
        torch.testing.assert_close(out.step_logits[step][supervised], reference[supervised], rtol=0, atol=0)
    torch.testing.assert_close(out.backbone_token_loss, out.step_token_loss[0])


def test_frozen_backbone_gets_no_gradient_and_the_loss_falls_on_an_overfit_batch():
    model = make_hybrid(steps=2).train()
    torch.nn.init.zeros_(model.head.out_proj.weight)
    assert not model.backbone.training and all(not p.requires_grad for p in model.backbone.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    batch = make_batch([4, 6], [2, 2], 4, [[0], [1]])
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_of_four_micro_batches_equals_one_batch_of_four():
    model = make_hybrid()
    batch = make_batch([5, 3, 8, 2], [2, 3, 1, 2], 4, [[0], [1, 2], [0], []])
    length = batch["input_ids"].shape[1]

    def gradients(micro_batches, normalizer):
        model.zero_grad()
        for mb in micro_batches:
            out = model(**mb)
            loss, _ = deep_supervision_loss(out.step_token_loss, out.chunk_weight, normalizer=normalizer)
            loss.backward()
        return [p.grad.clone() for p in model.head.parameters() if p.grad is not None]

    weights = chunk_token_weights(batch["chunk_index"], batch["chunk_is_masked"], 0.3, 1.0) * (batch["labels"] != -100)
    global_count = weights.sum()
    whole = gradients([batch], None)
    split = gradients([{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)], global_count)
    assert length > 0 and len(whole) == len(split)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unsupervised_batch_gives_attached_zero_loss():
    model = make_hybrid()
    batch = make_batch([5], [2], 4, [[0]])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    out = model(**batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_detaching_between_steps_changes_gradients_not_values():
    batch = make_batch([5], [2], 4, [[1]])
    results = []
    for detach in (True, False):
        model = make_hybrid(detach_between_steps=detach)
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.item(), model.head.in_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert not torch.allclose(results[0][1], results[1][1])


def test_checkpointed_steps_give_the_same_loss_and_gradients():
    batch = make_batch([5, 2], [2, 3], 4, [[1], [0]])
    results = []
    for flag in (False, True):
        model = make_hybrid(checkpoint_refinement_steps=flag).train()
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.head.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_head_only_checkpoint_round_trip(tmp_path):
    model = make_hybrid().eval()
    backbone_dir = tmp_path / "backbone"
    model.backbone.save_pretrained(backbone_dir)
    model.config.backbone_name_or_path = str(backbone_dir)
    model.save_pretrained(tmp_path / "hybrid")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "hybrid" / "model.safetensors"))
    assert saved and all(key.startswith("head.") for key in saved)
    assert not (tmp_path / "hybrid" / "backbone").exists()
    head_bytes = (tmp_path / "hybrid" / "model.safetensors").stat().st_size
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    assert head_bytes < backbone_bytes

    loaded = LLaDATRMHybrid.from_pretrained(tmp_path / "hybrid").eval()
    batch = make_batch([5], [2], 4, [[0]])
    with torch.no_grad():
        a = model(**batch, return_logits=True).step_logits
        b = loaded(**batch, return_logits=True).step_logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trainable_backbone_is_saved_in_full(tmp_path):
    model = make_hybrid(freeze_backbone=False).eval()
    assert all(p.requires_grad for p in model.backbone.parameters())
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "backbone" / "model.safetensors").exists()
    loaded = LLaDATRMHybrid.from_pretrained(tmp_path / "full").eval()
    batch = make_batch([5], [2], 4, [[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).step_token_loss, loaded(**batch).step_token_loss, rtol=0, atol=0)


def test_steps_to_confidence_follow_threshold_and_min_steps():
    model = make_hybrid(steps=4, refine_confidence_threshold=0.5)
    model.config.min_recursive_steps = 2
    confidence = torch.tensor([[[0.9, 0.1, 0.4]], [[0.2, 0.6, 0.4]], [[0.3, 0.2, 0.4]], [[0.7, 0.9, 0.4]]])
    assert model.steps_to_reach(confidence).tolist() == [[4, 2, 4]]


def test_refinement_steps_are_recomputed_by_default_exactly_when_detached():
    assert HybridConfig().recompute_steps is True
    assert HybridConfig(detach_between_steps=False).recompute_steps is False
    assert HybridConfig(checkpoint_refinement_steps=False).recompute_steps is False


def test_from_pretrained_rejects_options_it_would_otherwise_ignore(tmp_path):
    model = make_hybrid(freeze_backbone=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="device_map"):
        LLaDATRMHybrid.from_pretrained(tmp_path, device_map="auto")


def test_head_trains_in_fp32_on_a_bf16_backbone():
    torch.manual_seed(0)
    backbone = LLaDAModelLM(make_config()).to(torch.bfloat16)
    model = LLaDATRMHybrid(HybridConfig(chunk_size=4, max_recursive_steps=2, head_hidden_size=16, head_heads=2),
                           backbone).train()
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    batch = make_batch([5, 3], [2, 2], 4, [[0], [1]])
    out = model(**batch, return_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.head.out_proj.weight.grad.dtype == torch.float32
    with torch.no_grad():  # at initialisation still exactly the backbone's logits
        reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             chunk_index=batch["chunk_index"]).logits
    torch.testing.assert_close(out.step_logits[-1][out.supervised_mask], reference[out.supervised_mask], rtol=0, atol=0)
    generated = model.eval().generate_with_refinement([[5, 6, 7]], max_length=11)
    assert generated.sequences.shape[1] >= 4
