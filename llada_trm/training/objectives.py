"""Training objectives as (un-normalised loss sum, normaliser) pairs, so the trainer can normalise globally.

- `HybridObjective`: the deep-supervision loss (docs/architecture.md §6) with truncation (tau) and token weights (w).
  Its normaliser N = sum tau c needs the forward pass when truncation is on; `pre_count` (sum c, known from
  the batch alone) lets the trainer scale the loss before backward, and corrects by pre/post afterwards.
- `LLaDASFTObjective`: plain LLaDA SFT of the backbone alone (docs/architecture.md §7), the comparison baseline.
- `LLaDAPretrainObjective`: LLaDA pretraining (every supervised token masked at one rate per sequence, normalised
  by B x L): the first stage of `python -m llada_trm.pretrain`.
- `BlockSFTObjective`: the same loss, block-causal with clean context: each reasoning chunk masked at its own rate
  and predicted against the clean chunks before it (block diffusion). It adapts a backbone to the attention the
  hybrid and the chunk decoder run it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llada_trm.training.diffusion import clean_context_inputs, forward_mask, llada_pretrain_loss, llada_sft_loss
from llada_trm.training.lora_reference import reference_label_prob
from llada_trm.model.hybrid_outputs import HybridMetrics
from llada_trm.model.losses import chunk_token_weights, hybrid_loss
from llada_trm.training.truncation import TruncationConfig, TruncationDecision, truncation_decisions
from llada_trm.training.weighting import WeightingConfig, token_weights

MODEL_INPUTS = ("input_ids", "attention_mask", "chunk_index", "labels", "chunk_is_masked")
NO_TRUNCATION = TruncationConfig()


@dataclass
class SFTMetrics:
    """The numbers of one micro-batch of the SFT objectives, 0-dim tensors on the device (as HybridMetrics)."""

    loss: Tensor  # the per-sequence mean loss, detached
    masked_tokens: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {"loss": self.loss, "masked_tokens": self.masked_tokens}


@dataclass
class PartMetrics:
    """The metrics of objectives that each scored one part of a batch, named `<part>_<metric>`."""

    parts: dict[str, SFTMetrics]

    def as_dict(self) -> dict[str, Tensor]:
        return {f"{part}_{key}": value for part, metrics in self.parts.items() for key, value in metrics.as_dict().items()}


@dataclass
class MicroBatchResult:
    loss_sum: Tensor  # attached to the graph; divided by the global normaliser in the trainer
    count: Tensor  # this micro-batch's share of the normaliser (after truncation)
    metrics: HybridMetrics | SFTMetrics | PartMetrics | None = None
    output: object = None
    decision: TruncationDecision | None = None


class HybridObjective:
    def __init__(self, model_config, truncation: TruncationConfig, weighting: WeightingConfig,
                 mask_token_id: int | None = None):
        self.config, self.truncation, self.weighting = model_config, truncation, weighting
        self.mask_token_id = mask_token_id  # None: whole chunks decide the weights (no partial masking)

    def pre_count(self, batch: dict) -> Tensor:
        """sum of c_t over supervised tokens, before truncation (computable without a forward pass)."""
        weights = chunk_token_weights(
            batch["chunk_index"], batch["chunk_is_masked"], self.config.deep_supervision_weight,
            self.config.unmasked_chunk_weight,
            position_is_masked=None if self.mask_token_id is None else batch["input_ids"] == self.mask_token_id,
        )
        return (weights * (batch["labels"] != -100)).sum().float()

    def __call__(
        self, model, batch: dict, generator: torch.Generator | None, token_filters: bool = True
    ) -> MicroBatchResult:
        """token_filters=False: every supervised token, unweighted (evaluation compares rungs on equal terms)."""
        output = model(**{k: batch[k] for k in MODEL_INPUTS})
        final_loss = output.step_token_loss[-1].detach()
        truncation = self.truncation if token_filters else NO_TRUNCATION
        decision = truncation_decisions(final_loss, output.supervised_mask, truncation, generator)
        weights = None
        if token_filters and self.weighting.loss_weighting != "none":
            weights = token_weights(
                self.weighting, final_loss, decision.keep, output.final_label_prob,
                reference_label_prob(model, batch, output, self.weighting.loss_weighting),
            )
        loss_sum, count = hybrid_loss(output, self.config.step_weighting, keep=decision.keep, token_weight=weights,
                                      normalizer=1.0)
        return MicroBatchResult(loss_sum, count, output.metrics, output, decision)


class LLaDASFTObjective:
    """Response tokens masked at one random rate per sequence; per-sequence CE / p_mask over response length."""

    def __init__(self, mask_token_id: int):
        self.mask_token_id = mask_token_id

    @staticmethod
    def pre_count(batch: dict) -> Tensor:
        return torch.tensor(float(batch["input_ids"].shape[0]), device=batch["input_ids"].device)

    def __call__(self, model, batch: dict, generator: torch.Generator | None, token_filters: bool = True
                 ) -> MicroBatchResult:
        is_response = batch["labels"] != -100
        targets = batch["labels"].where(is_response, batch["input_ids"])
        noisy, is_masked, p_mask = forward_mask(targets, is_response, self.mask_token_id, generator)
        logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
        mean_loss = self.loss(logits, targets, is_masked, p_mask, is_response)
        count = self.pre_count(batch)
        return MicroBatchResult(mean_loss * count, count, SFTMetrics(mean_loss.detach(), is_masked.sum().float()))

    @staticmethod
    def loss(logits: Tensor, targets: Tensor, is_masked: Tensor, p_mask: Tensor, is_response: Tensor) -> Tensor:
        """The per-sequence mean of CE / p_mask over the response length, batch mean (LLaDA SFT)."""
        return llada_sft_loss(logits, targets, is_masked, p_mask, is_response)


class LLaDAPretrainObjective(LLaDASFTObjective):
    """LLaDA pretraining: the supervised tokens (labels != -100: every token but BOS for a document) masked at one
    random rate per sequence; sum of CE / p_mask over masked tokens divided by B x L, every position counted (the
    normaliser is known from the batch's shape, so micro-batches and ranks combine as one batch of documents)."""

    @staticmethod
    def pre_count(batch: dict) -> Tensor:
        return torch.tensor(float(batch["input_ids"].numel()), device=batch["input_ids"].device)

    @staticmethod
    def loss(logits: Tensor, targets: Tensor, is_masked: Tensor, p_mask: Tensor, is_response: Tensor) -> Tensor:
        return llada_pretrain_loss(logits, targets, is_masked, p_mask)


class BlockSFTObjective(LLaDASFTObjective):
    """Every reasoning chunk masked at its own rate and scored against the clean prompt and earlier chunks; the
    LLaDA SFT loss (CE / p_mask over the response length, batch mean) on the noisy copy."""

    def __call__(self, model, batch: dict, generator: torch.Generator | None, token_filters: bool = True
                 ) -> MicroBatchResult:
        is_response = batch["labels"] != -100
        targets = batch["labels"].where(is_response, batch["input_ids"])
        inputs, is_masked, p_mask = clean_context_inputs(targets, batch["attention_mask"], batch["chunk_index"],
                                                         is_response, self.mask_token_id, generator)
        noisy_logits = model(**inputs).logits[:, targets.shape[1]:]
        per_sequence_mean = llada_sft_loss(noisy_logits, targets, is_masked, p_mask, is_response)
        count = self.pre_count(batch)
        return MicroBatchResult(per_sequence_mean * count, count,
                                SFTMetrics(per_sequence_mean.detach(), is_masked.sum().float()))
