"""Fair exact-match evaluation: the same held-out problems, the same new-token budget, each model with its best decoder.

Three decoders are scored side by side (docs/architecture.md §12, docs/inference.md):
- `backbone_llada_sampler`: the backbone alone with LLaDA's sampler (`inference.sampler.generate`), one token per step
  in semi-autoregressive blocks of `chunk_size`: a plain LLaDA's best decoder;
- `backbone_chunked`: the backbone alone through the chunk decoder (`generate_with_refinement`, refinement off);
- `hybrid_refined`: the hybrid with `generate_with_refinement`.

The prompt of a prepared row is its non-pad prompt region (input_ids where chunk_index == -1 and
attention_mask == 1): exactly the ids the model was trained to continue. A prediction is right when
`layout.extract_answer` of the generated text equals the reference `answer` (both stripped); rows without a
reference answer are counted apart. New tokens are counted up to the stop (EOS excluded, `</answer>` included)
for every decoder, so tokens per second compare answer throughput.

Every decoder also reports its cost (docs/evaluation.md, the frontier): `backbone_passes`, the backbone row-passes
it ran as counted by the decoding code (one forward over n rows counts n), and `tokens_per_pass` (TPF), new tokens
per row-pass. With `flop_sample=n`, the first n rows are decoded once more under torch's FlopCounterMode, and the
FLOPs per new token are reported with the refinement head's modules counted apart from the rest (the backbone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from llada_trm.data.layout import ANSWER_CLOSE, extract_answer
from llada_trm.inference.chunk_decoding import generate_with_refinement, token_stop
from llada_trm.inference.decoding_settings import DecodingSettings
from llada_trm.inference.prompts import left_pad, single_token_id
from llada_trm.inference.reporting import cell, markdown_table, paired_difference, standard_error
from llada_trm.inference.sampler import PassCounter, generate

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


@dataclass
class DecodedBatch:
    """What a decoder returns for one batch of prompts, per row and for the batch."""

    texts: list[str]
    new_tokens: list[int]  # per row, up to the stop
    chunks: list[int]  # per row, chunk decode rounds run (0 for the sampler)
    refinement_steps: list[int]  # per row, refinement steps over those rounds
    backbone_row_passes: int  # backbone forwards of the batch, each counted by its rows


class DecoderParts(nn.Module):
    """The backbone and head under one root, so FlopCounterMode names their modules `DecoderParts.backbone...` and
    `DecoderParts.head...` (it names a module's children after the first module entered; the decoders call the
    parts' methods, never a common parent). Calling it does nothing but that naming."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self) -> None:
        return None


def decode_flops(decode: Callable[[list[list[int]]], DecodedBatch], prompts: list[list[int]], backbone: nn.Module,
                 head: nn.Module | None) -> tuple[int, int, int]:
    """(backbone FLOPs, head FLOPs, new tokens) of decoding `prompts`, by torch's FlopCounterMode.

    Head FLOPs are those of the head's modules (the outermost ones entered: the decoders call the head's methods,
    not the head). Backbone FLOPs are all the others: the backbone's forwards and its LM head, also where the chunk
    decoder applies it to a refinement step's state (the counter counts matrix products and attention only).
    """
    parts = DecoderParts(backbone, head)
    with FlopCounterMode(display=False) as counter:
        parts()
        batch = decode(prompts)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    head_modules = [name for name, _ in head.named_modules()] if head is not None else []
    head_names = {"DecoderParts.head" + (f".{name}" if name else "") for name in head_modules}
    entered = [name for name in counts if name in head_names]
    outermost = [name for name in entered if not any(name.startswith(other + ".") for other in entered)]
    head_flops = sum(counts[name] for name in outermost)
    return counter.get_total_flops() - head_flops, head_flops, sum(batch.new_tokens)


def score_decoder(name: str, rows: list[dict], batch_size: int, progress: bool,
         decode: Callable[[list[list[int]]], DecodedBatch], flop_parts: tuple | None = None,
         flop_sample: int = 0) -> dict:
    """Score `decode` (prompts -> DecodedBatch) over `rows` in batches; with `flop_sample` and `flop_parts`
    (backbone, head or None), also the FLOPs per new token of decoding the first `flop_sample` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    correct = new_tokens = chunk_count = step_count = passes = 0
    right = []  # 1/0 per problem, in order: the paired comparisons of fair_evaluation read it
    seconds = 0.0
    bar = tqdm(total=len(rows), desc=name, disable=not progress, unit="sample")
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        began = time.perf_counter()
        decoded = decode([prompt_ids_of(row) for row in batch])
        seconds += time.perf_counter() - began
        batch_right = [int(is_correct(text, str(row["answer"]))) for text, row in zip(decoded.texts, batch)]
        right += batch_right
        correct += sum(batch_right)
        new_tokens += sum(decoded.new_tokens)
        chunk_count, step_count = chunk_count + sum(decoded.chunks), step_count + sum(decoded.refinement_steps)
        passes += decoded.backbone_row_passes
        bar.update(len(batch))
        bar.set_postfix(accuracy=f"{correct / (start + len(batch)):.3f}", tok_s=f"{new_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    result = {
        "accuracy": correct / len(rows) if rows else 0.0,
        "standard_error": standard_error(correct, len(rows)) if rows else None,
        "correct": correct,
        "num_samples": len(rows),
        "right": right,
        "mean_refinement_steps": step_count / chunk_count if chunk_count else 0.0,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
        "backbone_passes": passes,
        "tokens_per_pass": new_tokens / passes if passes else 0.0,
    }
    if flop_sample > 0 and flop_parts is not None and rows:
        sample = [prompt_ids_of(row) for row in rows[:flop_sample]]
        backbone_flops, head_flops, sample_tokens = decode_flops(decode, sample, *flop_parts)
        per_token = max(sample_tokens, 1)
        result.update(flop_sample=len(sample), backbone_flops_per_token=backbone_flops / per_token,
                      head_flops_per_token=head_flops / per_token)
    return result


def _until_stop(tokens: list[int], eos_id: int, answer_close_id: int | None) -> list[int]:
    """The tokens up to the stop, with the chunk decoder's rule (`token_stop`)."""
    stop = token_stop(tokens, 0, eos_id, answer_close_id)
    return tokens if stop is None else tokens[:stop]


def sampler_decoder(backbone, tokenizer, max_new_tokens: int, block_length: int, tokens_per_step: int = 1,
                    threshold: float | None = None) -> Callable[[list[list[int]]], DecodedBatch]:
    """prompts -> DecodedBatch with LLaDA's sampler, blocks of `block_length`, temperature 0: by default one token
    per step (steps = new tokens); `tokens_per_step` k (a divisor of block_length) takes steps = new tokens / k,
    `threshold` decodes by confidence threshold instead. `max_new_tokens` is rounded up to whole blocks."""
    if block_length % tokens_per_step:
        raise ValueError(f"tokens_per_step ({tokens_per_step}) must divide the block length ({block_length})")
    gen_length = -(-max_new_tokens // block_length) * block_length
    eos_id, mask_id = tokenizer.eos_token_id, backbone.config.mask_token_id
    answer_close_id = single_token_id(tokenizer, ANSWER_CLOSE)
    stop_ids = (eos_id,) if answer_close_id is None else (eos_id, answer_close_id)

    def decode(prompts):
        ids, mask = left_pad(prompts, block_length, tokenizer.pad_token_id, backbone.device)
        counter = PassCounter()
        out = generate(backbone, ids, mask, steps=gen_length // tokens_per_step, gen_length=gen_length,
                       block_length=block_length, mask_id=mask_id, stop_token_ids=stop_ids, threshold=threshold,
                       counter=counter)
        new = [_until_stop(row, eos_id, answer_close_id) for row in out[:, ids.shape[1]:].tolist()]
        new = [[t for t in row if t != mask_id] for row in new]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return DecodedBatch(texts, [len(row) for row in new], [0] * len(new), [0] * len(new),
                            counter.backbone_row_passes)

    return decode


def llada_sampler_accuracy(backbone, tokenizer, rows: list[dict], max_new_tokens: int, block_length: int,
                           batch_size: int = 32, progress: bool = True, tokens_per_step: int = 1,
                           threshold: float | None = None, flop_sample: int = 0, name: str | None = None) -> dict:
    """Exact match of the backbone with LLaDA's sampler (`sampler_decoder`)."""
    decode = sampler_decoder(backbone, tokenizer, max_new_tokens, block_length, tokens_per_step, threshold)
    return score_decoder(name or "backbone_llada_sampler", rows, batch_size, progress, decode, (backbone, None), flop_sample)


def chunk_decoder(model, tokenizer, max_new_tokens: int, enable_refinement: bool = True,
                  settings: DecodingSettings | None = None, **decode_options) -> Callable[[list[list[int]]], DecodedBatch]:
    """prompts -> DecodedBatch with `generate_with_refinement`: `settings` (default temperature 0), with
    `decode_options` (DecodingSettings fields) on top; the budget and `enable_refinement` are this function's."""
    decoding = (settings if settings is not None else DecodingSettings()).with_overrides(
        **decode_options, max_new_tokens=max_new_tokens, enable_refinement=enable_refinement, return_trace=True)

    def decode(prompts):
        out = generate_with_refinement(model, prompts, tokenizer=tokenizer, settings=decoding)
        chunks = [len(trace) for trace in out.trace]
        steps = [sum(entry.steps for entry in trace) for trace in out.trace]
        return DecodedBatch(out.texts, [len(tokens) for tokens in out.new_tokens], chunks, steps,
                            out.backbone_row_passes)

    return decode


def chunk_decoder_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, enable_refinement: bool = True,
                           batch_size: int = 8, progress: bool = True, settings: DecodingSettings | None = None,
                           flop_sample: int = 0, name: str | None = None, **decode_options) -> dict:
    """Exact match of an `LLaDATRMHybrid` with `chunk_decoder`."""
    decode = chunk_decoder(model, tokenizer, max_new_tokens, enable_refinement, settings, **decode_options)
    default_name = "hybrid_refined" if enable_refinement else "backbone_chunked"
    parts = (model.backbone, model.head if enable_refinement else None)
    return score_decoder(name or default_name, rows, batch_size, progress, decode, parts, flop_sample)


def fair_evaluation(tokenizer, rows: list[dict], max_new_tokens: int, chunk_size: int, models: dict,
                    batch_size: int = 8, progress: bool = True, settings: DecodingSettings | None = None,
                    sampler_max_samples: int | None = None, **decode_options) -> dict:
    """Score the same `rows` with every decoder named in `models`, in DECODERS order; LLaDA's sampler only the
    first `sampler_max_samples` of them (None: all), as it costs about 16x a pass per chunk.

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
            sampler_rows = rows if sampler_max_samples is None else rows[:sampler_max_samples]
            results[name] = llada_sampler_accuracy(models[name], tokenizer, sampler_rows, max_new_tokens, chunk_size,
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
        "hybrid_lead": hybrid_lead(results),
    }


def hybrid_lead(results: dict) -> dict:
    """{backbone decoder: the hybrid's exact match minus its, the paired standard error, problems} over the
    problems both scored; empty without a hybrid."""
    if "hybrid_refined" not in results:
        return {}
    hybrid = results["hybrid_refined"]["right"]
    lead = {}
    for name, other in results.items():
        if name != "hybrid_refined":
            difference, error = paired_difference(hybrid, other["right"])
            lead[name] = {"difference": difference, "standard_error": error,
                          "num_samples": min(len(hybrid), len(other["right"]))}
    return lead


def format_fair_table(evaluation: dict) -> str:
    """The decoders of `fair_evaluation` as a markdown table: exact match and its standard error, correct, samples,
    mean steps, tokens per backbone row-pass (TPF) and new tokens per second; then, with a hybrid, its lead over each
    backbone decoder with the paired standard error (`hybrid_lead`)."""
    header = ("decoder", "exact match", "s.e.", "correct", "samples", "mean steps", "TPF", "tokens/s")
    rows = [(name, f"{r['accuracy']:.3f}", cell(r.get("standard_error"), "{:.3f}"), str(r["correct"]),
             str(r["num_samples"]), f"{r['mean_refinement_steps']:.2f}", cell(r.get("tokens_per_pass"), "{:.2f}"),
             f"{r['tokens_per_second']:.1f}") for name, r in evaluation["decoders"].items()]
    table = markdown_table(header, rows, right=range(1, len(header)))
    lead = evaluation.get("hybrid_lead")
    return table + "\n" + format_hybrid_lead(lead) if lead else table


def format_hybrid_lead(lead: dict) -> str:
    """`hybrid_lead` as a markdown table: difference, paired standard error, the difference in standard errors."""
    rows = [(f"hybrid_refined - {name}", f"{r['difference']:+.3f}", f"{r['standard_error']:.3f}",
             f"{r['difference'] / r['standard_error']:+.1f}" if r["standard_error"] > 0 else "-",
             str(r["num_samples"])) for name, r in lead.items()]
    header = ("hybrid lead (same problems)", "difference", "paired s.e.", "in s.e.", "samples")
    return markdown_table(header, rows, right=range(1, len(header)))
