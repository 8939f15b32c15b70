"""The fused, chunked LM-head loss equals the plain fp32 log-softmax computation: values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from support import make_batch, make_hybrid

from llada_trm.model.lm_head_loss import lm_head_scores, rows_per_chunk
from llada_trm.training.objectives import HybridObjective
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig

TIGHT = dict(rtol=1e-5, atol=1e-6)


def problem(rows=37, width=24, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) / width**0.5
    targets = torch.randint(0, vocab, (rows,), generator=g)
    token_weight = torch.rand(rows, generator=g)  # like tau * c * w: a different coefficient per token
    return inputs, weight, targets, token_weight


def plain_scores(inputs, weight, targets):
    """The plain computation: (N, V) fp32 log-probabilities in one piece -> CE, p(label), max probability, argmax."""
    log_probs = F.log_softmax(F.linear(inputs, weight).float(), dim=-1)
    max_log_prob, prediction = log_probs.max(dim=-1)
    if targets is None:
        zeros = torch.zeros_like(max_log_prob)
        return zeros, zeros, max_log_prob.exp(), prediction
    target_log_prob = log_probs.gather(1, targets[:, None]).squeeze(1)
    return -target_log_prob, target_log_prob.exp(), max_log_prob.exp(), prediction


def small_chunks(vocab: int, rows: int) -> int:
    """A chunk budget that gives chunks of `rows` tokens."""
    return 4 * vocab * rows


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])
def test_values_equal_the_plain_computation(chunk_rows):
    inputs, weight, targets, _ = problem()
    assert rows_per_chunk(weight.shape[0], small_chunks(weight.shape[0], chunk_rows)) == chunk_rows
    fused = lm_head_scores(inputs, weight, targets, chunk_bytes=small_chunks(weight.shape[0], chunk_rows))
    ce, label_prob, max_prob, prediction = plain_scores(inputs, weight, targets)
    torch.testing.assert_close(fused.ce, ce, **TIGHT)
    torch.testing.assert_close(fused.label_prob, label_prob, **TIGHT)
    torch.testing.assert_close(fused.max_prob, max_prob, **TIGHT)
    assert torch.equal(fused.prediction, prediction)
    assert not fused.label_prob.requires_grad and not fused.max_prob.requires_grad


@pytest.mark.parametrize("train_weight", [False, True])
def test_weighted_loss_gradients_equal_the_plain_computation(train_weight):
    """Per-token coefficients (chunk weights, truncation, token weights) reach backward as grad_ce; both the
    frozen-head path (gradient finished in forward) and the trained-head path (recomputed) must match."""
    inputs, weight, targets, token_weight = problem()
    grads = []
    for fused in (True, False):
        x = inputs.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        ce = (lm_head_scores(x, w, targets, chunk_bytes=small_chunks(w.shape[0], 8)).ce if fused
              else plain_scores(x, w, targets)[0])
        (ce * token_weight).sum().backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TIGHT)
    if train_weight:
        torch.testing.assert_close(grads[0][1], grads[1][1], **TIGHT)
    else:
        assert grads[0][1] is None


def test_without_labels_only_confidence_and_prediction_are_given():
    inputs, weight, _, _ = problem()
    fused = lm_head_scores(inputs, weight, None)
    _, _, max_prob, prediction = plain_scores(inputs, weight, None)
    assert torch.equal(fused.ce, torch.zeros_like(fused.ce)) and torch.equal(fused.label_prob, fused.ce)
    torch.testing.assert_close(fused.max_prob, max_prob, **TIGHT)
    assert torch.equal(fused.prediction, prediction)


def test_no_supervised_tokens_is_empty_and_backward_works():
    inputs, weight, targets, _ = problem(rows=0)
    x = inputs.requires_grad_(True)
    scores = lm_head_scores(x, weight, targets)
    assert scores.ce.shape == (0,)
    scores.ce.sum().backward()
    assert x.grad.shape == (0, inputs.shape[1])


def test_bf16_head_stays_close_to_the_plain_bf16_computation():
    inputs, weight, targets, token_weight = problem()
    x = inputs.bfloat16().requires_grad_(True)
    fused = lm_head_scores(x, weight.bfloat16(), targets, chunk_bytes=small_chunks(weight.shape[0], 8))
    (fused.ce * token_weight).sum().backward()
    reference_x = inputs.bfloat16().requires_grad_(True)
    ce = plain_scores(reference_x, weight.bfloat16(), targets)[0]
    (ce * token_weight).sum().backward()
    assert fused.ce.dtype == torch.float32
    torch.testing.assert_close(fused.ce, ce, rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 statistics
    torch.testing.assert_close(x.grad.float(), reference_x.grad.float(), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------- in the hybrid


def hybrid_case(**overrides):
    model = make_hybrid(chunk_size=4, steps=3, **overrides).train()
    batch = make_batch([5, 3, 7], [3, 2, 1], 4, masked=[[1], [0, 1], [0]])
    return model, batch


def head_gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def plain_path(model):
    """The model with the step logits formed in full (`return_logits=True`), i.e. the plain computation."""
    return lambda **batch: model(**batch, return_logits=True)


@pytest.mark.parametrize("recompute", [True, False])
def test_hybrid_outputs_and_gradients_equal_the_plain_path(recompute):
    model, batch = hybrid_case(checkpoint_refinement_steps=recompute)
    fused, plain = model(**batch), plain_path(model)(**batch)
    for field in ("step_token_loss", "final_label_prob", "backbone_token_loss", "backbone_label_prob",
                  "chunk_confidence"):
        torch.testing.assert_close(getattr(fused, field), getattr(plain, field), **TIGHT)
    assert torch.equal(fused.final_predictions, plain.final_predictions)
    torch.testing.assert_close(fused.loss, plain.loss, **TIGHT)
    fused_grads, plain_grads = head_gradients(model, fused.loss), head_gradients(model, plain.loss)
    assert fused_grads.keys() == plain_grads.keys() and any(k.startswith("head.out_proj") for k in fused_grads)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **TIGHT, msg=name)


@pytest.mark.parametrize("weighting", ["lr", "dft", "antiop"])
def test_objective_with_truncation_and_token_weights_equals_the_plain_path(weighting):
    model, batch = hybrid_case()
    objective = HybridObjective(model.config, TruncationConfig(enable=True, threshold=4.0, min_prefix_tokens=1),
                                WeightingConfig(loss_weighting=weighting))
    fused = objective(model, batch, torch.Generator().manual_seed(0))
    plain = objective(plain_path(model), batch, torch.Generator().manual_seed(0))
    assert torch.equal(fused.decision.keep, plain.decision.keep) and not bool(fused.decision.keep.all())
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, **TIGHT)
    fused_grads, plain_grads = head_gradients(model, fused.loss_sum), head_gradients(model, plain.loss_sum)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **TIGHT, msg=name)


def test_trained_backbone_gets_the_lm_head_gradient_of_the_plain_path():
    model, batch = hybrid_case(freeze_backbone=False)
    fused_grads = head_gradients(model, model(**batch).loss)
    plain_grads = head_gradients(model, plain_path(model)(**batch).loss)
    lm_head = "backbone.model.transformer.ff_out.weight"
    assert lm_head in fused_grads and fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **TIGHT, msg=name)
