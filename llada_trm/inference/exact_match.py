"""Fair exact-match evaluation: the same held-out problems, the same new-token budget, each model with its best decoder.

Three decoders are scored side by side (docs/architecture.md §12, docs/inference.md):
- `backbone_llada_sampler`: the backbone alone with LLaDA's sampler (`generation.generate`), one token per step
  in semi-autoregressive blocks of `chunk_size`: a plain LLaDA's best decoder;
- `backbone_chunked`: the backbone alone through the chunk decoder (`generate_with_refinement`, refinement off);
- `hybrid_refined`: the hybrid with `generate_with_refinement`.

The prompt of a prepared row is its non-pad prompt region (input_ids where chunk_index == -1 and
attention_mask == 1): exactly the ids the model was trained to continue. A prediction is right when
`layout.extract_answer` of the generated text equals the reference `answer` (both stripped); rows without a
reference answer are counted apart. New tokens are counted up to the stop (EOS excluded, `</answer>` included)
for every decoder, so tokens per second compare answer throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

from llada_trm.data.layout import ANSWER_CLOSE, extract_answer
from llada_trm.inference.chunk_decoding import DecodingSettings, generate_with_refinement, token_stop
from llada_trm.inference.prompts import left_pad, single_token_id
from llada_trm.inference.sampler import generate

DECODERS = ("backbone_llada_sampler", "backbone_chunked", "hybrid_refined")
SAMPLER_MIN_BATCH = 32  # the sampler runs one cheap step per token: larger batches amortise its Python loop


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


def scored_rows(dataset_or_records, max_samples: int | None = None) -> tuple[list[dict], int]:
    """The first `max_samples` rows that have a reference answer, and how many rows had none."""
    total = len(dataset_or_records) if max_samples is None else min(max_samples, len(dataset_or_records))
    rows = [dataset_or_records[i] for i in range(total)]
    scored = [row for row in rows if str(row.get("answer") or "").strip()]
    return scored, len(rows) - len(scored)


def default_new_token_budget(rows: list[dict], chunk_size: int) -> int:
    """One chunk more than the longest reference reasoning (EOS fill included) among `rows`."""
    longest = max((sum(label != -100 for label in row["labels"]) for row in rows), default=0)
    return longest + chunk_size


def _run(name: str, rows: list[dict], batch_size: int, progress: bool,
         decode: Callable[[list[list[int]]], tuple[list[str], list[int], list[int], list[int]]]) -> dict:
    """Score `decode` (prompts -> texts, new tokens, chunks, refinement steps per row) over `rows` in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    correct = new_tokens = chunk_count = step_count = 0
    seconds = 0.0
    bar = tqdm(total=len(rows), desc=name, disable=not progress, unit="sample")
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        began = time.perf_counter()
        texts, tokens, chunks, steps = decode([prompt_ids_of(row) for row in batch])
        seconds += time.perf_counter() - began
        correct += sum(is_correct(text, str(row["answer"])) for text, row in zip(texts, batch))
        new_tokens, chunk_count, step_count = new_tokens + sum(tokens), chunk_count + sum(chunks), step_count + sum(steps)
        bar.update(len(batch))
        bar.set_postfix(accuracy=f"{correct / (start + len(batch)):.3f}", tok_s=f"{new_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    return {
        "accuracy": correct / len(rows) if rows else 0.0,
        "correct": correct,
        "num_samples": len(rows),
        "mean_refinement_steps": step_count / chunk_count if chunk_count else 0.0,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
    }


def _until_stop(tokens: list[int], eos_id: int, answer_close_id: int | None) -> list[int]:
    """The tokens up to the stop, with the chunk decoder's rule (`token_stop`)."""
    stop = token_stop(tokens, 0, eos_id, answer_close_id)
    return tokens if stop is None else tokens[:stop]


def llada_sampler_accuracy(backbone, tokenizer, rows: list[dict], max_new_tokens: int, block_length: int,
                           batch_size: int = 32, progress: bool = True) -> dict:
    """Exact match of the backbone with LLaDA's sampler: steps = new tokens (one per step), blocks of
    `block_length`, temperature 0; `max_new_tokens` is rounded up to whole blocks."""
    gen_length = -(-max_new_tokens // block_length) * block_length
    eos_id, mask_id = tokenizer.eos_token_id, backbone.config.mask_token_id
    answer_close_id = single_token_id(tokenizer, ANSWER_CLOSE)
    stop_ids = (eos_id,) if answer_close_id is None else (eos_id, answer_close_id)

    def decode(prompts):
        ids, mask = left_pad(prompts, block_length, tokenizer.pad_token_id, backbone.device)
        out = generate(backbone, ids, mask, steps=gen_length, gen_length=gen_length, block_length=block_length,
                       mask_id=mask_id, stop_token_ids=stop_ids)
        new = [_until_stop(row, eos_id, answer_close_id) for row in out[:, ids.shape[1]:].tolist()]
        new = [[t for t in row if t != mask_id] for row in new]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return texts, [len(row) for row in new], [0] * len(new), [0] * len(new)

    return _run("backbone_llada_sampler", rows, batch_size, progress, decode)


def chunk_decoder_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, enable_refinement: bool = True,
                           batch_size: int = 8, progress: bool = True, settings: DecodingSettings | None = None,
                           **decode_options) -> dict:
    """Exact match of an `LLaDATRMHybrid` with `generate_with_refinement`: `settings` (default temperature 0),
    with `decode_options` (DecodingSettings fields: decode_steps_per_chunk, ...) on top; the budget and
    `enable_refinement` are this function's."""
    decoding = (settings if settings is not None else DecodingSettings()).with_overrides(
        **decode_options, max_new_tokens=max_new_tokens, enable_refinement=enable_refinement, return_trace=True)

    def decode(prompts):
        out = generate_with_refinement(model, prompts, tokenizer=tokenizer, settings=decoding)
        chunks = [len(trace) for trace in out.trace]
        steps = [sum(entry.steps for entry in trace) for trace in out.trace]
        return out.texts, [len(tokens) for tokens in out.new_tokens], chunks, steps

    return _run("hybrid_refined" if enable_refinement else "backbone_chunked", rows, batch_size, progress, decode)


def fair_evaluation(tokenizer, rows: list[dict], max_new_tokens: int, chunk_size: int, models: dict,
                    batch_size: int = 8, progress: bool = True, settings: DecodingSettings | None = None,
                    **decode_options) -> dict:
    """Score the same `rows` with every decoder named in `models`, in DECODERS order.

    models: decoder name -> model: an `LLaDAModelLM` for `backbone_llada_sampler`, an `LLaDATRMHybrid` for
    `backbone_chunked` (its head is not used) and `hybrid_refined`. `settings`, with
    `decode_options` (its field names) on top, go to the chunk decoder.
    Returns {"num_samples", "max_new_tokens", "accuracy": {decoder: exact match}, "decoders": {decoder: metrics}}.
    """
    unknown = sorted(set(models) - set(DECODERS))
    if unknown:
        raise ValueError(f"unknown decoder(s) {unknown}; choose from {DECODERS}")
    decoding = (settings if settings is not None else DecodingSettings()).with_overrides(**decode_options)
    results = {}
    for name in (d for d in DECODERS if d in models):
        if name == "backbone_llada_sampler":
            results[name] = llada_sampler_accuracy(models[name], tokenizer, rows, max_new_tokens, chunk_size,
                                                   batch_size=max(batch_size, SAMPLER_MIN_BATCH), progress=progress)
        else:
            results[name] = chunk_decoder_accuracy(models[name], tokenizer, rows, max_new_tokens,
                                                   enable_refinement=name == "hybrid_refined",
                                                   batch_size=batch_size, progress=progress, settings=decoding)
    return {
        "num_samples": len(rows),
        "max_new_tokens": max_new_tokens,
        "accuracy": {name: r["accuracy"] for name, r in results.items()},
        "decoders": results,
    }


def format_fair_table(evaluation: dict) -> str:
    """The decoders of `fair_evaluation` as a table: exact match, correct, mean steps, new tokens per second."""
    lines = [f"{'decoder':<24}{'exact match':>12}{'correct':>9}{'samples':>9}{'mean steps':>12}{'tokens/s':>11}"]
    for name, r in evaluation["decoders"].items():
        lines.append(f"{name:<24}{r['accuracy']:>12.3f}{r['correct']:>9}{r['num_samples']:>9}"
                     f"{r['mean_refinement_steps']:>12.2f}{r['tokens_per_second']:>11.1f}")
    return "\n".join(lines)
