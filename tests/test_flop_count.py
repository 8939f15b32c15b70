"""Counted FLOPs (benchmarks/flop_count.py, count_scale.py): hand counts, shapes-only against real runs, and the
per-layer extrapolation against a count of every layer."""

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llada_trm.data.collator import positions_in_masked_chunks
from llada_trm.model.configuration_hybrid import HybridConfig
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.modeling_llada import LLaDAModelLM
from llada_trm.training.arguments import UsageError, parse_arguments
from conftest import make_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import count_scale  # noqa: E402
from flop_count import CPU_ATTENTION, count_flops, extrapolate, lazy_parameters, parts_of  # noqa: E402
from flop_count import shape_only_compute  # noqa: E402

CONFIG = dict(d_model=32, n_heads=4, n_kv_heads=4, mlp_hidden_size=48, vocab_size=64, embedding_size=64,
              mask_token_id=63, eos_token_id=62, pad_token_id=62, bos_token_id=61)


def backbone(n_layers: int = 2, lazy: bool = False) -> LLaDAModelLM:
    config = make_config(n_layers=n_layers, **CONFIG)
    torch.manual_seed(0)
    if not lazy:
        return LLaDAModelLM(config).eval()
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    return lazy_parameters(model).eval()


def hybrid(lazy: bool, **settings) -> LLaDATRMHybrid:
    model = LLaDATRMHybrid(HybridConfig(max_recursive_steps=3, min_recursive_steps=1, **settings),
                           backbone=backbone(lazy=lazy))
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.02) if not lazy else None
    return model.train()


def batch(rows=2, prompt=16, chunks=3) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (rows, prompt + 16 * chunks), generator=g)
    chunk_index = torch.cat([torch.full((prompt,), -1), torch.arange(chunks).repeat_interleave(16)])
    chunk_index = chunk_index.expand(rows, -1).contiguous()
    masked = torch.rand(rows, chunks, generator=g) < 0.5
    masked[:, 0], masked[:, -1] = True, False  # both kinds of chunk in every row
    inputs = torch.where(positions_in_masked_chunks(chunk_index, masked), 63, ids)
    return dict(input_ids=inputs, attention_mask=torch.ones_like(ids), chunk_index=chunk_index,
                labels=torch.where(chunk_index >= 0, ids, -100), chunk_is_masked=masked)


def test_backbone_forward_equals_a_hand_count_of_its_products():
    b = batch()
    rows, length = b["input_ids"].shape
    tokens, d, mlp, vocab, heads, layers = rows * length, 32, 48, 64, 4, 2
    projections = layers * (4 * 2 * tokens * d * d + 3 * 2 * tokens * d * mlp)  # q, k, v, out; gate, up, down
    attention = layers * 2 * (2 * rows * heads * length * length * (d // heads))  # scores and values, dense
    output = 2 * tokens * d * vocab
    for lazy in (False, True):
        model = backbone(lazy=lazy)

        def forward():
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], chunk_index=b["chunk_index"])

        with shape_only_compute() if lazy else contextlib.nullcontext():
            split = count_flops(forward, parts_of(model))
        assert (split.backbone, split.attention, split.output_layer, split.head) == (projections, attention, output, 0)


EMBEDDED_LEVERS = dict(clean_context=True, draft_feedback=True, unmasked_chunk_weight=0.0)


@pytest.mark.parametrize("settings", [{}, EMBEDDED_LEVERS, dict(
    EMBEDDED_LEVERS, intermediate_step_positions="masked", final_step_positions="masked")])
def test_shapes_only_count_equals_a_plain_flop_counter_run(settings):
    """The same hybrid step counted three ways: plain FlopCounterMode on real weights, the split on real weights,
    the split with shapes only; and the output layer is the fused loss's 2 products per step plus the backbone's
    own scores, 2 N d V each, N the scored positions (the masked inputs only where every step is scored there:
    the 8B config's packed layout)."""
    b = batch()
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as plain:
        hybrid(lazy=False, **settings)(**b).loss.backward()
    real_model, lazy_model = hybrid(False, **settings), hybrid(True, **settings)
    real = count_flops(lambda: real_model(**b).loss.backward(), parts_of(real_model))
    with shape_only_compute():
        shapes_only = count_flops(lambda: lazy_model(**b).loss.backward(), parts_of(lazy_model))
    assert real.total == plain.get_total_flops() > 0
    assert shapes_only == real
    scored = (b["labels"] != -100) & ((b["input_ids"] == 63) | ("final_step_positions" not in settings))
    assert real.output_layer == 2 * int(scored.sum()) * 32 * 64 * (2 * 3 + 1)
    assert real.head > 0 and real.attention > 0 and real.backbone > 0


def test_decoding_and_lora_counts_with_shapes_only_equal_real_runs():
    from peft import LoraConfig, get_peft_model

    prompt = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(3))
    counts = []
    for lazy in (False, True):
        model = hybrid(lazy).eval()
        with torch.no_grad(), shape_only_compute() if lazy else contextlib.nullcontext():
            decode = count_flops(lambda: model.generate_with_refinement(
                prompt, max_new_tokens=32, ignore_eos=True, min_recursive_steps=3), parts_of(model))
        lora = get_peft_model(backbone(lazy=lazy).train(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        b = batch()
        with shape_only_compute() if lazy else contextlib.nullcontext():
            train = count_flops(lambda: lora(input_ids=b["input_ids"]).logits.sum().backward(), parts_of(lora))
        counts.append((decode, train))
    assert counts[0] == counts[1]
    assert counts[0][0].head > 0 and counts[0][1].backbone > 0


def test_extrapolation_equals_a_count_of_every_layer_at_the_full_vocabulary():
    """Every row of `bench_scale.py --count_flops`, from 1 and 2 layers and vocabularies 32 and 48 extended to 4 layers
    and 64 tokens, against a count at 4 and 64."""
    config = make_config(n_layers=4, max_sequence_length=512, **CONFIG)
    recipe = dataclasses.replace(count_scale.config_of_8b_recipe(), max_recursive_steps=2, min_recursive_steps=1,
                                 head_hidden_size=16)
    recipe.resolve_head_shape(config.d_model)
    args = argparse.Namespace(batch_size=2, prompt_length=16, num_chunks=2, new_tokens=32, block_length=32, skip_levers=False)
    for counter in (count_scale.training_counts, count_scale.decoding_counts):
        full = counter(config, 4, recipe, args)
        scaled = extrapolate(lambda k, v: counter(count_scale.reduced(config, k, v), k, recipe, args), 4, 64,
                             small_vocabularies=(32, 48))
        assert scaled.keys() == full.keys()
        for row in full:
            assert scaled[row].total == pytest.approx(full[row].total, rel=0.01), row
            assert scaled[row].backbone == pytest.approx(full[row].backbone, rel=0.01), row
            assert scaled[row].output_layer == pytest.approx(full[row].output_layer, rel=0.01), row
            assert scaled[row].saved_mib == pytest.approx(full[row].saved_mib, rel=0.01, abs=1e-6), row


def test_a_product_of_a_weight_outside_the_model_is_an_error():
    model = backbone()
    stray = torch.nn.Linear(32, 32, bias=False)
    with pytest.raises(RuntimeError, match="belong to no part"):
        count_flops(lambda: stray(torch.ones(2, 32)), parts_of(model))


def outputs_and_head_gradients(models, b: dict) -> list[tuple]:
    """Each model's training output on batch `b` and its head's gradients of that output's loss."""
    results = []
    for model in models:
        model.zero_grad()
        out = model(**b)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.head.named_parameters() if p.grad is not None}))
    return results


def assert_same_gradients(grads: dict, reference: dict) -> None:
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("settings", [{}, dict(clean_context=True, draft_feedback=True)])
def test_intermediate_steps_on_masked_positions_keep_the_last_step_exact(settings):
    """`intermediate_step_positions: masked` scores the steps before the last at masked inputs only: the last step's
    CE equals a plain float32 cross-entropy of its logits, the states (and with unmasked weight 0 the loss and the
    head's gradients) equal scoring every position, and the output layer costs less."""
    b = batch()
    torch.manual_seed(1)
    reference = hybrid(lazy=False, unmasked_chunk_weight=0.0, **settings)
    narrowed = hybrid(lazy=False, unmasked_chunk_weight=0.0, intermediate_step_positions="masked", **settings)
    narrowed.load_state_dict(reference.state_dict())
    with torch.no_grad():
        plain = reference(**b, return_logits=True)
    supervised = b["labels"] != -100
    last_logits = plain.step_logits[-1][supervised].float()
    plain_ce = torch.nn.functional.cross_entropy(last_logits, b["labels"][supervised], reduction="none")
    (full, full_grads), (cut, cut_grads) = outputs_and_head_gradients((reference, narrowed), b)
    torch.testing.assert_close(cut.step_token_loss[-1][supervised], plain_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut.step_token_loss[-1], full.step_token_loss[-1], rtol=0, atol=0)
    torch.testing.assert_close(cut.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert_same_gradients(cut_grads, full_grads)
    masked_input = (b["input_ids"] == 63) & supervised
    assert (cut.step_token_loss[0][supervised & ~masked_input] == 0).all()
    assert (cut.step_token_loss[0][masked_input] > 0).all()
    counts = [count_flops(lambda m=m: m(**b).loss.backward(), parts_of(m)) for m in (reference, narrowed)]
    assert counts[1].output_layer < counts[0].output_layer and counts[1].head <= counts[0].head


@pytest.mark.parametrize("settings", [{}, dict(clean_context=True, draft_feedback=True)])
def test_last_step_on_masked_positions_keeps_the_loss_and_its_gradients(settings):
    """`final_step_positions: masked` (with unmasked weight 0, which it requires) scores the last step and the
    backbone at masked inputs only, in training: there the CE equals a plain float32 cross-entropy of the full
    model's logits; the loss and the head's gradients equal scoring every position; the metrics are taken over the
    scored positions and the unmasked-chunk loss is left out; evaluation mode scores every position again."""
    b = batch()
    torch.manual_seed(1)
    common = dict(unmasked_chunk_weight=0.0, intermediate_step_positions="masked", **settings)
    reference = hybrid(lazy=False, **common)
    narrowed = hybrid(lazy=False, final_step_positions="masked", **common)
    narrowed.load_state_dict(reference.state_dict())
    with torch.no_grad():
        plain = reference(**b, return_logits=True)
    supervised = b["labels"] != -100
    masked_input = (b["input_ids"] == 63) & supervised
    cross_entropy = torch.nn.functional.cross_entropy
    plain_last = cross_entropy(plain.step_logits[-1][masked_input].float(), b["labels"][masked_input], reduction="none")
    plain_backbone = cross_entropy(plain.backbone_logits[masked_input].float(), b["labels"][masked_input],
                                   reduction="none")
    (full, full_grads), (cut, cut_grads) = outputs_and_head_gradients((reference, narrowed), b)
    torch.testing.assert_close(cut.step_token_loss[-1][masked_input], plain_last, rtol=1e-5, atol=1e-6)
    assert (cut.step_token_loss[-1][supervised & ~masked_input] == 0).all()
    assert torch.equal(cut.step_scored[-1], masked_input) and torch.equal(full.step_scored[-1], supervised)
    torch.testing.assert_close(cut.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert_same_gradients(cut_grads, full_grads)
    metrics = cut.metrics.as_dict()
    assert "unmasked_chunk_loss" not in metrics and "unmasked_chunk_loss" in full.metrics.as_dict()
    torch.testing.assert_close(metrics["last_step_loss"], plain_last.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["backbone_loss"], plain_backbone.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["masked_chunk_loss"], full.metrics.masked_chunk_loss, rtol=1e-6, atol=1e-7)
    counts = [count_flops(lambda m=m: m(**b).loss.backward(), parts_of(m)) for m in (reference, narrowed)]
    assert counts[1].output_layer < counts[0].output_layer
    with torch.no_grad():
        evaluated = narrowed.eval()(**b)
    assert torch.equal(evaluated.step_scored[-1], supervised)
    torch.testing.assert_close(evaluated.step_token_loss[-1][supervised], plain.step_token_loss[-1][supervised],
                               rtol=1e-5, atol=1e-6)


def test_last_step_on_masked_positions_is_refused_where_unmasked_positions_weigh():
    """A usage error naming the flags: unmasked chunks that weigh, truncation or token weighting (which read the
    last step's loss at every supervised position), or an unknown value."""
    narrowed = ["--final_step_positions", "masked"]
    with pytest.raises(UsageError, match="--final_step_positions masked .* needs --unmasked_chunk_weight 0"):
        parse_arguments(narrowed + ["--unmasked_chunk_weight", "0.5"], environ={})
    with pytest.raises(UsageError, match="TRUNCATION_ENABLE"):
        parse_arguments(narrowed, environ={"TRUNCATION_ENABLE": "1"})
    with pytest.raises(UsageError, match="--loss_weighting"):
        parse_arguments(narrowed + ["--loss_weighting", "dft"], environ={})
    with pytest.raises(UsageError, match="--final_step_positions must be one of all, masked"):
        parse_arguments(["--final_step_positions", "last"], environ={})
    assert parse_arguments(narrowed, environ={}).model.final_step_positions == "masked"  # the profile weighs 0
