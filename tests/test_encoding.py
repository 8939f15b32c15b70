"""User text that is not UTF-8 follows the bad-data policy; a UTF-8 byte-order mark is accepted. Offline, CPU.

Files are written as bytes: a record exported in Latin-1 (`caf\\xe9`) among UTF-8 ones, files that start with
the UTF-8 byte-order mark, a UTF-16 export. Every byte offset asserted is found in the bytes written.
"""

import codecs
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada_trm.data.dataset import DataArguments, prepare_dataset
from llada_trm.data.sources import DataError, TextEncodingError, read_utf8_lines
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
LATIN1_RECORD = b'{"question": "Le caf\xe9 co\xfbte 3 euros. Combien pour 2?", "reasoning": "3 * 2 = 6.", "answer": "6"}'


def good_lines(n: int) -> list[bytes]:
    return [json.dumps(r).encode() for r in generate_split("train", n, seed=1)]


def write_lines(path: Path, lines: list[bytes], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + b"".join(line + b"\n" for line in lines))
    return path


def prepare(tokenizer, tmp_path, path, **kwargs):
    args = DataArguments(dataset_name=str(path), cache_dir=str(tmp_path / "cache"), max_length=128, **kwargs)
    return prepare_dataset(args, tokenizer, 16, "train")


def one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------- the line reader

def test_lines_are_decoded_apart_with_the_file_offset_of_the_first_bad_byte():
    data = codecs.BOM_UTF8 + b"na\xc3\xafve\r\n" + b"ok \xff\xfe\n" + b"\xef\xbb\xbfkept\n" + b"cut \xe2\x82"
    lines = list(read_utf8_lines(io.BytesIO(data), "x"))
    assert [line.number for line in lines] == [1, 2, 3, 4]
    assert lines[0].text == "na\u00efve\r\n" and lines[0].bad_offset is None  # the BOM at the start is skipped
    assert (lines[1].bad_offset, lines[1].bad_byte) == (data.index(b"\xff"), 0xFF)
    assert lines[1].text == "ok \ufffd\ufffd\n"  # the structure around the bad bytes is kept
    assert lines[2].text == "\ufeffkept\n"  # a BOM after the start is text, as utf-8-sig decodes it
    assert (lines[3].bad_offset, lines[3].bad_byte) == (data.index(b"\xe2\x82"), 0xE2)  # a sequence cut by EOF
    assert lines[1].problem("x:2") == f"x:2: not UTF-8 text: byte 0xff at byte offset {lines[1].bad_offset}"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_utf16_or_utf32_file_is_one_error_naming_the_encoding(encoding, shipped_tokenizer, tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_bytes("\n".join(line.decode() for line in good_lines(3)).encode(encoding))  # with its BOM
    with pytest.raises(TextEncodingError) as caught:
        prepare(shipped_tokenizer, tmp_path, path)
    message = str(caught.value)
    assert str(path) in message and "byte offset 0" in message and "expected UTF-8" in message
    assert encoding.upper() in message


# ------------------------------------------------------------------------------------------- JSON lines

def test_a_line_that_is_not_utf8_is_one_bad_sample_with_file_line_and_offset(shipped_tokenizer, tmp_path):
    good = good_lines(6)
    path = write_lines(tmp_path / "export.jsonl", good[:3] + [LATIN1_RECORD] + good[3:])
    offset = path.read_bytes().index(b"\xe9")
    prepared = prepare(shipped_tokenizer, tmp_path, path)
    summary = prepared.summary
    assert (summary.total, summary.kept, summary.bad_counts) == (7, 6, {"bad_encoding": 1})
    assert summary.bad_examples["bad_encoding"] == f"{path}:4: not UTF-8 text: byte 0xe9 at byte offset {offset}"
    assert "bad_encoding 1" in summary.format()
    reference = prepare(shipped_tokenizer, tmp_path, write_lines(tmp_path / "good.jsonl", good))
    assert prepared.dataset["input_ids"] == reference.dataset["input_ids"]  # exactly the good records remain

    with pytest.raises(DataError) as caught:
        prepare(shipped_tokenizer, tmp_path, path, bad_sample_policy="error")
    message = str(caught.value)
    assert f"bad sample (bad_encoding) {path}:4: not UTF-8 text: byte 0xe9 at byte offset {offset}" in message
    assert "must be UTF-8" in message and "--bad_sample_policy skip" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_loads_the_same_records(suffix, shipped_tokenizer, tmp_path):
    good = good_lines(4)
    if suffix == ".json":  # one JSON document, an array
        plain = tmp_path / "plain.json"
        plain.write_bytes(b"[" + b",\n".join(good) + b"]\n")
        marked = tmp_path / "marked.json"
        marked.write_bytes(codecs.BOM_UTF8 + plain.read_bytes())
    else:
        plain = write_lines(tmp_path / "plain.jsonl", good)
        marked = write_lines(tmp_path / "marked.jsonl", good, prefix=codecs.BOM_UTF8)
    without, with_bom = prepare(shipped_tokenizer, tmp_path, plain), prepare(shipped_tokenizer, tmp_path, marked)
    assert with_bom.summary.bad == 0 and len(with_bom.dataset) == 4
    assert with_bom.dataset.to_dict() == without.dataset.to_dict()


def test_a_json_document_that_is_not_utf8_is_one_error_naming_file_line_and_offset(shipped_tokenizer, tmp_path):
    path = tmp_path / "doc.json"
    path.write_bytes(b"[\n" + b",\n".join(good_lines(2) + [LATIN1_RECORD]) + b"\n]\n")
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(TextEncodingError) as caught:  # the bad byte belongs to no record it could be cut into
        prepare(shipped_tokenizer, tmp_path, path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not UTF-8 text: byte 0xe9 at byte offset {offset} (line 4)")
    assert "must be UTF-8" in message


# ------------------------------------------------------------------------------------------- CSV

CSV_GOOD = b"question,reasoning,answer\nWhat is 1+1?,1 + 1 = 2.,2\nWhat is 2+3?,\"2 + 3 = 5.\nSo 5.\",5\n"


def test_a_csv_with_a_byte_order_mark_loads_the_same_records(shipped_tokenizer, tmp_path):
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_bytes(CSV_GOOD)
    marked.write_bytes(codecs.BOM_UTF8 + CSV_GOOD)
    without, with_bom = prepare(shipped_tokenizer, tmp_path, plain), prepare(shipped_tokenizer, tmp_path, marked)
    assert with_bom.summary.bad == 0 and with_bom.dataset["answer"] == ["2", "5"]  # 'question' found despite the BOM
    assert with_bom.dataset.to_dict() == without.dataset.to_dict()


def test_a_csv_row_that_is_not_utf8_is_skipped_alone_and_named_by_its_first_line(shipped_tokenizer, tmp_path):
    bad_row = b"Le caf\xe9?,\"3 * 2 = 6.\nDone.\",6\n"  # a quoted cell over two lines
    path = tmp_path / "export.csv"
    path.write_bytes(CSV_GOOD + bad_row + b"\nWhat is 4+4?,4 + 4 = 8.,8\n")  # and a blank line
    offset = path.read_bytes().index(b"\xe9")
    prepared = prepare(shipped_tokenizer, tmp_path, path)
    assert prepared.summary.bad_counts == {"bad_encoding": 1} and prepared.dataset["answer"] == ["2", "5", "8"]
    assert prepared.summary.bad_examples["bad_encoding"] == (
        f"{path}:5: not UTF-8 text: byte 0xe9 at byte offset {offset}")  # lines 2, 3-4 hold the good rows

    path.write_bytes(b"questi\xf3n,reasoning\n" + CSV_GOOD.split(b"\n", 1)[1])
    with pytest.raises(TextEncodingError, match=f"{path}:1: not UTF-8 text: byte 0xf3 at byte offset 6: the "
                                                f"header line"):
        prepare(shipped_tokenizer, tmp_path, path)


def test_csv_cells_stay_the_text_written(shipped_tokenizer, tmp_path):
    path = tmp_path / "answers.csv"
    path.write_bytes(b"question,reasoning,answer\nq1,1 + 6 = 7.,7\nq2,7 / 2 = 3.50,3.50\n"
                     b"q3,<answer>4</answer>,\nq4,too,many,cells\n")
    prepared = prepare(shipped_tokenizer, tmp_path, path, max_bad_fraction=1.0)
    assert prepared.dataset["answer"] == ["7", "3.50", "4"]  # no float column: not 7.0, 3.5
    assert prepared.summary.bad_examples["malformed_csv"] == f"{path}:5: 4 fields, the header names 3"


# ------------------------------------------------------------------------------------------- the programs

def train_args(backbone_dir, data, output_dir, *extra):
    return ["--model_name_or_path", str(backbone_dir), "--dataset_name", str(data), "--output_dir", str(output_dir),
            "--eval_split", "none", "--eval_max_samples", "0", "--batch_size", "2", "--max_steps", "2",
            "--max_recursive_steps", "2", "--min_recursive_steps", "1", "--head_hidden_size", "32",
            "--logging_steps", "1", "--max_length", "128", "--save_steps", "100", *extra]


def test_training_skips_the_bad_line_and_names_it(backbone_dir, tmp_path, capsys):
    good = good_lines(6)
    data = write_lines(tmp_path / "export.jsonl", good[:2] + [LATIN1_RECORD] + good[2:])
    offset = data.read_bytes().index(b"\xe9")
    out = tmp_path / "run"
    assert train_main(train_args(backbone_dir, data, out)) == 0
    printed = capsys.readouterr().out
    assert "data [train]: 7 records -> 6 samples, 1 skipped (bad_encoding 1)" in printed
    assert f"{data}:3: not UTF-8 text: byte 0xe9 at byte offset {offset}" in printed
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]


def test_training_with_the_strict_policy_exits_2_in_one_line_and_writes_nothing(backbone_dir, tmp_path):
    """As the issue ran it: the training script on a file exported in another encoding."""
    data = write_lines(tmp_path / "export.jsonl", good_lines(3) + [LATIN1_RECORD])
    offset = data.read_bytes().index(b"\xe9")
    out = tmp_path / "run"
    argv = train_args(backbone_dir, data, out, "--bad_sample_policy", "error")
    result = subprocess.run([sys.executable, str(REPO / "train_llada_trm_hybrid_sft.py"), *argv],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 2, result.stderr
    one_error_line(result.stderr, f"{data}:4: not UTF-8 text: byte 0xe9 at byte offset {offset}", "UTF-8")
    assert not out.exists() or not any(out.iterdir())


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"batch_size: 4\n# r\xe9glages\n")
    assert train_main(["--config", str(config), "--output_dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys.readouterr().err, f"{config}: not UTF-8 text: byte 0xe9 at byte offset 17 (line 2)")
    from llada_trm.training.arguments import parse_arguments

    config.write_bytes(codecs.BOM_UTF8 + b"batch_size: 4\n")
    assert parse_arguments(["--config", str(config)]).train.batch_size == 4


def test_evaluate_skips_the_bad_line_and_scores_the_rest(tmp_path, capsys):
    from llada_trm.evaluate import main

    data = write_lines(tmp_path / "eval.jsonl", good_lines(2) + [LATIN1_RECORD], prefix=codecs.BOM_UTF8)
    offset = data.read_bytes().index(b"\xe9")
    assert main(["--backbone", "tiny-llada", "--dataset_name", str(data), "--split", "train", "--max_length", "96",
                 "--max_new_tokens", "16", "--no_progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "3 records -> 2 samples, 1 skipped (bad_encoding 1)" in printed
    assert f"{data}:3: not UTF-8 text: byte 0xe9 at byte offset {offset}" in printed
    assert "exact match on 2 problems" in printed


def test_generate_chat_reads_stdin_as_utf8_and_skips_a_line_that_is_not(monkeypatch, capsys):
    from llada_trm.generate import main

    stdin = codecs.BOM_UTF8 + "Mia a 3 pommes, caf\u00e9.\n".encode() + b"Leo a 4 pi\xe8ces.\nAva has 2 books.\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="ascii"))  # not the locale's
    assert main(["--backbone", "tiny-llada", "--chat", "--max_length", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Answer: ") == 2
    offset = stdin.index(b"\xe8")
    assert f"skipped stdin line 2: not UTF-8 text: byte 0xe8 at byte offset {offset}" in captured.err
    assert "1 stdin line(s) skipped" in captured.err and "Traceback" not in captured.err
