"""What loss truncation did: per-step metrics of the keep mask, and `truncation_detailed.jsonl`.

`truncation_metrics` are the batch numbers logged every `log_every_n_steps` steps (the share of supervised tokens
dropped, and the untruncated loss); `TruncationLogger` also writes one record per sequence every
`log_detailed_every_n_steps` steps and, with `debug`, prints them (docs/truncation.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from llada_trm.training.truncation import TruncationConfig, TruncationDecision


@torch.no_grad()
def truncation_metrics(per_token_loss: Tensor, valid_mask: Tensor, keep: Tensor) -> dict[str, float]:
    """Batch-level truncation metrics. Rows without valid tokens do not count in the per-sequence ones."""
    loss = per_token_loss.detach().float()
    valid = valid_mask.bool()
    masked = valid & ~keep.bool()
    valid_per_row = valid.sum(dim=1)
    masked_per_row = masked.sum(dim=1)
    has_valid = valid_per_row > 0
    seq_ratio = masked_per_row[has_valid].float() / valid_per_row[has_valid].float()
    n_valid = int(valid_per_row.sum())
    # With no valid token at all every value is 0 (raw_ppl 1) rather than NaN, so logs stay plottable.
    raw_loss = float(loss[valid].double().mean()) if n_valid else 0.0
    return {
        "truncation/batch_ratio": int(masked_per_row.sum()) / n_valid if n_valid else 0.0,
        "truncation/mean_seq_ratio": float(seq_ratio.mean()) if seq_ratio.numel() else 0.0,
        "truncation/max_seq_ratio": float(seq_ratio.max()) if seq_ratio.numel() else 0.0,
        "truncation/truncated_seqs": float((masked_per_row > 0).sum()),
        "truncation/raw_loss": raw_loss,
        "truncation/raw_ppl": float(torch.tensor(raw_loss, dtype=torch.float64).exp()),  # inf, not an error
    }


class TruncationLogger:
    """Batch metrics every log_every_n_steps, per-sequence JSONL records, and debug lines (main process only)."""

    filename = "truncation_detailed.jsonl"

    def __init__(self, run_dir: str | os.PathLike, config: TruncationConfig, is_main_process: bool):
        self.path = Path(run_dir) / self.filename
        self.config = config
        self.is_main_process = is_main_process

    def maybe_log(
        self,
        step: int,
        decision: TruncationDecision,
        sample_ids: Sequence | Tensor,
        per_token_loss: Tensor,
        valid_mask: Tensor,
    ) -> dict[str, float] | None:
        """Call once per optimiser step. Returns the metrics on logging steps (on every process), else None."""
        cfg = self.config
        if self.is_main_process and (cfg.debug or (cfg.log_detailed and step % cfg.log_detailed_every_n_steps == 0)):
            records = self._records(step, decision, sample_ids, valid_mask)
            if cfg.log_detailed and step % cfg.log_detailed_every_n_steps == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            if cfg.debug:
                for r in records:
                    print(_debug_line(r))
        if step % cfg.log_every_n_steps != 0:
            return None
        return truncation_metrics(per_token_loss, valid_mask, decision.keep)

    @staticmethod
    def _records(step: int, decision: TruncationDecision, sample_ids, valid_mask: Tensor) -> list[dict]:
        ids = sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids)
        if len(ids) != valid_mask.shape[0]:
            raise ValueError(f"{len(ids)} sample ids for a batch of {valid_mask.shape[0]} sequences")
        columns = zip(
            ids,
            valid_mask.bool().sum(dim=1).tolist(),
            decision.trigger.tolist(),
            decision.start.tolist(),
            decision.masked_count.tolist(),
            decision.threshold.tolist(),
        )
        return [
            {
                "step": int(step),
                "sample_id": sample_id,
                "valid_len": valid_len,
                "trigger": trigger,
                "start": start,
                "masked_count": masked,
                "threshold": threshold if math.isfinite(threshold) else None,  # JSON has no NaN
            }
            for sample_id, valid_len, trigger, start, masked, threshold in columns
        ]


def _debug_line(r: dict) -> str:
    share = r["masked_count"] / r["valid_len"] if r["valid_len"] else 0.0
    threshold = "none" if r["threshold"] is None else f"{r['threshold']:.4g}"
    return (
        f"[truncation] step {r['step']} sample {r['sample_id']}: valid_len={r['valid_len']} "
        f"trigger={r['trigger']} start={r['start']} masked={r['masked_count']} ({share:.1%}) threshold={threshold}"
    )
