"""The reference model of `--loss_weighting lr` under LoRA: the backbone with its adapters switched off.

With LoRA the backbone's own logits are the adapted model's, so they cannot serve as p_ref. PEFT runs the same
module with every adapter disabled, which is exactly the pretrained backbone: one extra backbone forward
under no_grad, and no second copy of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_label_prob(model, batch: dict, output, loss_weighting: str) -> Tensor:
    """p_ref (B, L) for the token weights: the frozen backbone's (already in `output`), or under LoRA and `lr`
    the adapter-free backbone's."""
    if loss_weighting != "lr":
        return output.backbone_label_prob
    hybrid = getattr(model, "module", model)  # a DDP wrapper keeps the hybrid in .module
    backbone = getattr(hybrid, "backbone", None)  # a plain callable (tests) has none
    if not hasattr(backbone, "disable_adapter"):
        return output.backbone_label_prob
    supervised = output.supervised_mask
    with torch.no_grad(), backbone.disable_adapter():
        hidden = hybrid.backbone_hidden_states(batch["input_ids"], batch["attention_mask"], batch["chunk_index"])
        logits = backbone.lm_head(hidden[supervised])
    log_probs = F.log_softmax(logits.float(), dim=-1)
    label_prob = log_probs.gather(1, batch["labels"][supervised][:, None]).squeeze(1).exp()
    return torch.zeros(supervised.shape, dtype=label_prob.dtype, device=label_prob.device).masked_scatter(
        supervised, label_prob)
