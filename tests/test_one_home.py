"""One home per concept: the model's loss equals the trainer objective's, decoding settings as a dataclass or as
keywords, one prompt encoder, one masked-chunk rule, and the inference loader outside the command-line module."""

import pytest
import torch
from support import make_batch, make_hybrid
from support import PROMPTS, tiny_hybrid

from llada_trm.data.collator import positions_in_masked_chunks
from llada_trm.data.layout import encode_prompt, render_prompt, text_ids, with_bos
from llada_trm.inference.chunk_decoding import generate_with_refinement
from llada_trm.inference.decoding_settings import DecodingSettings
from llada_trm.model.losses import chunk_token_weights, hybrid_loss
from llada_trm.training.objectives import HybridObjective
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig


@pytest.mark.parametrize("step_weighting", ["linear", "uniform"])
def test_model_loss_equals_the_objective_without_truncation_or_weighting(step_weighting):
    model = make_hybrid(deep_supervision_weight=0.3, unmasked_chunk_weight=0.5, step_weighting=step_weighting)
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig())
    result = objective(model, batch, torch.Generator().manual_seed(0))
    output = model(**batch)
    assert torch.equal(result.count, objective.pre_count(batch))
    assert torch.allclose(output.loss, result.loss_sum / result.count, rtol=1e-6, atol=0)
    assert torch.equal(hybrid_loss(output, step_weighting)[0], output.loss)
    assert float(output.metrics.loss) == float(output.loss.detach())


def test_decoding_settings_equal_the_keywords_and_overrides_apply_on_top():
    model = tiny_hybrid()
    by_keywords = generate_with_refinement(model, PROMPTS, max_length=22, decode_steps_per_chunk=2, return_trace=True)
    settings = DecodingSettings(max_length=22, decode_steps_per_chunk=2, return_trace=True)
    by_settings = generate_with_refinement(model, PROMPTS, settings=settings)
    assert by_settings.new_tokens == by_keywords.new_tokens
    assert torch.equal(by_settings.sequences, by_keywords.sequences)
    overridden = generate_with_refinement(model, PROMPTS, settings=settings, enable_refinement=False)
    plain = generate_with_refinement(model, PROMPTS, max_length=22, decode_steps_per_chunk=2, enable_refinement=False)
    assert overridden.new_tokens == plain.new_tokens
    assert settings.enable_refinement  # overrides make a copy


def test_unknown_decoding_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="max_len"):
        generate_with_refinement(tiny_hybrid(), PROMPTS, max_len=22)


def test_decoding_settings_resolve_model_defaults_and_validate():
    config = tiny_hybrid().config
    resolved = DecodingSettings().resolved(config)
    assert resolved.max_recursive_steps == config.max_recursive_steps
    assert resolved.refine_confidence_threshold == config.refine_confidence_threshold
    with pytest.raises(ValueError, match="decode_steps_per_chunk"):
        DecodingSettings(decode_steps_per_chunk=config.chunk_size + 1).resolved(config)


def test_prompt_encoder_puts_bos_first(shipped_tokenizer):
    text = render_prompt("Mia has 3 apples.")
    ids = shipped_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text_ids(shipped_tokenizer, text) == ids
    assert encode_prompt(shipped_tokenizer, text) == [shipped_tokenizer.bos_token_id, *ids]

    class NoBos:
        bos_token_id = None

    assert with_bos(NoBos(), [4, 5]) == [4, 5]


def test_positions_in_masked_chunks_are_the_weight_rule():
    chunk_index = torch.tensor([[-1, 0, 0, 1, 1, -1]])
    chunk_is_masked = torch.tensor([[True, False]])
    positions = positions_in_masked_chunks(chunk_index, chunk_is_masked)
    assert positions.tolist() == [[False, True, True, False, False, False]]
    weights = chunk_token_weights(chunk_index, chunk_is_masked, 0.3, 0.5)
    assert torch.equal(weights, chunk_token_weights(chunk_index, chunk_is_masked, 0.3, 0.5, positions))


def test_inference_loader_lives_in_the_library_and_the_cli_reexports_it():
    import llada_trm.generate as generate_cli
    from llada_trm.cli import EXIT_USAGE
    from llada_trm.inference.checkpoints import InferenceSetupError, load_for_inference

    assert EXIT_USAGE == 2 and generate_cli.EXIT_USAGE is EXIT_USAGE
    assert generate_cli.load_for_inference is load_for_inference
    assert generate_cli.InferenceSetupError is InferenceSetupError
    with pytest.raises(InferenceSetupError, match="exactly one"):
        load_for_inference()


def test_sampler_rows_stop_by_the_chunk_decoders_rule():
    from llada_trm.inference.chunk_decoding import token_stop
    from llada_trm.inference.exact_match import _until_stop

    assert _until_stop([5, 6, 1, 7], eos_id=1, answer_close_id=9) == [5, 6]
    assert _until_stop([5, 9, 1], eos_id=1, answer_close_id=9) == [5, 9]
    assert _until_stop([5, 6], eos_id=1, answer_close_id=None) == [5, 6]
    assert token_stop([1, 5, 9], 1, 1, 9) == 3


def test_misspelt_keyword_arguments_are_type_errors_naming_them(tmp_path):
    model = make_hybrid()
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    with pytest.raises(TypeError, match="misspelt"):
        model(**batch, misspelt=1)
    with pytest.raises(TypeError, match="safe_serialisation"):
        model.save_pretrained(tmp_path, safe_serialisation=True)
    assert not (tmp_path / "model.safetensors").exists()  # refused before anything was written


def test_step_scores_and_metrics_are_named_and_stay_on_the_device():
    model = make_hybrid(steps=3)
    batch = make_batch([5, 9], [3, 2], 4, [[0, 2], [1]])
    output = model(**batch)
    metrics = output.metrics.as_dict()
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in metrics.values())
    supervised = output.supervised_mask
    last = output.step_token_loss[-1]
    assert float(metrics["last_step_loss"]) == pytest.approx(float(last.detach()[supervised].mean()), rel=1e-6)
    assert float(metrics["first_step_loss"]) == pytest.approx(float(output.step_token_loss[0].detach()[supervised].mean()),
                                                              rel=1e-6)
    assert float(metrics["supervised_tokens"]) == int(supervised.sum())
