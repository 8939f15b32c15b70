"""DEBUG=1 chunk inspection: what the model saw, what it had to recover, and how it did, chunk by chunk.

Shown for one sample of a collated batch and the hybrid's output on it; used by the trainer (first steps,
then every --debug_every steps) and by `python -m llada_trm.inspect` (the same view without training).
"""

from __future__ import annotations

import torch

from llada_trm.env_flags import env_flag

MASK_SHOWN_AS = "[MASK]"


def debug_enabled() -> bool:
    return env_flag("DEBUG")


def _text(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False).replace("\n", "\\n")


def format_chunk_inspection(tokenizer, batch: dict, output, sample: int = 0, title: str = "") -> str:
    """The inspection text for `sample` of `batch` (collator output) given the hybrid's `output`."""
    real = batch["attention_mask"][sample].bool()
    chunk_index = batch["chunk_index"][sample]
    input_ids, labels = batch["input_ids"][sample], batch["labels"][sample]
    num_chunks = int(chunk_index.max()) + 1 if (chunk_index >= 0).any() else 0
    masked_chunks = [k for k in range(num_chunks) if bool(batch["chunk_is_masked"][sample, k])]
    masked_positions = torch.isin(chunk_index, torch.tensor(masked_chunks, dtype=chunk_index.dtype, device=chunk_index.device)) & (chunk_index >= 0)
    num_real = int(real.sum())
    lines = [f"=== chunk inspection {title}".rstrip() + " ===",
             f"Masked {int(masked_positions.sum())}/{num_real} tokens ({100 * int(masked_positions.sum()) / max(num_real, 1):.1f}%)",
             f"Masked chunks: {masked_chunks}"]

    prompt = real & (chunk_index < 0)
    lines.append("Input (question unmasked; masked chunks shown as mask tokens):")
    lines.append(f"  [question] {_text(tokenizer, input_ids[prompt])}")
    for k in range(num_chunks):
        here = chunk_index == k
        shown = f"{MASK_SHOWN_AS} x{int(here.sum())}" if k in masked_chunks else _text(tokenizer, input_ids[here])
        lines.append(f"  [chunk {k}] {shown}")

    lines.append("Ground truth (>> = masked, to recover):")
    for k in range(num_chunks):
        marker = ">>" if k in masked_chunks else "  "
        lines.append(f"{marker}[chunk {k}] {_text(tokenizer, labels[chunk_index == k])}")

    lines.append("Per chunk (last refinement step):")
    last_loss = output.step_token_loss[-1][sample].detach()
    for k in range(num_chunks):
        here = (chunk_index == k) & output.supervised_mask[sample]
        if not here.any():
            continue
        weight = float(output.chunk_weight[sample][here][0])
        if not output.step_scored[-1][sample][here].all():  # final_step_positions "masked": weight 0, not scored
            lines.append(f"Chunk {k}/{num_chunks}: not scored, weight={weight:.2f}")
            continue
        loss = float(last_loss[here].mean())
        lines.append(f"Chunk {k}/{num_chunks}: loss={loss:.2f}, weight={weight:.2f}")
        lines.append(f"    predicted: {_text(tokenizer, output.final_predictions[sample][here])}")
        lines.append(f"    expected:  {_text(tokenizer, labels[here])}")
    return "\n".join(lines)
