"""Per-token gradient trace: magnitudes and alignments against one autograd backward per token (float32)."""

import pytest
import torch
from conftest import make_config

from llada_trm import HybridConfig, LLaDAModelLM, LLaDATRMHybrid
from llada_trm.training.grad_trace import TokenGradTracer
from llada_trm.training.diffusion import forward_mask
from llada_trm.model.losses import step_weights
from llada_trm.training.objectives import HybridObjective, LLaDASFTObjective
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig


def hybrid_model(**overrides) -> LLaDATRMHybrid:
    torch.manual_seed(0)
    backbone = LLaDAModelLM(make_config())
    fields = dict(chunk_size=4, head_hidden_size=16, head_heads=2, max_recursive_steps=3, min_recursive_steps=1)
    model = LLaDATRMHybrid(HybridConfig(**{**fields, **overrides}), backbone)
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.3)  # a head that already changes the logits
    return model.eval()


def make_batch(batch=3, prompt_chunks=1, chunks=3, chunk=4, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    length = (prompt_chunks + chunks) * chunk
    ids = torch.randint(3, 60, (batch, length), generator=g)
    chunk_index = torch.tensor([-1] * prompt_chunks * chunk + [k for k in range(chunks) for _ in range(chunk)])
    chunk_index = chunk_index.expand(batch, length).clone()
    attention = torch.ones(batch, length, dtype=torch.long)
    chunk_index[0, -chunk:], attention[0, -chunk:] = -1, 0  # the first sample is one chunk shorter (padding)
    labels = torch.where(chunk_index >= 0, ids, -100)
    masked = torch.rand(batch, chunks, generator=g) < 0.5
    ids = torch.where((chunk_index >= 0) & masked.gather(1, chunk_index.clamp(min=0)), 2, ids)
    return {"input_ids": ids, "attention_mask": attention, "chunk_index": chunk_index, "labels": labels,
            "chunk_is_masked": masked, "sample_id": torch.arange(batch)}


def reference(model, per_token_losses, weights, chosen):
    """One autograd backward per token: (norms, alignments) of d ell_t / d theta against G = sum_t w_t grad_t."""
    params = list(chosen.values())
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
             for loss in per_token_losses]
    stacked = torch.stack(grads).double()
    aggregate = (weights.double()[:, None] * stacked).sum(0)
    norms = stacked.norm(dim=1)
    return norms, stacked @ aggregate / (norms * aggregate.norm())


def traced(records):
    tokens = [r for r in records if r["record"] == "token"]
    return (torch.tensor([r["raw_grad_norm"] for r in tokens], dtype=torch.float64),
            torch.tensor([r["alignment"] for r in tokens], dtype=torch.float64), tokens)


def replayed_sft_losses(backbone, batch, seed: int = 1):
    """Per-token CE (B, L) of the LLaDA SFT objective under the masks its generator (seeded `seed`) draws, and the
    (rows, positions) of the masked tokens."""
    is_response = batch["labels"] != -100
    targets = batch["labels"].where(is_response, batch["input_ids"])
    noisy, is_masked, _ = forward_mask(targets, is_response, 2, torch.Generator().manual_seed(seed))
    logits = backbone(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    rows, positions = is_masked.nonzero(as_tuple=True)
    return ce, rows, positions


@pytest.mark.parametrize("params", [None, "head.out_proj", "head.blocks.0.k_proj,head.norm"])
@pytest.mark.parametrize("weighting", ["none", "antiop"])
def test_hybrid_per_token_gradients_equal_per_token_autograd(params, weighting):
    model = hybrid_model()
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig(loss_weighting=weighting,
                                                                                   antiop_clip_mult=1.0))
    batch = make_batch()
    tracer = TokenGradTracer(model, "hybrid", objective, params=params, write=False)
    records = tracer.trace(model, batch, None, step=1)
    norms, alignments, tokens = traced(records)

    output = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "chunk_index", "labels", "chunk_is_masked")})
    alpha = step_weights(output.step_token_loss.shape[0], "linear")
    alpha = alpha / alpha.sum()
    rows, positions = output.supervised_mask.nonzero(as_tuple=True)
    ell = (alpha[:, None] * output.step_token_loss[:, rows, positions]).sum(0)
    weights = torch.tensor([r["loss_weight"] for r in tokens])
    want_norms, want_alignments = reference(model, list(ell), weights, tracer.chosen)

    assert len(tokens) == rows.numel() == 32
    torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(alignments, want_alignments, rtol=1e-4, atol=1e-5)
    assert (alignments < 0).any() and (alignments > 0).any()  # a test that could tell the signs apart
    if weighting == "antiop":
        assert min(r["loss_weight"] for r in tokens) < max(r["loss_weight"] for r in tokens)


def test_hybrid_per_step_gradients_equal_per_token_autograd():
    model = hybrid_model()
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig())
    batch = make_batch()
    tracer = TokenGradTracer(model, "hybrid", objective, write=False)
    _, _, tokens = traced(tracer.trace(model, batch, None, step=1))
    output = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "chunk_index", "labels", "chunk_is_masked")})
    rows, positions = output.supervised_mask.nonzero(as_tuple=True)
    weights = torch.tensor([r["loss_weight"] for r in tokens])
    alpha = step_weights(3, "linear") / step_weights(3, "linear").sum()
    ell = (alpha[:, None] * output.step_token_loss[:, rows, positions]).sum(0)
    total_norms, _ = reference(model, list(ell), weights, tracer.chosen)
    for s in range(3):
        params = list(tracer.chosen.values())
        per_token = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, params, retain_graph=True)])
                                 for l in output.step_token_loss[s, rows, positions]]).double()
        got = torch.tensor([r["step_grad_norms"][s] / r["loss_weight"] for r in tokens], dtype=torch.float64)
        torch.testing.assert_close(got, per_token.norm(dim=1), rtol=1e-4, atol=1e-9)
    assert total_norms.shape == (32,)


def test_fast_path_covers_out_proj_and_agrees_with_the_general_path():
    model = hybrid_model()
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig())
    fast = TokenGradTracer(model, "hybrid", objective, params="head.out_proj", write=False)
    assert list(fast.fast) == ["head.out_proj"] and not fast.general
    general = TokenGradTracer(model, "hybrid", objective, params="head.out_proj", write=False)
    general.fast, general.fast_param, general.general = {}, {}, dict(general.chosen)
    batch = make_batch()
    a, b = traced(fast.trace(model, batch, None, 1)), traced(general.trace(model, batch, None, 1))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


def sft_backbone():
    torch.manual_seed(0)
    backbone = LLaDAModelLM(make_config())
    for name, p in backbone.named_parameters():
        p.requires_grad_(name.startswith("model.transformer.blocks.1."))
    return backbone.eval()


def test_llada_sft_per_token_gradients_equal_per_token_autograd():
    backbone = sft_backbone()
    objective = LLaDASFTObjective(mask_token_id=2)
    batch = make_batch(batch=4, chunks=4)
    tracer = TokenGradTracer(backbone, "llada_sft", objective, write=False)
    assert {n.split(".")[-1] for n in tracer.fast} == {"q_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}
    assert any("k_proj" in n for n in tracer.general) and any("attn_norm" in n for n in tracer.general)
    records = tracer.trace(backbone, batch, torch.Generator().manual_seed(1), step=1)
    norms, alignments, tokens = traced(records)

    # The same masks as the objective: replay its generator, and check the weights reproduce its loss.
    ce, rows, positions = replayed_sft_losses(backbone, batch)
    weights = torch.tensor([r["loss_weight"] for r in tokens])
    objective_loss = objective(backbone, batch, torch.Generator().manual_seed(1)).loss_sum / 4
    torch.testing.assert_close((weights * ce[rows, positions]).sum(), objective_loss, rtol=1e-5, atol=1e-7)

    want_norms, want_alignments = reference(backbone, list(ce[rows, positions]), weights, tracer.chosen)
    assert len(tokens) == rows.numel() > 20 and rows.unique().numel() == 4
    torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(alignments, want_alignments, rtol=1e-4, atol=1e-5)


def test_unknown_parameter_pattern_is_an_error_naming_it():
    model = hybrid_model()
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig())
    with pytest.raises(ValueError, match="head.no_such_layer"):
        TokenGradTracer(model, "hybrid", objective, params="head.no_such_layer", write=False)


def test_llada_sft_with_lora_adapters_equals_per_token_autograd():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    backbone = peft.get_peft_model(LLaDAModelLM(make_config()),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "attn_out"]))
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    backbone.eval()
    objective = LLaDASFTObjective(mask_token_id=2)
    batch = make_batch(batch=4, chunks=4)
    tracer = TokenGradTracer(backbone, "llada_sft", objective, write=False)
    assert any("q_proj.lora_A" in n for n in tracer.fast) and any("v_proj.lora_B" in n for n in tracer.general)
    norms, alignments, tokens = traced(tracer.trace(backbone, batch, torch.Generator().manual_seed(1), step=1))

    ce, rows, positions = replayed_sft_losses(backbone, batch)
    weights = torch.tensor([r["loss_weight"] for r in tokens])
    want_norms, want_alignments = reference(backbone, list(ce[rows, positions]), weights, tracer.chosen)
    torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(alignments, want_alignments, rtol=1e-4, atol=1e-5)
