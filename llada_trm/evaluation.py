"""Exact-match answer accuracy of generated reasoning, on prepared dataset rows or plain records.

The prompt of a prepared row is its non-pad prompt region (input_ids where chunk_index == -1 and
attention_mask == 1): exactly the ids the model was trained to continue, so no re-tokenisation can drift.
A prediction is right when `layout.extract_answer` of the generated text equals the reference `answer`
(both stripped); rows without a reference answer cannot be scored and are counted apart.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from .layout import extract_answer
from .refinement_decoding import generate_with_refinement


def prompt_ids_of(row: dict) -> list[int]:
    """The real prompt tokens of a prepared row."""
    return [
        int(token)
        for token, chunk, real in zip(row["input_ids"], row["chunk_index"], row["attention_mask"])
        if chunk == -1 and real == 1
    ]


def is_correct(generated_text: str, reference: str) -> bool:
    predicted = extract_answer(generated_text)
    return predicted is not None and predicted.strip() == reference.strip()


def answer_accuracy(model, tokenizer, dataset_or_records, max_length: int, enable_refinement: bool = True,
                    batch_size: int = 8, max_samples: int | None = None, progress: bool = True) -> dict:
    """Generate for every row with `generate_with_refinement` (temperature 0) and score the answers.

    Rows are dicts with `input_ids`, `attention_mask`, `chunk_index` and `answer` (a prepared dataset, or a
    list of such dicts). Returns accuracy, correct, num_samples (scored rows), skipped_no_reference,
    mean_refinement_steps (per chunk; 0 for the backbone alone), new_tokens, seconds and tokens_per_second.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = len(dataset_or_records) if max_samples is None else min(max_samples, len(dataset_or_records))
    rows = [dataset_or_records[i] for i in range(total)]
    scored = [row for row in rows if str(row.get("answer") or "").strip()]
    correct = new_tokens = chunk_count = step_count = 0
    seconds = 0.0
    bar = tqdm(total=len(scored), desc="refinement" if enable_refinement else "backbone", disable=not progress,
               unit="sample")
    for start in range(0, len(scored), batch_size):
        batch = scored[start: start + batch_size]
        began = time.perf_counter()
        out = generate_with_refinement(model, [prompt_ids_of(row) for row in batch], tokenizer=tokenizer,
                                       max_length=max_length, enable_refinement=enable_refinement, return_trace=True)
        seconds += time.perf_counter() - began
        new_tokens += sum(len(tokens) for tokens in out.new_tokens)
        for text, row, trace in zip(out.texts, batch, out.trace):
            correct += is_correct(text, str(row["answer"]))
            chunk_count += len(trace)
            step_count += sum(entry.steps for entry in trace)
        bar.update(len(batch))
        bar.set_postfix(accuracy=f"{correct / (start + len(batch)):.3f}",
                        tok_s=f"{new_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    return {
        "accuracy": correct / len(scored) if scored else 0.0,
        "correct": correct,
        "num_samples": len(scored),
        "skipped_no_reference": len(rows) - len(scored),
        "mean_refinement_steps": step_count / chunk_count if chunk_count else 0.0,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
    }
