"""What the trace needs from one micro-batch under each objective, computed as training computes it.

A view runs the objective's forward once on the whole micro-batch (same inputs, same random generator, so the
same masks, truncation and token weights as the training step), and gives:
- the traced tokens (sample row, position) and per token its loss weight in the micro-batch's mean loss,
- the aggregate gradient G of that mean loss for the chosen parameters,
- per sample, a forward pass of that sample alone whose per-step losses stay attached to the graph, for the
  per-token backward passes (a token's loss only depends on its own sample, so the batched backward passes
  run on one sample's graph instead of the whole batch's).

Hybrid: the loss of token t at step s is its cross-entropy l_{s,t}; ell_t = sum_s alpha_s l_{s,t} with
alpha_s = a_s / sum a (the step weighting); the micro-batch loss is sum_t K_t ell_t / N with K_t = tau_t c_t w_t
(truncation keep-mask, chunk weight, token weight), read off the objective itself as d loss_sum / d ell_t.
llada_sft: the traced tokens are the masked response tokens, ell_t = CE_t, K_t = 1 / (p_mask * response length)
and N = batch size (docs/architecture.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llada_trm.training.diffusion import forward_mask
from llada_trm.model.losses import step_weights


@dataclass
class MicroBatchTrace:
    rows: Tensor  # (n,) sample row of each traced token
    positions: Tensor  # (n,)
    loss: Tensor  # (n,) the token's loss: final-step CE (hybrid), CE (llada_sft)
    step_loss: Tensor  # (S, n) CE at every refinement step
    weight: Tensor  # (n,) K_t / N: the token's weight in the micro-batch's mean loss
    alpha: Tensor  # (S,)
    aggregate: dict[str, Tensor]  # G per chosen parameter name
    chunk_masked: Tensor | None  # (n,) bool, hybrid only


def _nonzero(mask: Tensor) -> tuple[Tensor, Tensor]:
    rows, positions = mask.nonzero(as_tuple=True)
    return rows, positions


def _real_end(attention_mask: Tensor) -> int:
    """One past the sample's last real position: the batch's trailing padding, which no real position attends
    to, is cut off before the per-sample passes."""
    return int(attention_mask.nonzero().max()) + 1 if attention_mask.any() else attention_mask.numel()


def _aggregate(mean_loss: Tensor, chosen: dict) -> dict[str, Tensor]:
    grads = torch.autograd.grad(mean_loss, list(chosen.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(p)).detach().float()
            for (name, p), g in zip(chosen.items(), grads)}


class HybridView:
    layout = "supervised_rows"  # out_proj runs on the supervised rows only, in position order

    def __init__(self, objective):
        self.objective = objective

    def prepare(self, model, batch: dict, generator, chosen: dict) -> MicroBatchTrace:
        result = self.objective(model, batch, generator)
        output = result.output
        step_loss = output.step_token_loss  # (S, B, L), attached
        coefficient = torch.autograd.grad(result.loss_sum, step_loss, retain_graph=True, allow_unused=True)[0]
        coefficient = torch.zeros_like(step_loss) if coefficient is None else coefficient
        count = result.count.clamp(min=1e-12)
        aggregate = _aggregate(result.loss_sum / count, chosen)
        self.batch, self.supervised = batch, output.supervised_mask
        rows, positions = _nonzero(output.supervised_mask)
        chunk = batch["chunk_index"][rows, positions]
        masked = batch["chunk_is_masked"].bool()[rows, chunk.clamp(min=0)]
        alpha = step_weights(step_loss.shape[0], model.config.step_weighting, step_loss.device)
        return MicroBatchTrace(
            rows, positions, step_loss[-1].detach()[rows, positions], step_loss.detach()[:, rows, positions],
            (coefficient.sum(0)[rows, positions] / count).detach(), alpha / alpha.sum(), aggregate, masked)

    def sample_step_losses(self, model, row: int) -> tuple[list[Tensor], Tensor]:
        """Per-step CE of sample `row`'s supervised tokens (position order), attached; and their rows in the
        flattened input of a position-wise layer."""
        end = _real_end(self.batch["attention_mask"][row])
        b = {k: self.batch[k][row : row + 1, :end] for k in ("input_ids", "attention_mask", "chunk_index", "labels")}
        supervised = self.supervised[row : row + 1, :end]
        backbone_out = model.backbone_pass(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           chunk_index=b["chunk_index"])
        hidden = backbone_out.last_hidden_state
        per_step = model.refine_supervised(hidden, b["attention_mask"], b["chunk_index"], supervised,
                                           b["labels"][supervised],
                                           draft_at=model.draft_positions(b["input_ids"]),
                                           layer_states=backbone_out.layer_states)
        losses = [step.ce for step in per_step]
        return losses, torch.arange(losses[0].numel(), device=hidden.device)


class LLaDASFTView:
    layout = "positions"

    def __init__(self, objective):
        self.mask_token_id = objective.mask_token_id

    def prepare(self, model, batch: dict, generator, chosen: dict) -> MicroBatchTrace:
        is_response = batch["labels"] != -100
        targets = batch["labels"].where(is_response, batch["input_ids"])
        noisy, is_masked, p_mask = forward_mask(targets, is_response, self.mask_token_id, generator)
        self.noisy, self.is_masked, self.targets = noisy, is_masked, targets
        self.attention_mask = batch["attention_mask"]
        ce = self._ce(model, noisy, batch["attention_mask"], targets)
        length = is_response.sum(dim=1, keepdim=True).clamp(min=1)
        coefficient = torch.where(is_masked, 1.0 / (p_mask * length), torch.zeros_like(ce))
        count = float(batch["input_ids"].shape[0])  # the objective's normaliser: the number of sequences
        aggregate = _aggregate((coefficient * ce).sum() / count, chosen)
        rows, positions = _nonzero(is_masked)
        values = ce.detach()[rows, positions]
        return MicroBatchTrace(rows, positions, values, values[None], coefficient[rows, positions] / count,
                               torch.ones(1, device=ce.device), aggregate, None)

    @staticmethod
    def _ce(model, input_ids, attention_mask, targets) -> Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def sample_step_losses(self, model, row: int) -> tuple[list[Tensor], Tensor]:
        pick = (slice(row, row + 1), slice(0, _real_end(self.attention_mask[row])))
        ce = self._ce(model, self.noisy[pick], self.attention_mask[pick], self.targets[pick])[0]
        positions = self.is_masked[row].nonzero(as_tuple=True)[0]
        return [ce[positions]], positions
