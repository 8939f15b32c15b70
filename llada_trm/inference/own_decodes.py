"""The backbone's own decodes of training problems, as training records: self-distillation data.

Ground-truth reasoning asks the head for chains its backbone would not write; the backbone's own decodes are the
chains it does write, so a head trained on them learns to produce in one pass per chunk what the backbone
produces in many (the route of dParallel and d3LLM, here without a teacher other than the backbone).
`own_decode_records` decodes each question with LLaDA's sampler (threshold decoding by default: the
one-token-per-step sampler's accuracy at about a quarter of the passes, docs/evaluation.md) and keeps the decode as
the record's reasoning, for every problem (`keep="all"`) or only where its answer is right (`keep="correct"`).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from llada_trm.data.layout import encode_prompt, extract_answer, render_prompt
from llada_trm.inference.exact_match import is_correct, sampler_decoder

KEEP = ("correct", "all")


def own_decode_records(backbone, tokenizer, records: list[dict], max_new_tokens: int, block_length: int,
                       threshold: float | None = 0.9, keep: str = "correct", batch_size: int = 32,
                       progress: bool = True) -> tuple[list[dict], dict]:
    """(question/reasoning/answer records whose reasoning is the backbone's decode, counts). A kept record's answer
    is the decode's own (`keep="all"` keeps wrong ones too; a decode without an answer tag gets none)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    decode = sampler_decoder(backbone, tokenizer, max_new_tokens, block_length, threshold=threshold)
    kept, correct, tokens, passes = [], 0, 0, 0
    bar = tqdm(total=len(records), desc="own decodes", disable=not progress, unit="problem")
    for start in range(0, len(records), batch_size):
        batch = records[start: start + batch_size]
        decoded = decode([encode_prompt(tokenizer, render_prompt(r["question"])) for r in batch])
        tokens, passes = tokens + sum(decoded.new_tokens), passes + decoded.backbone_row_passes
        for record, text in zip(batch, decoded.texts):
            right = is_correct(text, str(record["answer"]))
            correct += right
            answer = extract_answer(text)
            if text.strip() and (right or keep == "all"):
                kept.append({"question": record["question"], "reasoning": text,
                             **({"answer": answer} if answer is not None else {})})
        bar.update(len(batch))
    bar.close()
    counts = {"problems": len(records), "correct": correct, "kept": len(kept), "keep": keep,
              "threshold": threshold, "tokens_per_pass": tokens / passes if passes else 0.0}
    return kept, counts
