"""`--loss_weighting lr` with LoRA: the reference is the backbone with its adapters disabled."""

import copy

import pytest
import torch
from conftest import make_config

from llada_trm import HybridConfig, LLaDAModelLM, LLaDATRMHybrid
from llada_trm.training.arguments import UsageError, parse_arguments
from llada_trm.model.losses import deep_supervision_loss
from llada_trm.training.objectives import HybridObjective
from llada_trm.training.truncation import TruncationConfig
from llada_trm.training.weighting import WeightingConfig

peft = pytest.importorskip("peft")

INPUTS = ("input_ids", "attention_mask", "chunk_index", "labels", "chunk_is_masked")


def lora_hybrid():
    torch.manual_seed(0)
    base = LLaDAModelLM(make_config()).eval()
    pristine = copy.deepcopy(base)
    backbone = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the backbone's predictions
    config = HybridConfig(chunk_size=4, head_hidden_size=16, head_heads=2, max_recursive_steps=2,
                          min_recursive_steps=1, freeze_backbone=False)
    model = LLaDATRMHybrid(config, backbone)
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.3)
    return model, pristine


def batch():
    g = torch.Generator().manual_seed(0)
    chunk_index = torch.tensor([[-1] * 4 + [0] * 4 + [1] * 4] * 2)
    ids = torch.randint(3, 60, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long), "chunk_index": chunk_index,
            "labels": torch.where(chunk_index >= 0, ids, -100), "chunk_is_masked": torch.tensor([[True, False]] * 2)}


def test_lr_reference_under_lora_is_the_adapter_free_backbone():
    model, pristine = lora_hybrid()
    weighting = WeightingConfig(loss_weighting="lr", lr_weight_alpha=2.0)
    objective = HybridObjective(model.config, TruncationConfig(), weighting)
    b = batch()
    result = objective(model, b, None)
    output = result.output
    supervised = output.supervised_mask

    hidden = pristine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], chunk_index=b["chunk_index"],
                      output_hidden_states=True).last_hidden_state
    p_base = pristine.lm_head(hidden).float().softmax(-1).gather(2, b["labels"].clamp(min=0)[..., None])[..., 0]
    p_base = torch.where(supervised, p_base, torch.zeros_like(p_base))
    expected = (1 + 2.0 * (p_base - output.final_label_prob)).clamp(min=0.1) * supervised
    want, _ = deep_supervision_loss(output.step_token_loss, output.chunk_weight, expected, normalizer=1.0)
    torch.testing.assert_close(result.loss_sum, want, rtol=1e-5, atol=1e-6)

    # The adapted backbone's own probabilities are a different reference, so the test can tell them apart.
    adapted = (1 + 2.0 * (output.backbone_label_prob - output.final_label_prob)).clamp(min=0.1) * supervised
    other, _ = deep_supervision_loss(output.step_token_loss, output.chunk_weight, adapted, normalizer=1.0)
    assert not torch.allclose(other, want, rtol=1e-4)
    assert any(p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" in n)  # adapters re-enabled


def test_lr_with_lora_is_accepted_and_without_a_reference_still_refused():
    args = parse_arguments(["--use_lora", "--loss_weighting", "lr"])
    assert args.weighting.loss_weighting == "lr"
    with pytest.raises(UsageError, match="--loss_weighting lr"):
        parse_arguments(["--no_freeze_backbone", "--loss_weighting", "lr"])


def test_a_lora_hybrid_trains_only_the_adapters_and_the_head_and_its_checkpoint_reproduces_it(tmp_path):
    """Unfreezing a LoRA backbone must not make its base weights trainable: the checkpoint holds the adapters only,
    so a trained base weight would be lost on saving."""
    model, pristine = lora_hybrid()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("head.") or "lora_" in name for name in trainable)
    objective = HybridObjective(model.config, TruncationConfig(), WeightingConfig())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    objective(model, batch(), None).loss_sum.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "model")
    base = copy.deepcopy(pristine)
    reloaded = LLaDATRMHybrid.from_pretrained(
        tmp_path / "model", backbone=peft.PeftModel.from_pretrained(base, tmp_path / "model" / "backbone")).eval()
    inputs = {k: batch()[k] for k in INPUTS}
    with torch.no_grad():
        assert torch.equal(model(**inputs).step_token_loss, reloaded(**inputs).step_token_loss)
