"""One record -> prompt and reasoning token ids (`parse_record`), or a `BadSample` naming its kind.

A record is question/reasoning/answer fields, a `text` holding the marker, chat `messages`, or pre-tokenised
`input_ids`/`labels`; `--dataset_name` aliases (gsm8k, natural_reasoning) adapt their columns first. Every way a
record can fail has a kind in `BAD_KINDS` and a fix in `BAD_KIND_HINTS` (docs/data.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from llada_trm.data.chat_spans import split_chat
from llada_trm.data.layout import MARKER, encode_prompt, extract_answer, render_prompt, render_reasoning, text_ids


BAD_KINDS = (
    "bad_encoding", "malformed_json", "malformed_csv", "missing_field", "empty_reasoning", "no_marker",
    "no_assistant_span", "prompt_too_long", "invalid_tokens",
)
BAD_KIND_HINTS = {
    "bad_encoding": "the file must be UTF-8: save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8 OLD > NEW), or remove "
    "the line named in the message",
    "malformed_json": "fix or remove the line named in the message",
    "malformed_csv": "quote the cells that hold the delimiter (\"a, b\"), or fix the line named in the message",
    "missing_field": "map your columns with --question_field/--reasoning_field/--answer_field/--text_field/"
    "--messages_field, or use a --dataset_name alias (gsm8k, natural_reasoning) with --dataset_path",
    "empty_reasoning": "drop records whose reasoning is empty; there is nothing to supervise",
    "no_marker": f"'text' records must contain the marker {MARKER!r}; use question/reasoning records otherwise",
    "no_assistant_span": "pass --response_template with the assistant header your chat template writes",
    "prompt_too_long": "raise --max_length or shorten the prompts",
    "invalid_tokens": "pre-tokenised records need equal-length input_ids/labels with ids inside the vocabulary",
}


class BadSample(Exception):
    """One record that cannot become a training sample, with its kind (one of BAD_KINDS)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class Recipe:
    """Everything the per-batch preparation needs besides the tokenizer (hashed into the cache fingerprint)."""

    chunk_size: int
    max_length: int
    question_field: str = "question"
    reasoning_field: str = "reasoning"
    answer_field: str = "answer"
    text_field: str = "text"
    messages_field: str = "messages"
    response_template: str | None = None
    bad_sample_policy: str = "skip"
    alias: str | None = None


@dataclass
class Parsed:
    prompt_ids: list[int]
    reasoning_ids: list[int]
    answer: str
    whole_assistant: bool = False


def _adapt_gsm8k(record: dict, source: str) -> dict:
    """gsm8k: `answer` holds the reasoning lines, then '#### <final>'."""
    question, solution = _require(record, "question", source), _require(record, "answer", source)
    steps, has_final, final = str(solution).partition("####")
    return {"question": question, "reasoning": steps, "answer": final.strip() if has_final else None}


def _adapt_natural_reasoning(record: dict, source: str) -> dict:
    """natural_reasoning: the first model response is the reasoning, `reference_answer` the answer."""
    responses = _require(record, "responses", source)
    first = responses[0] if isinstance(responses, list) and responses else None
    if not isinstance(first, dict) or first.get("response") is None:
        raise BadSample("missing_field", f"{source}: missing field 'responses[0].response'")
    answer = record.get("reference_answer")
    return {"question": _require(record, "question", source), "reasoning": first["response"],
            "answer": answer if answer not in (None, "") else None}


ALIAS_ADAPTERS = {"gsm8k": _adapt_gsm8k, "natural_reasoning": _adapt_natural_reasoning}


def _require(record: dict, name: str, source: str):
    value = record.get(name)
    if value is None:
        found = ", ".join(sorted(k for k in record if not k.startswith("__"))) or "nothing"
        raise BadSample("missing_field", f"{source}: missing field {name!r} (record has: {found})")
    return value


def _parse_question(record: dict, tokenizer, source: str, fields: tuple[str, str, str]) -> Parsed:
    question_field, reasoning_field, answer_field = fields
    question, reasoning = _require(record, question_field, source), _require(record, reasoning_field, source)
    if not isinstance(reasoning, (str, list)) or (isinstance(reasoning, list)
                                                  and not all(isinstance(s, str) for s in reasoning)):
        raise BadSample("missing_field", f"{source}: field {reasoning_field!r} must be a string or a list of "
                                         f"strings, got {type(reasoning).__name__}")
    if not "".join(reasoning).strip():
        raise BadSample("empty_reasoning", f"{source}: field {reasoning_field!r} is empty")
    answer = record.get(answer_field)
    answer = str(answer).strip() if answer is not None and str(answer).strip() else None
    reasoning_text = render_reasoning(reasoning, answer)
    prompt_ids = encode_prompt(tokenizer, render_prompt(str(question)))
    known_answer = answer if answer is not None else extract_answer(reasoning_text)
    return Parsed(prompt_ids, text_ids(tokenizer, reasoning_text), known_answer or "")


def _parse_text(text, recipe: Recipe, tokenizer, source: str) -> Parsed:
    before, found, after = str(text).partition(MARKER)
    if not found:
        raise BadSample("no_marker", f"{source}: field {recipe.text_field!r} does not contain the marker {MARKER!r}")
    newline = "\n" if after.startswith("\n") else ""
    reasoning = after[len(newline) :]
    if not reasoning.strip():
        raise BadSample("empty_reasoning", f"{source}: nothing follows the marker")
    prompt_ids = encode_prompt(tokenizer, before + MARKER + newline)
    return Parsed(prompt_ids, text_ids(tokenizer, reasoning), extract_answer(reasoning) or "")


def _parse_messages(messages, recipe: Recipe, tokenizer, source: str) -> Parsed:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise BadSample("missing_field", f"{source}: field {recipe.messages_field!r} must be a list of "
                                         f"{{role, content}} messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise BadSample("no_assistant_span", f"{source}: no message with role 'assistant'")
    messages = messages[: last + 1]  # turns after the last reply have nothing to supervise
    content = messages[-1].get("content")
    if not isinstance(content, str):
        raise BadSample("missing_field", f"{source}: the last assistant message needs a string 'content'")
    reply = content.partition(MARKER)[2] if MARKER in content else content
    if not reply.strip():
        raise BadSample("empty_reasoning", f"{source}: the last assistant message has no reasoning")
    try:
        split = split_chat(tokenizer, messages, MARKER, recipe.response_template)
    except TemplateError as error:
        raise BadSample("no_assistant_span", f"{source}: the chat template failed: {error}") from error
    if split is None:
        raise BadSample("no_assistant_span", f"{source}: the assistant reply was found neither by the template-prefix "
                                             f"method nor by a known assistant header (set --response_template)")
    return Parsed(split.prompt_ids, split.reasoning_ids, extract_answer(reply) or "", not split.has_marker)


def _parse_pretokenized(record: dict, tokenizer, source: str) -> Parsed:
    ids = record["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids):
        raise BadSample("invalid_tokens", f"{source}: input_ids must be token ids in [0, {len(tokenizer)})")
    if record.get("labels") is not None:
        labels = record["labels"]
        if not isinstance(labels, list) or len(labels) != len(ids):
            raise BadSample("invalid_tokens", f"{source}: labels and input_ids differ in length")
        prompt_length = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        if labels[prompt_length:] != ids[prompt_length:]:
            raise BadSample("invalid_tokens", f"{source}: after the leading -100 prompt, labels must equal "
                                              f"input_ids (unshifted; diffusion LMs predict each position itself)")
    elif record.get("prompt_length") is not None:
        prompt_length = record["prompt_length"]
        if not isinstance(prompt_length, int) or not 0 <= prompt_length <= len(ids):
            raise BadSample("invalid_tokens", f"{source}: prompt_length must be in [0, {len(ids)}]")
    else:
        raise BadSample("missing_field", f"{source}: pre-tokenised records need 'labels' or 'prompt_length'")
    reasoning = ids[prompt_length:]
    while reasoning and reasoning[-1] == tokenizer.eos_token_id:
        reasoning = reasoning[:-1]  # the layout appends its own EOS run
    if not reasoning:
        raise BadSample("empty_reasoning", f"{source}: no supervised tokens besides EOS")
    return Parsed(ids[:prompt_length], reasoning, extract_answer(tokenizer.decode(reasoning)) or "")


def parse_record(record: dict, recipe: Recipe, tokenizer, source: str) -> Parsed:
    """Recognise the record's shape and split it into prompt and reasoning ids (raises BadSample)."""
    if recipe.alias:
        adapted = ALIAS_ADAPTERS[recipe.alias](record, source)
        parsed = _parse_question(adapted, tokenizer, source, ("question", "reasoning", "answer"))
    else:
        if record.get("input_ids") is not None:
            parsed = _parse_pretokenized(record, tokenizer, source)
        elif record.get(recipe.messages_field) is not None:
            parsed = _parse_messages(record[recipe.messages_field], recipe, tokenizer, source)
        elif record.get(recipe.text_field) is not None:
            parsed = _parse_text(record[recipe.text_field], recipe, tokenizer, source)
        else:
            fields = (recipe.question_field, recipe.reasoning_field, recipe.answer_field)
            parsed = _parse_question(record, tokenizer, source, fields)
        given_answer = "" if record.get(recipe.answer_field) is None else str(record[recipe.answer_field]).strip()
        parsed.answer = given_answer or parsed.answer  # an explicit answer field beats the <answer> tag
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id in (*parsed.prompt_ids, *parsed.reasoning_ids):
        raise BadSample("invalid_tokens", f"{source}: contains the mask token {tokenizer.mask_token!r}; a "
                                          f"ground-truth mask token cannot be told from a masked position")
    return parsed


def raw_record(row: dict, source: str) -> dict:
    """The record of a loaded row: a row its file reader could not read (data/sources.py marks it, e.g. a line
    that is not UTF-8) raises its BadSample here, under the same policy as every other; a JSON text is decoded."""
    if row.get("__bad_kind__"):
        raise BadSample(row["__bad_kind__"], row["__bad_message__"])
    return decode_json_row(row, source) if "__json__" in row else row


def decode_json_row(row: dict, source: str) -> dict:
    """A JSONL line (kept as text by data/sources.py) as a record dict."""
    try:
        record = json.loads(row["__json__"])
    except json.JSONDecodeError as error:
        raise BadSample("malformed_json", f"{source}: malformed JSON ({error})") from None
    if not isinstance(record, dict):
        raise BadSample("malformed_json", f"{source}: expected a JSON object, got {type(record).__name__}")
    return record
