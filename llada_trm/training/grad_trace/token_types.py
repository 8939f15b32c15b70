"""Token types of the trace: `special`, `number`, `operator`, `word`, `punctuation`.

Rules, first match wins, on the decoded token text with surrounding whitespace removed:
- special: a special token of the tokenizer, or a tag such as `<answer>` / `<|eot_id|>`;
- number: at least one digit and no letter (`3`, `19`, `2.5`, `3.`);
- operator: an arithmetic or comparison sign (`+ - * / = × ÷ ^ % < > ≤ ≥ ± −`);
- word: at least one letter;
- punctuation: everything else, whitespace-only tokens (a space, a newline) included.
"""

from __future__ import annotations

import re

TOKEN_TYPES = ("number", "operator", "word", "punctuation", "special")
OPERATORS = frozenset("+-*/=×÷^%<>≤≥±−")
_TAG = re.compile(r"^<\|?/?[A-Za-z_][\w|]*\|?>$")


def token_type(text: str, is_special: bool = False) -> str:
    stripped = text.strip()
    if is_special or _TAG.match(stripped):
        return "special"
    has_digit = any(c.isdigit() for c in stripped)
    has_letter = any(c.isalpha() for c in stripped)
    if has_digit and not has_letter:
        return "number"
    if stripped and all(c in OPERATORS for c in stripped):
        return "operator"
    if has_letter:
        return "word"
    return "punctuation"


class TokenTexts:
    """Decoded text and type of token ids, cached (the trace sees the same few hundred ids again and again)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, str]] = {}

    def __call__(self, token_id: int) -> tuple[str, str]:
        if token_id not in self._cache:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self._cache[token_id] = (text, token_type(text, token_id in self.special_ids))
        return self._cache[token_id]
