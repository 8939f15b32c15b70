"""Data pipeline: arguments, sources, record shapes, the chunk layout, bad-data kinds and the summary. Offline."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import HfArgumentParser

from llada_trm.data.arguments import DataArgumentError, DataArguments
from llada_trm.data.dataset import layout_sample, prepare_dataset
from llada_trm.data.records import BadSample
from llada_trm.data.sources import DataError
from llada_trm.data.layout import MARKER, render_prompt, render_reasoning
from llada_trm.embedded.arithmetic_task import generate_split

C = 16


def write_jsonl(path, rows) -> str:
    """Rows are dicts (dumped) or raw strings (written as they are, e.g. a malformed line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def prepare(tokenizer, tmp_path, name, split="train", chunk_size=C, **kwargs):
    args = DataArguments(dataset_name=name, cache_dir=str(tmp_path / "cache"), **kwargs)
    return prepare_dataset(args, tokenizer, chunk_size, split)


def good_rows(n):
    return [dict(r) for r in generate_split("train", n, seed=1)]


def decode_reasoning(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


def decode_prompt(tokenizer, row):
    real_prompt = [t for t, a, label in zip(row["input_ids"], row["attention_mask"], row["labels"])
                   if a == 1 and label == -100]
    return tokenizer.decode(real_prompt)


# ------------------------------------------------------------------------------------------- arguments

@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_length=0), "--max_length must be positive, got 0"),
        (dict(bad_sample_policy="ignore"), "--bad_sample_policy must be error or skip, got 'ignore'"),
        (dict(max_bad_fraction=1.5), "--max_bad_fraction must be in \\[0, 1\\], got 1.5"),
        (dict(num_synthetic_train=0), "--num_synthetic_train must be positive, got 0"),
        (dict(max_samples=-1), "--max_samples must be positive, got -1"),
        (dict(preprocessing_num_workers=0), "--preprocessing_num_workers must be positive"),
        (dict(train_split="train[:x]"), "--train_split must be a split name"),
        (dict(dataset_name="org/set", dataset_path="data.jsonl"), "--dataset_path reads local files"),
    ],
)
def test_invalid_arguments_name_the_flag(overrides, message):
    with pytest.raises(DataArgumentError, match=message):
        DataArguments(**overrides).validate()


def test_arguments_parse_with_hf_argument_parser():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--dataset_name", "gsm8k", "--max_length", "256", "--eval_split", "none", "--max_samples", "10"]
    )
    assert (args.dataset_name, args.max_length, args.eval_split, args.max_samples) == ("gsm8k", 256, None, 10)
    (defaults,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses([])
    assert defaults == DataArguments()
    defaults.validate()


def test_chunk_size_and_max_length_checked(shipped_tokenizer):
    with pytest.raises(DataArgumentError, match="--chunk_size must be positive"):
        prepare_dataset(DataArguments(), shipped_tokenizer, 0, "train")
    with pytest.raises(DataArgumentError, match="--max_length \\(8\\) must hold at least one chunk of 16"):
        prepare_dataset(DataArguments(max_length=8), shipped_tokenizer, 16, "train")


# ---------------------------------------------------------------------------------------------- layout

def test_layout_worked_example():
    sample = layout_sample([7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25], chunk_size=4, max_length=64,
                           pad_token_id=1, eos_token_id=1)
    assert sample["input_ids"] == [1, 1, 1, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 1, 1]
    assert sample["attention_mask"] == [0, 0, 0] + [1] * 13
    assert sample["labels"] == [-100] * 8 + [20, 21, 22, 23, 24, 25, 1, 1]
    assert sample["chunk_index"] == [-1] * 8 + [0, 0, 0, 0, 1, 1, 1, 1]
    assert (sample["num_chunks"], sample["prompt_length"], sample["truncated"]) == (2, 5, False)


def test_layout_eos_opens_a_new_chunk_when_reasoning_fills_the_last_one():
    sample = layout_sample([7] * 4, [20] * 8, chunk_size=4, max_length=64, pad_token_id=0, eos_token_id=1)
    assert sample["labels"][4:] == [20] * 8 + [1] * 4 and sample["num_chunks"] == 3


def test_layout_truncation_drops_whole_trailing_chunks_and_the_eos():
    sample = layout_sample([7] * 5, list(range(20, 40)), chunk_size=4, max_length=18, pad_token_id=0, eos_token_id=1)
    # budget = 16 (whole chunks) - 8 (padded prompt) = 8 reasoning tokens; no EOS after a cut
    assert sample["labels"][8:] == list(range(20, 28)) and len(sample["input_ids"]) == 16
    assert sample["truncated"] and sample["num_chunks"] == 2
    exact = layout_sample([7] * 4, [20] * 7, chunk_size=4, max_length=12, pad_token_id=0, eos_token_id=1)
    assert not exact["truncated"] and exact["labels"][4:] == [20] * 7 + [1]
    eos_lost = layout_sample([7] * 4, [20] * 8, chunk_size=4, max_length=12, pad_token_id=0, eos_token_id=1)
    assert eos_lost["truncated"] and eos_lost["labels"][4:] == [20] * 8


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 70), st.integers(1, 90), st.sampled_from([1, 2, 3, 4, 8, 16]), st.integers(1, 160))
def test_layout_properties(prompt_len, reasoning_len, chunk_size, max_length):
    prompt, reasoning = list(range(100, 100 + prompt_len)), list(range(500, 500 + reasoning_len))
    padded_prompt = -(-prompt_len // chunk_size) * chunk_size
    try:
        sample = layout_sample(prompt, reasoning, chunk_size=chunk_size, max_length=max_length,
                               pad_token_id=0, eos_token_id=1)
    except BadSample as bad:
        assert bad.kind == "prompt_too_long" and padded_prompt + chunk_size > max_length
        return
    ids, labels, n = sample["input_ids"], sample["labels"], len(sample["input_ids"])
    assert n % chunk_size == 0 and n <= max_length and sample["num_chunks"] >= 1
    assert ids[padded_prompt - prompt_len : padded_prompt] == prompt  # reasoning starts on a chunk boundary
    assert labels[:padded_prompt] == [-100] * padded_prompt and -100 not in labels[padded_prompt:]
    assert labels[padded_prompt:] == ids[padded_prompt:]
    body = ids[padded_prompt:]
    assert body[: min(reasoning_len, len(body))] == reasoning[: len(body)]
    if sample["truncated"]:
        assert len(body) < reasoning_len + 1 and 1 not in body  # no EOS after a cut
    else:
        eos_run = len(body) - reasoning_len
        assert 1 <= eos_run <= chunk_size and body[reasoning_len:] == [1] * eos_run
    assert sample["chunk_index"] == [-1] * padded_prompt + [i // chunk_size for i in range(len(body))]


def test_layout_prompt_too_long():
    with pytest.raises(BadSample) as caught:
        layout_sample([7] * 13, [20], chunk_size=4, max_length=16, pad_token_id=0, eos_token_id=1)
    assert caught.value.kind == "prompt_too_long"
    assert "prompt of 13 tokens (16 padded to chunk_size 4) leaves no room for one chunk in --max_length 16" \
        in caught.value.message


# -------------------------------------------------------------------------------------- synthetic default

@pytest.fixture(scope="module")
def synthetic_train(shipped_tokenizer):
    return prepare_dataset(DataArguments(num_synthetic_train=40), shipped_tokenizer, C, "train")


def test_synthetic_default_prepares_offline(synthetic_train, shipped_tokenizer):
    data, summary = synthetic_train.dataset, synthetic_train.summary
    assert len(data) == summary.kept == summary.total == 40 and summary.bad == 0
    assert data["sample_id"] == list(range(40))
    assert set(data.column_names) == {"input_ids", "attention_mask", "labels", "chunk_index", "num_chunks",
                                      "prompt_length", "sample_id", "answer", "truncated"}
    records = generate_split("train", 40, seed=0)
    eos = shipped_tokenizer.eos_token_id
    supervised = total = 0
    for row, record in zip(data, records):
        n = len(row["input_ids"])
        start = row["chunk_index"].index(0)
        assert n % C == 0 and start % C == 0 and n == start + row["num_chunks"] * C
        assert row["attention_mask"].count(0) == start - row["prompt_length"]
        assert all(label == -100 for label in row["labels"][:start])
        assert row["labels"][start:] == row["input_ids"][start:]
        assert row["chunk_index"][start:] == [i // C for i in range(n - start)]
        assert row["input_ids"][start - row["prompt_length"]] == shipped_tokenizer.bos_token_id
        assert decode_prompt(shipped_tokenizer, row).endswith(MARKER + "\n")
        reasoning = render_reasoning(record["reasoning"], record["answer"])
        body = row["input_ids"][start:]
        text_end = len(body) - body[::-1].index(next(t for t in body[::-1] if t != eos))
        assert shipped_tokenizer.decode(body[:text_end]) == reasoning
        assert body[text_end] == eos and set(body[text_end:]) == {eos}
        assert row["answer"] == record["answer"] and not row["truncated"]
        # prompt and reasoning tokenised apart give the same ids as the whole text tokenised at once
        joint = shipped_tokenizer(render_prompt(record["question"]) + reasoning, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][start - row["prompt_length"] + 1 : start + text_end] == joint
        supervised += n - start
        total += n
    assert summary.supervised_tokens == supervised and summary.total_tokens == total
    assert summary.supervised_fraction == pytest.approx(supervised / total)
    assert summary.mean_reasoning_chunks == pytest.approx(sum(data["num_chunks"]) / 40)


def test_summary_is_one_text(synthetic_train):
    text = synthetic_train.summary.format()
    assert "data [train]: 40 records -> 40 samples, 0 skipped" in text
    assert "mean reasoning chunks:" in text and "supervised tokens:" in text


def test_synthetic_splits_and_slices(shipped_tokenizer, tmp_path):
    validation = prepare(shipped_tokenizer, tmp_path, "synthetic", split="validation", num_synthetic_eval=12)
    assert len(validation.dataset) == 12
    sliced = prepare(shipped_tokenizer, tmp_path, "synthetic", split="train[:25%]", num_synthetic_train=40)
    assert len(sliced.dataset) == 10
    tail = prepare(shipped_tokenizer, tmp_path, "synthetic", split="train[-3:]", num_synthetic_train=40, max_samples=2)
    assert len(tail.dataset) == 2 and tail.dataset["sample_id"] == [0, 1]
    with pytest.raises(DataError, match="synthetic data set has splits"):
        prepare(shipped_tokenizer, tmp_path, "synthetic", split="dev")


def test_truncation_counted(shipped_tokenizer, tmp_path):
    prepared = prepare(shipped_tokenizer, tmp_path, "synthetic", num_synthetic_train=30, max_length=96)
    summary = prepared.summary
    assert summary.truncated == sum(prepared.dataset["truncated"]) > 0
    assert all(len(ids) <= 96 for ids in prepared.dataset["input_ids"])
    assert f"truncated at --max_length 96: {summary.truncated}" in summary.format()


# ------------------------------------------------------------------------------------------ record shapes

def test_text_records_split_at_the_first_marker(shipped_tokenizer, tmp_path):
    text = f"Question: 2+2?\n\n{MARKER}\nTwo plus two.\nI repeat: {MARKER}\n<answer>4</answer>"
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": text}])
    row = prepare(shipped_tokenizer, tmp_path, path).dataset[0]
    assert decode_prompt(shipped_tokenizer, row) == f"<|startoftext|>Question: 2+2?\n\n{MARKER}\n"
    assert decode_reasoning(shipped_tokenizer, row).startswith(f"Two plus two.\nI repeat: {MARKER}\n<answer>4</answer>")
    assert row["answer"] == "4"


def test_question_records_with_custom_fields_and_string_reasoning(shipped_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "What is 3 * 3?", "steps": "3 * 3 = 9.\n\n", "final": 9},
                                             {"q": "What is 3 - 3?", "steps": ["3 - 3 = 0."], "final": 0}])
    prepared = prepare(shipped_tokenizer, tmp_path, path, question_field="q", reasoning_field="steps",
                       answer_field="final")
    row = prepared.dataset[0]
    assert decode_reasoning(shipped_tokenizer, row).startswith("3 * 3 = 9.\n<answer>9</answer><|endoftext|>")
    assert row["answer"] == "9" and prepared.dataset[1]["answer"] == "0"
    no_answer = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "reasoning": ["a", "<answer>x</answer>"]}])
    assert prepare(shipped_tokenizer, tmp_path, no_answer).dataset[0]["answer"] == "x"


def test_pretokenised_records(shipped_tokenizer, tmp_path):
    eos, vocab = shipped_tokenizer.eos_token_id, len(shipped_tokenizer)
    rows = [
        {"input_ids": [5, 6, 7, 30, 31, eos, eos], "labels": [-100, -100, -100, 30, 31, eos, eos]},
        {"input_ids": [5, 6, 30, 31, 32], "prompt_length": 2},
        {"input_ids": [5, 6, 30], "labels": [-100, 30]},
        {"input_ids": [5, 6, vocab], "prompt_length": 1},
        {"input_ids": [5, 6, 30, 31], "labels": [-100, -100, 31, 32]},
        {"input_ids": [5, 6, 30], "prompt_length": 9},
    ]
    path = write_jsonl(tmp_path / "tok.jsonl", rows)
    prepared = prepare(shipped_tokenizer, tmp_path, path, max_bad_fraction=1.0)
    first, second = prepared.dataset[0], prepared.dataset[1]
    assert first["input_ids"] == [eos] * 13 + [5, 6, 7] + [30, 31] + [eos] * 14
    assert first["labels"][16:] == [30, 31] + [eos] * 14 and first["prompt_length"] == 3
    assert second["labels"][16:19] == [30, 31, 32]
    summary = prepared.summary
    assert summary.bad_counts == {"invalid_tokens": 4}
    examples = summary.bad_examples["invalid_tokens"]
    assert "tok.jsonl:3: labels and input_ids differ in length" in examples


def test_pretokenised_error_messages(shipped_tokenizer, tmp_path):
    cases = [
        ({"input_ids": [5, 6, len(shipped_tokenizer)], "prompt_length": 1}, "input_ids must be token ids in"),
        ({"input_ids": [5, 6, 30, 31], "labels": [-100, -100, 31, 32]}, "labels must equal input_ids"),
        ({"input_ids": [5, 6, 30], "prompt_length": 9}, "prompt_length must be in \\[0, 3\\]"),
        ({"input_ids": [5, 6, 30]}, "need 'labels' or 'prompt_length'"),
        ({"input_ids": [5, 1, 1], "prompt_length": 1}, "no supervised tokens besides EOS"),
        ({"input_ids": [5, 30, shipped_tokenizer.mask_token_id], "prompt_length": 1}, "contains the mask token"),
        ({"question": "q", "reasoning": "a <|mdm_mask|> b"}, "contains the mask token '<\\|mdm_mask\\|>'"),
    ]
    for i, (row, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [row])
        with pytest.raises(DataError, match=message):
            prepare(shipped_tokenizer, tmp_path, path, bad_sample_policy="error")


# ----------------------------------------------------------------------------------------------- bad data

BAD_ROWS = {
    "malformed_json": '{"question": "broken", "reasoning": ["x"]',
    "missing_field": {"question": "where is the reasoning?"},
    "empty_reasoning": {"question": "q", "reasoning": ["", "  "], "answer": "1"},
    "no_marker": {"text": "Question: no marker in this text"},
    "no_assistant_span": {"messages": [{"role": "user", "content": "hi"}]},
    "prompt_too_long": {"question": "long " * 200, "reasoning": ["a"], "answer": "1"},
    "invalid_tokens": {"input_ids": [1, 2, 10**6], "prompt_length": 1},
}
BAD_MESSAGES = {
    "malformed_json": "mixed.jsonl:3: malformed JSON (",
    "missing_field": "mixed.jsonl:4: missing field 'reasoning' (record has: question)",
    "empty_reasoning": "mixed.jsonl:5: field 'reasoning' is empty",
    "no_marker": "mixed.jsonl:6: field 'text' does not contain the marker",
    "no_assistant_span": "mixed.jsonl:7: no message with role 'assistant'",
    "prompt_too_long": "mixed.jsonl:8: prompt of",
    "invalid_tokens": "mixed.jsonl:9: input_ids must be token ids",
}


def mixed_file(tmp_path) -> str:
    """2 good rows, one bad row of every kind (lines 3..9), 6 more good rows."""
    rows = good_rows(8)
    return write_jsonl(tmp_path / "mixed.jsonl", rows[:2] + list(BAD_ROWS.values()) + rows[2:])


def test_every_bad_kind_is_counted_with_its_message(shipped_tokenizer, tmp_path):
    prepared = prepare(shipped_tokenizer, tmp_path, mixed_file(tmp_path), max_length=128)
    summary = prepared.summary
    assert summary.bad_counts == dict.fromkeys(BAD_ROWS, 1)
    assert (summary.total, summary.kept, len(prepared.dataset)) == (15, 8, 8)
    for kind, message in BAD_MESSAGES.items():
        assert message in summary.bad_examples[kind], (kind, summary.bad_examples[kind])
        assert f"{kind} 1" in summary.format()
    assert all(any(label != -100 for label in labels) for labels in prepared.dataset["labels"])
    assert prepared.dataset["sample_id"] == list(range(8))


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_error_policy_stops_at_the_first_bad_sample(shipped_tokenizer, tmp_path, kind):
    rows = good_rows(2)
    path = write_jsonl(tmp_path / "mixed.jsonl", rows + [BAD_ROWS[kind]] + rows)
    with pytest.raises(DataError) as caught:
        prepare(shipped_tokenizer, tmp_path, path, max_length=128, bad_sample_policy="error")
    message = str(caught.value)
    assert f"bad sample ({kind})" in message and "--bad_sample_policy skip" in message
    assert re.sub(r"mixed.jsonl:\d+", "mixed.jsonl:3", BAD_MESSAGES[kind]) in message  # the bad row is line 3


def test_too_many_bad_samples_name_the_most_common_kind(shipped_tokenizer, tmp_path):
    rows = good_rows(3) + [{"text": "no marker"}] * 3 + [{"question": "q"}] * 2
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        prepare(shipped_tokenizer, tmp_path, path)
    message = str(caught.value)
    assert "5 of 8 records in split 'train' are bad (62% > --max_bad_fraction 0.5)" in message
    assert "Most common kind: no_marker (3), e.g. " in message and "bad.jsonl:4:" in message
    assert len(prepare(shipped_tokenizer, tmp_path, path, max_bad_fraction=0.7).dataset) == 3


def test_nothing_left_is_an_error(shipped_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no marker"}])
    with pytest.raises(DataError, match="no usable sample in split 'train' \\(1 records, all bad\\).*no_marker"):
        prepare(shipped_tokenizer, tmp_path, path, max_bad_fraction=1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        prepare(shipped_tokenizer, tmp_path, str(empty))


def test_malformed_json_document(shipped_tokenizer, tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n  {"question": "q",\n  "reasoning": ]\n')
    with pytest.raises(DataError, match="doc.json:3: malformed JSON"):
        prepare(shipped_tokenizer, tmp_path, str(path))
    line = write_jsonl(tmp_path / "list.jsonl", good_rows(2) + ["[1, 2]"])
    summary = prepare(shipped_tokenizer, tmp_path, line).summary
    assert "list.jsonl:3: expected a JSON object, got list" in summary.bad_examples["malformed_json"]


# ---------------------------------------------------------------------------------------- sources, aliases

def test_json_array_and_csv_files(shipped_tokenizer, tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps(good_rows(3)))
    assert len(prepare(shipped_tokenizer, tmp_path, str(array)).dataset) == 3
    csv = tmp_path / "data.csv"
    csv.write_text("question,reasoning,answer\nWhat is 1+1?,1 + 1 = 2.,2\nWhat is 2+3?,2 + 3 = 5.,5\n")
    prepared = prepare(shipped_tokenizer, tmp_path, str(csv))
    assert prepared.dataset["answer"] == ["2", "5"]
    assert decode_reasoning(shipped_tokenizer, prepared.dataset[1]).startswith("2 + 3 = 5.\n<answer>5</answer>")


def test_directory_splits(shipped_tokenizer, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "train.jsonl", good_rows(4))
    write_jsonl(root / "dev.jsonl", good_rows(2))
    assert len(prepare(shipped_tokenizer, tmp_path, str(root)).dataset) == 4
    assert len(prepare(shipped_tokenizer, tmp_path, str(root), split="validation").dataset) == 2
    with pytest.raises(DataError, match="no file for split 'test'"):
        prepare(shipped_tokenizer, tmp_path, str(root), split="test")
    write_jsonl(root / "more.jsonl", good_rows(1))
    with pytest.raises(DataError, match="cannot tell the split of more.jsonl"):
        prepare(shipped_tokenizer, tmp_path, str(root))
    (root / "extra.csv").write_text("question,reasoning\n")
    with pytest.raises(DataError, match="keep one format per directory"):
        prepare(shipped_tokenizer, tmp_path, str(root))
    only_train = tmp_path / "parts"
    only_train.mkdir()
    write_jsonl(only_train / "part-0.jsonl", good_rows(2))
    write_jsonl(only_train / "part-1.jsonl", good_rows(3))
    assert len(prepare(shipped_tokenizer, tmp_path, str(only_train)).dataset) == 5


def test_single_file_is_the_train_split(shipped_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", good_rows(10))
    with pytest.raises(DataError, match="only a train split.*--eval_split 'train\\[95%:\\]'"):
        prepare(shipped_tokenizer, tmp_path, path, split="validation")
    assert len(prepare(shipped_tokenizer, tmp_path, path, split="train[80%:]").dataset) == 2
    with pytest.raises(DataError, match="no such file or directory"):
        prepare(shipped_tokenizer, tmp_path, str(tmp_path / "missing.jsonl"))


def test_gsm8k_schema_with_alias_mapping(shipped_tokenizer, tmp_path):
    rows = [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"},
        {"question": "Q without final?", "answer": "Some reasoning only."},
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    prepared = prepare(shipped_tokenizer, tmp_path, "gsm8k", dataset_path=path)
    first = prepared.dataset[0]
    assert first["answer"] == "72"
    assert decode_prompt(shipped_tokenizer, first) == "<|startoftext|>" + render_prompt(rows[0]["question"])
    assert decode_reasoning(shipped_tokenizer, first).startswith(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
        "in April and May.\n<answer>72</answer><|endoftext|>")
    assert prepared.dataset[1]["answer"] == ""
    # without the alias mapping the same file lacks a reasoning field
    with pytest.raises(DataError, match="missing_field"):
        prepare(shipped_tokenizer, tmp_path, path)


def test_natural_reasoning_schema_with_alias_mapping(shipped_tokenizer, tmp_path):
    import datasets

    rows = [
        {"question": "Why is the sky blue?", "reference_answer": "Rayleigh scattering",
         "responses": [{"response": "Short wavelengths scatter more.\n\nSo blue dominates.", "response_model": "m"}]},
        {"question": "Missing responses", "reference_answer": "x", "responses": []},
    ]
    path = str(tmp_path / "nr.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    prepared = prepare(shipped_tokenizer, tmp_path, "natural_reasoning", dataset_path=path, max_bad_fraction=0.5)
    row = prepared.dataset[0]
    assert row["answer"] == "Rayleigh scattering"
    assert decode_reasoning(shipped_tokenizer, row).startswith(
        "Short wavelengths scatter more.\nSo blue dominates.\n<answer>Rayleigh scattering</answer>")
    assert "missing field 'responses[0].response'" in prepared.summary.bad_examples["missing_field"]


def test_hub_names_offline_give_a_clear_error(shipped_tokenizer, tmp_path, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):  # never touch the network in tests
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("gsm8k", "natural_reasoning", "some-org/some-dataset"):
        with pytest.raises(DataError) as caught:
            prepare(shipped_tokenizer, tmp_path, name)
        message = str(caught.value)
        assert "cannot be downloaded offline" in message and "--dataset_name synthetic" in message
        assert "--dataset_path" in message
    # online, but the connection fails: the same advice
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError, match="'openai/gsm8k' cannot be downloaded offline"):
        prepare(shipped_tokenizer, tmp_path, "gsm8k")


def test_hub_errors_other_than_connection_are_reported(shipped_tokenizer, tmp_path, monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'x/y' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError, match="could not load dataset 'x/y'.*doesn't exist"):
        prepare(shipped_tokenizer, tmp_path, "x/y")
