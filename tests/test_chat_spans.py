"""Chat records: the assistant span under several template styles, multi-turn supervision, fallbacks, failures."""

import json

import pytest
from transformers import AutoTokenizer

from llada_trm.data.chat_spans import find_subsequence_end, header_token_variants, split_chat, start_from_headers
from llada_trm.data.dataset import DataArguments, DataError, Recipe, prepare_batch, prepare_dataset
from llada_trm.data.layout import MARKER
from llada_trm.embedded.assets import TINY_LLADA_PATH
from llada_trm.embedded.tokenizer import CHAT_TEMPLATE as LLAMA3

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (  # no generation prompt: '[/INST]' closes the user turn, so only the header registry finds the reply
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
COMMAND_R = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + m['content'] + '<|END_OF_TURN_TOKEN|>' }}{% else %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + m['content'] + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
THINKING_CHATML = CHATML.replace("assistant\n' }}", "assistant\n<think>\n' }}")  # a thinking model's prompt
assert THINKING_CHATML != CHATML
ALPACA = (  # ignores add_generation_prompt and uses a header no registry knows
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
)
STYLES = {  # template, method expected to find the reply
    "llama3": (LLAMA3, "template_prefix"),
    "chatml": (CHATML, "template_prefix"),
    "gemma": (GEMMA, "template_prefix"),
    "phi3": (PHI3, "template_prefix"),
    "mistral": (MISTRAL, "mistral"),
    "command_r": (COMMAND_R, "template_prefix"),
}
EXTRA_SPECIAL = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>",
                 "<|system|>", "<|end|>", "[INST]", "[/INST]", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                 "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]
REPLY = f"{MARKER}\n2 + 3 = 5.\n<answer>5</answer>"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The shipped tokenizer plus the control tokens of the other template families, as their tokenizers have."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLADA_PATH)
    tokenizer.add_tokens(EXTRA_SPECIAL, special_tokens=True)
    return tokenizer


def using(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


def conversation(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": role, "content": text} for role, text in zip(roles, turns)]


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


@pytest.mark.parametrize("style", list(STYLES))
def test_assistant_span_found(chat_tokenizer, style):
    template, method = STYLES[style]
    tokenizer = using(chat_tokenizer, template)
    split = split_chat(tokenizer, conversation("What is 2 + 3?", REPLY), MARKER)
    assert split is not None and split.method == method and split.has_marker
    prompt, reasoning = decode(tokenizer, split.prompt_ids), decode(tokenizer, split.reasoning_ids)
    assert prompt.endswith(MARKER + "\n") and "What is 2 + 3?" in prompt
    assert reasoning.startswith("2 + 3 = 5.\n<answer>5</answer>")


@pytest.mark.parametrize("style", list(STYLES))
def test_header_registry_agrees_with_the_template(chat_tokenizer, style):
    """The fallback, searched in token space, lands where the template says the reply starts."""
    tokenizer = using(chat_tokenizer, STYLES[style][0])
    messages = conversation("Hi there", "Hello! How can I help?")
    full_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    start, name = start_from_headers(tokenizer, full_ids, None)
    assert name == style
    assert decode(tokenizer, full_ids[start:]).startswith("Hello! How can I help?")
    without_marker = split_chat(tokenizer, messages, MARKER)
    assert not without_marker.has_marker and without_marker.prompt_ids == full_ids[:start]


def test_fallback_when_the_generation_prompt_is_not_a_prefix(chat_tokenizer):
    tokenizer = using(chat_tokenizer, THINKING_CHATML)
    split = split_chat(tokenizer, conversation("What is 2 + 3?", "It is five."), MARKER)
    assert split.method == "chatml"
    assert decode(tokenizer, split.reasoning_ids) == "It is five.<|im_end|>\n"


def test_response_template_rescues_an_unknown_header(chat_tokenizer):
    tokenizer = using(chat_tokenizer, ALPACA)
    messages = conversation("What is 2 + 3?", "It is five.")
    assert split_chat(tokenizer, messages, MARKER) is None
    split = split_chat(tokenizer, messages, MARKER, response_template="### Response:\n")
    assert split.method == "response_template"
    assert decode(tokenizer, split.reasoning_ids) == "It is five.\n\n"


def test_find_subsequence_end_takes_the_last_occurrence():
    assert find_subsequence_end([1, 2, 3, 1, 2, 4], [1, 2]) == 5
    assert find_subsequence_end([1, 2, 3], [4]) is None
    assert find_subsequence_end([1, 2, 3], []) is None


def test_header_variants_cover_trailing_whitespace(chat_tokenizer):
    variants = header_token_variants(chat_tokenizer, "<|im_start|>assistant\n")
    assert variants and all(v[0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>") for v in variants)


# ------------------------------------------------------------------------------- through prepare_dataset

def write_chat(tmp_path, rows, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare_chat(tokenizer, tmp_path, rows, **kwargs):
    args = DataArguments(dataset_name=write_chat(tmp_path, rows), cache_dir=str(tmp_path / "cache"), **kwargs)
    return prepare_dataset(args, tokenizer, 16, "train")


def supervised_text(tokenizer, row):
    return decode(tokenizer, [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


def prompt_text(tokenizer, row):
    return decode(tokenizer, [t for t, a, label in zip(row["input_ids"], row["attention_mask"], row["labels"])
                              if a and label == -100])


@pytest.mark.parametrize("style", ["llama3", "chatml", "gemma", "phi3", "mistral"])
def test_multi_turn_supervises_only_the_last_reply(chat_tokenizer, tmp_path, style):
    tokenizer = using(chat_tokenizer, STYLES[style][0])
    first_reply = f"{MARKER}\nOld thoughts.\n<answer>1</answer>"
    messages = conversation("What is 0 + 1?", first_reply, "And 2 + 3?", REPLY)
    prepared = prepare_chat(tokenizer, tmp_path, [{"messages": messages}])
    row = prepared.dataset[0]
    supervised = supervised_text(tokenizer, row)
    assert supervised.startswith("2 + 3 = 5.\n<answer>5</answer>")
    assert "Old thoughts" not in supervised and "What is" not in supervised
    prompt = prompt_text(tokenizer, row)
    assert "Old thoughts." in prompt and "And 2 + 3?" in prompt and prompt.endswith(MARKER + "\n")
    assert row["answer"] == "5" and prepared.summary.whole_assistant == 0
    assert row["chunk_index"].index(0) % 16 == 0


def test_trailing_user_turn_is_dropped_and_roles_counted(chat_tokenizer, tmp_path):
    tokenizer = using(chat_tokenizer, LLAMA3)
    messages = [{"role": "system", "content": "Be brief."}, *conversation("What is 2 + 3?", REPLY),
                {"role": "user", "content": "Thanks!"}]
    row = prepare_chat(tokenizer, tmp_path, [{"messages": messages}]).dataset[0]
    assert "Thanks" not in decode(tokenizer, row["input_ids"])
    assert "Be brief." in prompt_text(tokenizer, row)


def test_reply_without_marker_is_whole_reasoning_and_counted(chat_tokenizer, tmp_path):
    tokenizer = using(chat_tokenizer, LLAMA3)
    rows = [{"messages": conversation("What is 2 + 3?", "Five, because 2 + 3 = 5."), "answer": 5},
            {"messages": conversation("What is 1 + 1?", REPLY)}]
    prepared = prepare_chat(tokenizer, tmp_path, rows)
    assert prepared.summary.whole_assistant == 1
    assert "whole assistant reply is reasoning): 1" in prepared.summary.format()
    row = prepared.dataset[0]
    assert row["answer"] == "5"  # from the record's answer field: the reply has no <answer> tag
    assert supervised_text(tokenizer, row).startswith("Five, because 2 + 3 = 5.<|eot_id|><|endoftext|>")
    assert prompt_text(tokenizer, row).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_unknown_header_is_a_counted_bad_sample_never_an_all_ignored_one(chat_tokenizer, tmp_path):
    tokenizer = using(chat_tokenizer, ALPACA)
    good = {"question": "What is 2 + 3?", "reasoning": ["2 + 3 = 5."], "answer": "5"}
    rows = [good, {"messages": conversation("What is 2 + 3?", REPLY)}, good]
    prepared = prepare_chat(tokenizer, tmp_path, rows)
    assert prepared.summary.bad_counts == {"no_assistant_span": 1}
    assert "chat.jsonl:2: the assistant reply was found neither" in prepared.summary.bad_examples["no_assistant_span"]
    assert len(prepared.dataset) == 2
    assert all(any(label != -100 for label in labels) for labels in prepared.dataset["labels"])
    with pytest.raises(DataError, match="Most common kind: no_assistant_span.*--response_template"):
        prepare_chat(tokenizer, tmp_path, rows[1:2])
    rescued = prepare_chat(tokenizer, tmp_path, rows[1:2], response_template="### Response:\n")
    assert supervised_text(tokenizer, rescued.dataset[0]).startswith("2 + 3 = 5.")


def test_bad_rows_from_prepare_batch_have_no_labels(chat_tokenizer):
    tokenizer = using(chat_tokenizer, ALPACA)
    batch = {"messages": [conversation("q", REPLY)]}
    out = prepare_batch(batch, [0], Recipe(chunk_size=16, max_length=256), tokenizer)
    assert out["_bad_kind"] == ["no_assistant_span"] and out["labels"] == [[]]


def test_template_errors_and_malformed_messages(chat_tokenizer, tmp_path):
    tokenizer = using(chat_tokenizer, MISTRAL)
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": REPLY}]},
        {"messages": "not a list"},
        {"messages": conversation("q", f"{MARKER}\n   ")},
        {"messages": conversation("q", REPLY)},
    ]
    summary = prepare_chat(tokenizer, tmp_path, rows, max_bad_fraction=1.0).summary
    assert summary.bad_counts == {"no_assistant_span": 1, "missing_field": 1, "empty_reasoning": 1}
    assert "chat template failed: Conversation roles must alternate" in summary.bad_examples["no_assistant_span"]
    assert "must be a list of {role, content} messages" in summary.bad_examples["missing_field"]
    assert "the last assistant message has no reasoning" in summary.bad_examples["empty_reasoning"]
