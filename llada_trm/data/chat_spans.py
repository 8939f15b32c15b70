"""Where the last assistant reply starts in a chat-templated sample, and how it splits into prompt and reasoning.

No single header string is trusted. The primary method asks the template itself: `messages[:-1]` rendered with
`add_generation_prompt=True` must be a *token* prefix of the full rendering, and everything after that prefix
is the reply (a template that ignores `add_generation_prompt` fails this method, or its header would land in
the reply). When a template breaks that property (it renders the last turn differently, strips earlier
thoughts, ...), the fallback searches known assistant headers in token space: the header's token ids inside
the rendered ids, last occurrence. A user-supplied `response_template` is tried before the registry.

Within the reply, the region after the reasoning marker is the reasoning; without a marker the whole reply
(end-of-turn tokens included) is. Prompt and reasoning are tokenised separately, exactly as a prompt is
tokenised on its own at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError

# Assistant headers of common chat templates, as they appear right before the reply text.
ASSISTANT_HEADERS: dict[str, str] = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",  # LLaDA uses the Llama 3 layout
    "chatml": "<|im_start|>assistant\n",
    "mistral": "[/INST]",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",  # Phi-3 and Zephyr
    "command_r": "<|CHATBOT_TOKEN|>",
}


@dataclass
class ChatSplit:
    prompt_ids: list[int]
    reasoning_ids: list[int]
    has_marker: bool  # False: the whole last assistant reply is the reasoning
    method: str  # "template_prefix", "response_template" or a key of ASSISTANT_HEADERS


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text: the template wrote any BOS itself, so add nothing."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def find_subsequence_end(haystack: list[int], needle: list[int]) -> int | None:
    """Index just past the LAST occurrence of `needle` in `haystack` (None when absent)."""
    n = len(needle)
    if n == 0:
        return None
    for start in range(len(haystack) - n, -1, -1):
        if haystack[start : start + n] == needle:
            return start + n
    return None


def header_token_variants(tokenizer, header: str) -> list[list[int]]:
    """The header's ids alone and between a newline and reply text: BPE merges differ at text boundaries
    (e.g. a trailing '\\n\\n' tokenises differently at the end of a string than before a word)."""
    variants = []
    for before, after in [("", ""), ("\n", ""), ("", "x"), ("\n", "x")]:
        ids = encode(tokenizer, before + header + after)
        head, tail = encode(tokenizer, before) if before else [], encode(tokenizer, after) if after else []
        if ids[: len(head)] == head and ids[len(ids) - len(tail) :] == tail:
            variant = ids[len(head) : len(ids) - len(tail)]
            if variant and variant not in variants:
                variants.append(variant)
    return variants


def start_from_template_prefix(tokenizer, messages: list[dict], full_ids: list[int]) -> int | None:
    if len(messages) < 2:
        return None  # nothing before the reply to render (some templates refuse an empty conversation)
    try:
        prefix = render(tokenizer, messages[:-1], add_generation_prompt=True)
        without_prompt = render(tokenizer, messages[:-1], add_generation_prompt=False)
    except TemplateError:
        return None
    if prefix == without_prompt:
        return None  # the template ignores add_generation_prompt: a prefix match would put the header in the reply
    prefix_ids = encode(tokenizer, prefix)
    if len(prefix_ids) < len(full_ids) and full_ids[: len(prefix_ids)] == prefix_ids:
        return len(prefix_ids)
    return None


def start_from_headers(tokenizer, full_ids: list[int], response_template: str | None) -> tuple[int, str] | None:
    """The user's template wins when it matches; otherwise the registry header that occurs last."""
    if response_template:
        ends = [find_subsequence_end(full_ids, v) for v in header_token_variants(tokenizer, response_template)]
        ends = [e for e in ends if e is not None and e < len(full_ids)]
        if ends:
            return max(ends), "response_template"
    best = None
    for name, header in ASSISTANT_HEADERS.items():
        for variant in header_token_variants(tokenizer, header):
            end = find_subsequence_end(full_ids, variant)
            if end is not None and end < len(full_ids) and (best is None or end > best[0]):
                best = (end, name)
    return best


def find_assistant_start(
    tokenizer, messages: list[dict], full_ids: list[int], response_template: str | None = None
) -> tuple[int, str] | None:
    """(token index where the last message's reply starts, method used), or None when no method finds it."""
    start = start_from_template_prefix(tokenizer, messages, full_ids)
    if start is not None:
        return start, "template_prefix"
    return start_from_headers(tokenizer, full_ids, response_template)


def split_chat(tokenizer, messages: list[dict], marker: str, response_template: str | None = None) -> ChatSplit | None:
    """Split a conversation whose last message is the assistant reply to supervise. None: no assistant span.

    Raises jinja2 TemplateError when the template refuses the conversation.
    """
    full_text = render(tokenizer, messages, add_generation_prompt=False)
    full_ids = encode(tokenizer, full_text)
    found = find_assistant_start(tokenizer, messages, full_ids, response_template)
    if found is None:
        return None
    start, method = found
    markers_in_reply = messages[-1]["content"].count(marker)
    marker_positions = _occurrences(full_text, marker)
    if markers_in_reply == 0 or len(marker_positions) < markers_in_reply:
        return ChatSplit(full_ids[:start], full_ids[start:], has_marker=False, method=method)
    # The reply is rendered last, so its first marker is the markers_in_reply-th occurrence from the end.
    cut = marker_positions[-markers_in_reply] + len(marker)
    if full_text[cut : cut + 1] == "\n":
        cut += 1
    return ChatSplit(encode(tokenizer, full_text[:cut]), encode(tokenizer, full_text[cut:]), True, method)


def _occurrences(text: str, sub: str) -> list[int]:
    positions, at = [], text.find(sub)
    while at != -1:
        positions.append(at)
        at = text.find(sub, at + 1)
    return positions
