"""Per-token loss weights (docs/architecture.md §11), applied on top of the truncation keep-mask.

What is notable:
- Weights are statistics of the kept tokens of the whole micro-batch (not per row), are computed under
  no_grad and are 0 wherever a token is not kept, so `keep * weight` never needs a second mask.
- `topk` keeps exactly ceil(topk_keep_ratio * n) of the n kept tokens, the lowest CE first, ties broken by
  position (a stable sort over the flattened batch).
- `antiop` uses the lower median (torch.median's convention: for an even count, the smaller middle value).
- `lr` and `dft` use the label probability; when it is not given it is exp(-CE), which is exactly the
  softmax probability of the label under the logits that produced the CE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHTING_SCHEMES = ("none", "topk", "antiop", "lr", "dft")
LR_MIN_WEIGHT = 0.1
# ceil(ratio * n) is taken with this slack so that decimal ratios are not pushed up by binary rounding:
# 0.7 * 10 is 7.000000000000001 in float64 and 10 * (1 - 0.7) is 3.0000000000000004; 7 and 3 are what was meant.
# Truncation's mask-start bound uses it too.
CEIL_SLACK = 1e-9


class WeightingConfigError(ValueError):
    """A --loss_weighting setting that cannot be used."""


@dataclass
class WeightingConfig:
    loss_weighting: str = "none"
    topk_keep_ratio: float = 0.7
    antiop_clip_mult: float = 3.0
    lr_weight_alpha: float = 1.0

    def validate(self, has_frozen_reference: bool) -> None:
        """Raise WeightingConfigError naming the flag. `lr` needs the frozen backbone as its reference."""
        if self.loss_weighting not in WEIGHTING_SCHEMES:
            raise WeightingConfigError(
                f"--loss_weighting must be one of {', '.join(WEIGHTING_SCHEMES)}, got {self.loss_weighting!r}"
            )
        if not _is_number(self.topk_keep_ratio) or not 0 < self.topk_keep_ratio <= 1:
            raise WeightingConfigError(f"--topk_keep_ratio must be in (0, 1], got {self.topk_keep_ratio!r}")
        if not _is_number(self.antiop_clip_mult) or not self.antiop_clip_mult > 0:
            raise WeightingConfigError(
                f"--antiop_clip_mult must be a finite number > 0, got {self.antiop_clip_mult!r}"
            )
        if not _is_number(self.lr_weight_alpha) or self.lr_weight_alpha < 0:
            raise WeightingConfigError(
                f"--lr_weight_alpha must be a finite number >= 0, got {self.lr_weight_alpha!r}"
            )
        if self.loss_weighting == "lr" and not has_frozen_reference:
            raise WeightingConfigError(
                "--loss_weighting lr needs a reference model: the frozen backbone, or under --use_lora the "
                "backbone with its adapters disabled; freeze the backbone, add --use_lora, or choose another "
                "--loss_weighting"
            )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lower_median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor; for an even count the smaller of the two middle values (torch.median)."""
    return values.sort().values[(values.numel() - 1) // 2]


@torch.no_grad()
def token_weights(
    config: WeightingConfig,
    per_token_loss: Tensor,
    keep_mask: Tensor,
    label_prob: Tensor | None = None,
    ref_label_prob: Tensor | None = None,
) -> Tensor:
    """(B, L) float weights, detached, 0 where keep_mask is False.

    per_token_loss: (B, L) CE per token; keep_mask: (B, L) bool (the truncation keep-mask, which is already
    False outside supervised positions); label_prob / ref_label_prob: (B, L) probability of the label under
    the hybrid / the frozen reference backbone.
    """
    if per_token_loss.shape != keep_mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and keep_mask {tuple(keep_mask.shape)} differ in shape"
        )
    loss = per_token_loss.detach().float()
    keep = keep_mask.bool()
    scheme = config.loss_weighting
    if scheme == "none":
        weights = torch.ones_like(loss)
    elif scheme == "topk":
        weights = _topk_weights(loss, keep, config.topk_keep_ratio)
    elif scheme == "antiop":
        weights = _antiop_weights(loss, keep, config.antiop_clip_mult)
    elif scheme in ("lr", "dft"):
        p = _label_prob(label_prob, loss)
        if scheme == "dft":
            weights = p
        else:
            if ref_label_prob is None:
                raise WeightingConfigError(
                    "--loss_weighting lr needs ref_label_prob, the frozen reference backbone's label probability"
                )
            weights = (1 + config.lr_weight_alpha * (ref_label_prob.detach().float() - p)).clamp(min=LR_MIN_WEIGHT)
    else:
        raise WeightingConfigError(f"--loss_weighting must be one of {', '.join(WEIGHTING_SCHEMES)}, got {scheme!r}")
    return torch.where(keep, weights, torch.zeros_like(weights))


def _label_prob(label_prob: Tensor | None, loss: Tensor) -> Tensor:
    return loss.neg().exp() if label_prob is None else label_prob.detach().float()


def _topk_weights(loss: Tensor, keep: Tensor, keep_ratio: float) -> Tensor:
    """1 for the ceil(keep_ratio * n) lowest-CE kept tokens of the micro-batch, 0 for the rest."""
    flat_keep = keep.flatten()
    n = int(flat_keep.sum())
    n_kept = math.ceil(keep_ratio * n - CEIL_SLACK)
    # Stable sort by CE (ties: earlier flattened position first), then stably move non-kept tokens last.
    order = loss.flatten().sort(stable=True).indices
    order = order[(~flat_keep[order]).sort(stable=True).indices]
    weights = torch.zeros(loss.numel(), dtype=loss.dtype, device=loss.device)
    weights[order[:n_kept]] = 1.0
    return weights.view_as(loss)


def _antiop_weights(loss: Tensor, keep: Tensor, clip_mult: float) -> Tensor:
    """1 up to cap = clip_mult * median kept CE, cap / l above it (so each token contributes at most cap)."""
    if not keep.any():
        return torch.zeros_like(loss)
    cap = clip_mult * lower_median(loss[keep])
    # Where l > cap >= 0, l > 0; elsewhere the division is not used (clamp avoids 0/0 in the unused branch).
    return torch.where(loss <= cap, torch.ones_like(loss), cap / loss.clamp(min=torch.finfo(loss.dtype).tiny))
