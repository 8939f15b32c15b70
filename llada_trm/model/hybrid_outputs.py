"""What the hybrid's forward hands on: each refinement step's scores at the scored positions (`StepScores`), the
output spread back to (B, L) (`HybridOutput`), and the per-micro-batch metrics (`HybridMetrics`).

What is notable: a step scored at some positions only (intermediate/final_step_positions "masked") says where
(`StepScores.scored`, `HybridOutput.step_scored`), so every metric is taken over the positions that were scored and
a number nothing measured (the unmasked-chunk loss then) is left out instead of logged as 0. Metrics stay 0-dim
tensors on the device: the trainer sums them there and reads them on the host once per logging step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import ModelOutput

from llada_trm.model.lm_head_loss import TokenScores


@dataclass
class HybridOutput(ModelOutput):
    loss: Tensor | None = None  # deep-supervision loss normalised over this batch (tau = 1, w = 1)
    step_token_loss: Tensor | None = None  # (S, B, L) CE per step, 0 where not scored; attached to the graph
    step_scored: Tensor | None = None  # (S, B, L) bool: where each step was scored (intermediate/final_step_positions)
    supervised_mask: Tensor | None = None  # (B, L) reasoning tokens, EOS included
    masked_positions: Tensor | None = None  # (B, L) supervised tokens whose input is the mask token
    chunk_weight: Tensor | None = None  # (B, L) c_t, 0 where unsupervised
    final_label_prob: Tensor | None = None  # (B, L) p(label) at the last step, detached
    backbone_token_loss: Tensor | None = None  # (B, L) CE of the backbone alone, detached
    backbone_label_prob: Tensor | None = None  # (B, L) p(label) under the backbone alone, detached
    final_predictions: Tensor | None = None  # (B, L) argmax of the last step at supervised positions, else -100
    chunk_confidence: Tensor | None = None  # (S, B, K) mean max-probability of each chunk's tokens per step
    steps_to_confidence: Tensor | None = None  # (B, K) steps needed to reach the confidence threshold
    step_logits: Tensor | None = None  # (S, B, L, V) on request, 0 where unsupervised
    backbone_logits: Tensor | None = None  # (B, L, V) on request, 0 where unsupervised
    metrics: HybridMetrics | None = None


@dataclass
class StepScores(TokenScores):
    """One refinement step (or the backbone alone) at the N scored positions: CE, p(label), max probability and
    argmax (TokenScores), and the (N, V) logits when they were asked for. `scored` (N,) bool says where the step was
    scored when that is not everywhere (intermediate/final_step_positions "masked"); elsewhere CE and probabilities
    are 0 and the argmax -100."""

    logits: Tensor | None = None
    scored: Tensor | None = None

    @classmethod
    def of_logits(cls, logits: Tensor, targets: Tensor | None) -> "StepScores":
        """Scores of (N, V) logits, in fp32; without targets CE and p(label) are zeros."""
        log_probs = F.log_softmax(logits.float(), dim=-1)
        max_log_prob, prediction = log_probs.max(dim=-1)
        if targets is None:
            zeros = torch.zeros_like(max_log_prob)
            return cls(zeros, zeros, max_log_prob.exp(), prediction, logits)
        target_log_prob = log_probs.gather(1, targets[:, None]).squeeze(1)
        return cls(-target_log_prob, target_log_prob.exp().detach(), max_log_prob.exp().detach(), prediction, logits)

    @classmethod
    def of_token_scores(cls, scores: TokenScores) -> "StepScores":
        return cls(scores.ce, scores.label_prob, scores.max_prob, scores.prediction)

    def spread(self, rows: Tensor, count: int) -> "StepScores":
        """Scores of the positions `rows` of N = `count` (this one's), spread back to N: CE and probabilities 0 and
        argmax -100 elsewhere (the CE there adds nothing to the loss and gets no gradient)."""

        def spread(values: Tensor, fill) -> Tensor:
            return values.new_full((count,), fill).index_put((rows,), values)

        scored = torch.zeros(count, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
        return StepScores(spread(self.ce, 0.0), spread(self.label_prob, 0.0), spread(self.max_prob, 0.0),
                          spread(self.prediction, -100), scored=scored)


@dataclass
class HybridMetrics:
    """The per-micro-batch numbers of docs/architecture.md §6 (unweighted token means), each a 0-dim tensor on the
    model's device: the trainer sums them there and reads them on the host once per logging step. "Masked chunk"
    numbers are over the masked positions (all of a masked chunk's, unless chunks are masked partially)."""

    loss: Tensor
    first_step_loss: Tensor
    last_step_loss: Tensor
    masked_chunk_loss: Tensor
    masked_chunk_accuracy: Tensor
    unmasked_chunk_loss: Tensor | None
    backbone_loss: Tensor
    # the fair comparison of masked_chunk_loss: decoding reads the head only where the input is masked
    backbone_masked_chunk_loss: Tensor
    supervised_tokens: Tensor
    masked_token_fraction: Tensor
    mean_steps_to_confidence: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The numbers that were measured: None (unmasked_chunk_loss when the last step scores masked positions
        only) is left out, so it never reads as a zero loss."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def micro_batch_metrics(output: HybridOutput, labels: Tensor, last_scores_all: bool = True) -> HybridMetrics:
    """HybridMetrics of one micro-batch, computed on the device without a host sync. last_scores_all: the last step
    was scored at every supervised position (else the unmasked-chunk loss is not measured)."""
    with torch.no_grad():
        supervised = output.supervised_mask
        in_masked_chunk = output.masked_positions
        last, first_scored, last_scored = output.step_token_loss[-1], output.step_scored[0], output.step_scored[-1]
        unmasked = supervised & ~in_masked_chunk

        def mean_over(values: Tensor, where: Tensor) -> Tensor:
            return (values * where).sum() / where.sum().clamp(min=1)

        return HybridMetrics(
            loss=output.loss.detach().float(),
            first_step_loss=mean_over(output.step_token_loss[0], first_scored),
            last_step_loss=mean_over(last, last_scored),
            masked_chunk_loss=mean_over(last, in_masked_chunk),
            masked_chunk_accuracy=mean_over((output.final_predictions == labels).float(), in_masked_chunk),
            # left out where the last step did not score the unmasked positions (final_step_positions "masked")
            unmasked_chunk_loss=mean_over(last, unmasked) if last_scores_all else None,
            backbone_loss=mean_over(output.backbone_token_loss, last_scored),
            backbone_masked_chunk_loss=mean_over(output.backbone_token_loss, in_masked_chunk),
            supervised_tokens=supervised.sum().float(),
            masked_token_fraction=in_masked_chunk.sum() / supervised.sum().clamp(min=1),
            # over the chunks that hold supervised tokens (a padded chunk slot has confidence 0)
            mean_steps_to_confidence=mean_over(output.steps_to_confidence.float(), output.chunk_confidence[-1] > 0),
        )
