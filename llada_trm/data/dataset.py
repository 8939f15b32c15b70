"""Data pipeline: load reasoning records, split them into prompt and reasoning, lay them out in whole chunks.

One sample is `[left pad][prompt][reasoning][EOS][EOS fill]`: the prompt is left-padded to a multiple of
`chunk_size` so the reasoning starts on a chunk boundary, and the EOS run closes the last chunk (and is
supervised: the model learns to stop). Samples are not right-padded here; the collator pads a batch with
whole pad chunks.

Notable choices:
- prompt and reasoning are tokenised separately (and the prompt gets BOS, as in pretraining), so training
  sees the prompt exactly as inference tokenises it on its own;
- a bad record never stops the run silently nor trains with every label ignored: it gets a kind (`BAD_KINDS`
  of data/records.py, which turns one record into token ids), is counted or raised per `--bad_sample_policy`,
  and one summary reports the counts;
- tokenisation is one `datasets.map(batched=True)` per split, cached by datasets' fingerprinting for
  file-backed sources (Hub, parquet).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import datasets

from llada_trm.data.arguments import DataArgumentError, DataArguments
from llada_trm.data.records import BAD_KIND_HINTS, BadSample, Recipe, parse_record, raw_record
from llada_trm.data.sources import DataError, load_records

def layout_sample(prompt_ids: list[int], reasoning_ids: list[int], *, chunk_size: int, max_length: int,
                  pad_token_id: int, eos_token_id: int) -> dict:
    """`[left pad][prompt][reasoning][EOS][EOS fill]` in whole chunks, cut to `max_length` (raises BadSample).

    Too long: whole trailing chunks are dropped and the EOS is kept only if it still fits (an EOS after a cut
    would teach the model to stop mid-thought).
    """
    pad = -len(prompt_ids) % chunk_size
    budget = max_length // chunk_size * chunk_size - (pad + len(prompt_ids))
    if budget < chunk_size:
        raise BadSample("prompt_too_long", f"prompt of {len(prompt_ids)} tokens ({pad + len(prompt_ids)} padded to "
                                           f"chunk_size {chunk_size}) leaves no room for one chunk in --max_length "
                                           f"{max_length}")
    body = [*reasoning_ids, eos_token_id]
    body += [eos_token_id] * (-len(body) % chunk_size)
    truncated = len(body) > budget
    if truncated:
        body = list(reasoning_ids[:budget])
    prefix = pad + len(prompt_ids)
    return {
        "input_ids": [pad_token_id] * pad + list(prompt_ids) + body,
        "attention_mask": [0] * pad + [1] * (len(prompt_ids) + len(body)),
        "labels": [-100] * prefix + body,
        "chunk_index": [-1] * prefix + [i // chunk_size for i in range(len(body))],
        "num_chunks": len(body) // chunk_size,
        "prompt_length": len(prompt_ids),
        "truncated": truncated,
    }


PREPARED_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "attention_mask": datasets.Sequence(datasets.Value("int8")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "chunk_index": datasets.Sequence(datasets.Value("int32")),
    "num_chunks": datasets.Value("int32"),
    "prompt_length": datasets.Value("int32"),
    "answer": datasets.Value("string"),
    "truncated": datasets.Value("bool"),
    "_bad_kind": datasets.Value("string"),
    "_bad_message": datasets.Value("string"),
    "_whole_assistant": datasets.Value("bool"),
})
_EMPTY_ROW = {"input_ids": [], "attention_mask": [], "labels": [], "chunk_index": [], "num_chunks": 0,
              "prompt_length": 0, "truncated": False}


def prepare_batch(batch: dict[str, list], indices: list[int], recipe: Recipe, tokenizer) -> dict[str, list]:
    """The `datasets.map` function: one output row per record, bad ones marked with their kind."""
    out = {name: [] for name in PREPARED_FEATURES}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for position, index in enumerate(indices):
        row = {key: values[position] for key, values in batch.items()}
        source = row.get("__source__") or f"row {index}"
        try:
            record = raw_record(row, source)
            parsed = parse_record(record, recipe, tokenizer, source)
            sample = layout_sample(parsed.prompt_ids, parsed.reasoning_ids, chunk_size=recipe.chunk_size,
                                   max_length=recipe.max_length, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id)
            sample.update(answer=parsed.answer, _bad_kind="", _bad_message="", _whole_assistant=parsed.whole_assistant)
        except BadSample as bad:
            message = bad.message if bad.message.startswith(source) else f"{source}: {bad.message}"
            if recipe.bad_sample_policy == "error":
                raise DataError(f"bad sample ({bad.kind}) {message}. Fix: {BAD_KIND_HINTS[bad.kind]}; or "
                                f"--bad_sample_policy skip to drop bad samples") from None
            sample = dict(_EMPTY_ROW, answer="", _bad_kind=bad.kind, _bad_message=message, _whole_assistant=False)
        for name in out:
            out[name].append(sample[name])
    return out


# ------------------------------------------------------------------------------------ summary and entry

@dataclass
class PreprocessSummary:
    split: str
    chunk_size: int
    max_length: int
    total: int = 0
    kept: int = 0
    bad_counts: dict[str, int] = field(default_factory=dict)
    bad_examples: dict[str, str] = field(default_factory=dict)  # first message of each kind
    truncated: int = 0
    whole_assistant: int = 0  # chat samples without the marker: the whole reply is reasoning
    reasoning_chunks: int = 0
    total_tokens: int = 0  # prompt, left pad and reasoning of every kept sample (no batch padding)

    @property
    def bad(self) -> int:
        return sum(self.bad_counts.values())

    @property
    def mean_reasoning_chunks(self) -> float:
        return self.reasoning_chunks / self.kept if self.kept else 0.0

    @property
    def supervised_tokens(self) -> int:
        return self.reasoning_chunks * self.chunk_size  # every reasoning-region position is supervised

    @property
    def supervised_fraction(self) -> float:
        return self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0

    def most_common_bad_kind(self) -> str | None:
        return max(self.bad_counts, key=self.bad_counts.get) if self.bad_counts else None

    def format(self) -> str:
        skipped = ", ".join(f"{kind} {n}" for kind, n in sorted(self.bad_counts.items(), key=lambda kv: -kv[1]))
        lines = [f"data [{self.split}]: {self.total} records -> {self.kept} samples, {self.bad} skipped"
                 + (f" ({skipped})" if skipped else "")]
        for kind in sorted(self.bad_examples, key=lambda k: -self.bad_counts[k]):
            lines.append(f"  e.g. {kind}: {self.bad_examples[kind]}")
        lines.append(f"  truncated at --max_length {self.max_length}: {self.truncated}")
        if self.whole_assistant:
            lines.append(f"  chat samples without the marker (whole assistant reply is reasoning): "
                         f"{self.whole_assistant}")
        lines.append(f"  mean reasoning chunks: {self.mean_reasoning_chunks:.2f} (chunk_size {self.chunk_size}); "
                     f"supervised tokens: {self.supervised_tokens} of {self.total_tokens} "
                     f"({self.supervised_fraction:.1%})")
        return "\n".join(lines)


@dataclass
class PreparedData:
    dataset: datasets.Dataset
    summary: PreprocessSummary


def _column(dataset: datasets.Dataset, name: str) -> list:
    return dataset.data.column(name).to_pylist()


def _summarise(mapped: datasets.Dataset, split: str, chunk_size: int, max_length: int) -> PreprocessSummary:
    summary = PreprocessSummary(split=split, chunk_size=chunk_size, max_length=max_length, total=len(mapped))
    kinds, messages = _column(mapped, "_bad_kind"), _column(mapped, "_bad_message")
    summary.bad_counts = dict(Counter(k for k in kinds if k))
    for kind, message in zip(kinds, messages):
        if kind:
            summary.bad_examples.setdefault(kind, message)
    good = [not k for k in kinds]
    chunks, prompts = _column(mapped, "num_chunks"), _column(mapped, "prompt_length")
    summary.kept = sum(good)
    summary.truncated = sum(t for t, g in zip(_column(mapped, "truncated"), good) if g)
    summary.whole_assistant = sum(w for w, g in zip(_column(mapped, "_whole_assistant"), good) if g)
    summary.reasoning_chunks = sum(c for c, g in zip(chunks, good) if g)
    summary.total_tokens = sum(-(-p // chunk_size) * chunk_size + c * chunk_size
                               for p, c, g in zip(prompts, chunks, good) if g)
    return summary


def _check_usable(summary: PreprocessSummary, max_bad_fraction: float) -> None:
    kind = summary.most_common_bad_kind()
    example = (f" Most common kind: {kind} ({summary.bad_counts[kind]}), e.g. {summary.bad_examples[kind]}. "
               f"Fix: {BAD_KIND_HINTS[kind]}.") if kind else ""
    if summary.kept == 0:
        raise DataError(f"no usable sample in split {summary.split!r} ({summary.total} records, all bad).{example}")
    if summary.bad / summary.total > max_bad_fraction:
        raise DataError(f"{summary.bad} of {summary.total} records in split {summary.split!r} are bad "
                        f"({summary.bad / summary.total:.0%} > --max_bad_fraction {max_bad_fraction}).{example}")
    if summary.supervised_tokens == 0:
        raise DataError(f"split {summary.split!r} has no supervised token; nothing to train on.{example}")


def _is_good(kinds: list[str]) -> list[bool]:
    return [not kind for kind in kinds]


def prepare_dataset(args: DataArguments, tokenizer, chunk_size: int, split: str) -> PreparedData:
    """Load `split`, tokenise it into whole-chunk samples, count bad records and check the result is trainable."""
    args.validate()
    if chunk_size <= 0:
        raise DataArgumentError(f"--chunk_size must be positive, got {chunk_size}")
    if args.max_length < chunk_size:
        raise DataArgumentError(f"--max_length ({args.max_length}) must hold at least one chunk of {chunk_size}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; the layout closes every reasoning with EOS")
    raw, alias = load_records(args, split)
    if len(raw) == 0:
        raise DataError(f"split {split!r} of {args.dataset_path or args.dataset_name!r} has no records")
    recipe = Recipe(chunk_size=chunk_size, max_length=args.max_length, question_field=args.question_field,
                    reasoning_field=args.reasoning_field, answer_field=args.answer_field, text_field=args.text_field,
                    messages_field=args.messages_field, response_template=args.response_template,
                    bad_sample_policy=args.bad_sample_policy, alias=alias)
    mapped = raw.map(
        functools.partial(prepare_batch, recipe=recipe, tokenizer=tokenizer),
        batched=True, with_indices=True, remove_columns=raw.column_names, features=PREPARED_FEATURES,
        num_proc=args.preprocessing_num_workers, desc=f"Tokenising {split}",
    )
    summary = _summarise(mapped, split, chunk_size, args.max_length)
    _check_usable(summary, args.max_bad_fraction)
    kept = mapped.filter(_is_good, input_columns="_bad_kind", batched=True, desc=f"Dropping bad {split} records")
    kept = kept.remove_columns(["_bad_kind", "_bad_message", "_whole_assistant"])
    kept = kept.add_column("sample_id", list(range(len(kept))))
    return PreparedData(dataset=kept, summary=summary)
