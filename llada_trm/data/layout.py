"""The text layout of a reasoning sample (question, marker, one step a line, tagged answer) and its token ids."""

from __future__ import annotations

import re

MARKER = "Let's solve this step by step:"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)


def render_prompt(question: str) -> str:
    """Everything up to and including the marker and its newline: the never-masked, never-supervised part."""
    return f"Question: {question.strip()}\n\n{MARKER}\n"


def render_reasoning(steps: list[str] | str, answer: str | None) -> str:
    """Steps one a line, then the tagged answer (omitted when `answer` is None or already tagged)."""
    lines = [s.strip() for s in steps.splitlines()] if isinstance(steps, str) else [s.strip() for s in steps]
    lines = [line for line in lines if line]
    if answer is not None and not any(ANSWER_OPEN in line for line in lines):
        lines.append(f"{ANSWER_OPEN}{str(answer).strip()}{ANSWER_CLOSE}")
    return "\n".join(lines)


def render_example(question: str, reasoning: list[str] | str, answer: str | None) -> str:
    return render_prompt(question) + render_reasoning(reasoning, answer)


def extract_answer(text: str) -> str | None:
    """The text inside the first <answer>...</answer>, stripped; None when there is none."""
    match = _ANSWER_RE.search(text)
    return match.group(1).strip() if match else None


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: no BOS, no EOS (a reasoning text continues its prompt)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """BOS first, when the tokenizer has one: every prompt starts a sequence."""
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt text (see `render_prompt`), BOS first: as training data and decoding see it."""
    return with_bos(tokenizer, text_ids(tokenizer, text))


TOKEN_KINDS = ("result", "answer", "number", "text")


def token_kinds(pieces: list[str]) -> list[str]:
    """The role of each token of a reasoning text, from its decoded pieces: a number right after `=` ("result": what
    a step computes), a number inside the answer tag ("answer"), any other number ("number": operands, quantities),
    or "text". A number may span several tokens (digits one a token); blank pieces do not break one."""
    kinds, after = [], ""  # after: the last non-blank, non-number piece
    for piece in pieces:
        word = piece.strip()
        if word.isdigit():
            kinds.append("result" if after.endswith("=") else "answer" if after.endswith(ANSWER_OPEN) else "number")
            continue
        kinds.append("text")
        if word:
            after = word
    return kinds
