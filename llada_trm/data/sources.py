"""Where reasoning records come from: the synthetic set, local files, or the Hub (with an offline check).

Local JSON, JSON-lines and CSV files are read here, not by `datasets`, so that a malformed line or a line
that is not UTF-8 becomes one bad sample that names its file, line and byte offset instead of an exception
for the whole file. Text is decoded as UTF-8 one line at a time (`read_utf8_lines`; a UTF-8 byte-order mark
at the start of a file is skipped), the one reader of user text files: `generate --chat` and `--config` use
it too. A split may be sliced (`train[:95%]`, `train[-200:]`) for every source.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import datasets

from llada_trm.data.arguments import ALIAS_HUB_NAMES, DataArguments, parse_split
from llada_trm.embedded.arithmetic_task import SPLITS as SYNTHETIC_SPLITS
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.env_flags import env_flag

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_WORDS = {"train": {"train"}, "validation": {"validation", "valid", "val", "dev", "eval"}, "test": {"test"}}


class DataError(ValueError):
    """The data cannot be trained on as configured; the message says why and what to change."""


# ------------------------------------------------------------------------------------- UTF-8 text, line by line

REENCODE_HINT = "save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8 OLD > NEW)"
OTHER_UNICODE_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",  # UTF-32 LE starts as UTF-16 LE
                      codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}


class TextEncodingError(DataError):
    """A whole text file (or stream) that cannot be read as UTF-8: names it, the byte offset and the encoding."""


@dataclass(frozen=True)
class TextLine:
    """One line of a user text file: its text, or where it stops being UTF-8."""

    number: int  # 1-based
    text: str  # the line with its line end; undecodable bytes shown as U+FFFD where `bad_offset` is set
    bad_offset: int | None = None  # byte offset in the file of the first byte that is not UTF-8
    bad_byte: int | None = None

    def problem(self, source: str) -> str:
        """`source: not UTF-8 text: byte 0x.. at byte offset N`, for a line with `bad_offset` set."""
        return f"{source}: not UTF-8 text: byte 0x{self.bad_byte:02x} at byte offset {self.bad_offset}"


def _check_not_other_unicode(head: bytes, name: str) -> None:
    for bom, encoding in OTHER_UNICODE_BOMS.items():
        if head.startswith(bom):
            raise TextEncodingError(f"{name}: starts with a {encoding} byte-order mark (byte offset 0): the text is "
                                    f"{encoding}, expected UTF-8; {REENCODE_HINT.replace('cp1252', encoding)}")


def read_utf8_lines(stream: BinaryIO, name: str) -> Iterator[TextLine]:
    """The lines of a binary stream (ending at b"\\n"), each decoded as UTF-8 on its own.

    A UTF-8 byte-order mark is skipped at the start only (`utf-8-sig` semantics); a UTF-16/32 one is a
    TextEncodingError. A line that is not UTF-8 is yielded with its first bad byte's offset, so the caller
    applies its bad-data policy to that line alone (no UTF-8 sequence holds a newline byte, so lines decode
    apart exactly).
    """
    offset = 0
    for number, raw in enumerate(iter(stream.readline, b""), start=1):
        start = 0
        if number == 1:
            _check_not_other_unicode(raw, name)
            start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        try:
            yield TextLine(number, raw[start:].decode("utf-8"))
        except UnicodeDecodeError as error:
            bad = start + error.start
            yield TextLine(number, raw[start:].decode("utf-8", errors="replace"), offset + bad, raw[bad])
        offset += len(raw)


def read_utf8_text(path: str | Path) -> str:
    """A whole user text file (a config, a JSON document) as UTF-8, BOM skipped; else one TextEncodingError."""
    with open(path, "rb") as stream:
        lines = list(read_utf8_lines(stream, str(path)))
    bad = next((line for line in lines if line.bad_offset is not None), None)
    if bad is not None:
        raise TextEncodingError(f"{bad.problem(str(path))} (line {bad.number}); the file must be UTF-8: "
                                f"{REENCODE_HINT}")
    return "".join(line.text for line in lines)


def load_records(args: DataArguments, split: str) -> tuple[datasets.Dataset, str | None]:
    """The raw records of `split` (a name, optionally sliced) and the alias whose field mapping applies."""
    match = parse_split(split)
    name = match["name"]
    alias = args.dataset_name if args.dataset_name in ALIAS_HUB_NAMES else None
    if args.dataset_path:
        raw = _load_local(args.dataset_path, name, args.cache_dir)
    elif args.dataset_name == "synthetic":
        raw = _load_synthetic(name, args)
    elif alias:
        raw = _load_hub(*ALIAS_HUB_NAMES[alias], name, args.cache_dir)
    elif _looks_like_path(args.dataset_name):
        raw = _load_local(args.dataset_name, name, args.cache_dir)
    else:
        raw = _load_hub(args.dataset_name, args.dataset_config, name, args.cache_dir)
    rows = range(len(raw))[_bound(match["start"], len(raw)) : _bound(match["stop"], len(raw))]
    if args.max_samples is not None:
        rows = rows[: args.max_samples]
    return (raw if rows == range(len(raw)) else raw.select(rows)), alias


def _bound(spec: str | None, n: int) -> int | None:
    if spec is None:
        return None
    return round(n * int(spec[:-1]) / 100) if spec.endswith("%") else int(spec)


def _load_synthetic(split: str, args: DataArguments) -> datasets.Dataset:
    if split not in SYNTHETIC_SPLITS:
        raise DataError(f"the synthetic data set has splits {sorted(SYNTHETIC_SPLITS)}, not {split!r}")
    num = args.num_synthetic_train if split == "train" else args.num_synthetic_eval
    return datasets.Dataset.from_list(generate_split(split, num, seed=0))


def _looks_like_path(name: str) -> bool:
    if Path(name).expanduser().exists():
        return True
    return name.endswith(tuple(LOCAL_EXTENSIONS)) or name.startswith((".", "/", "~"))


def _is_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE") or bool(datasets.config.HF_HUB_OFFLINE)


def _is_connection_failure(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or "Connect" in type(error).__name__:
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_hub(name: str, config: str | None, split: str, cache_dir: str | None) -> datasets.Dataset:
    """A Hub dataset; offline it may still come from the local cache, otherwise a DataError says what to do."""
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as error:
        if _is_offline() or _is_connection_failure(error):
            raise DataError(
                f"dataset {name!r} cannot be downloaded offline (HF_HUB_OFFLINE is set or the Hub is unreachable) "
                f"and is not in the local cache. Use local files (--dataset_name path/to/data.jsonl, or "
                f"--dataset_name gsm8k|natural_reasoning --dataset_path FILE) or the embedded data "
                f"(--dataset_name synthetic). Cause: {error}") from error
        raise DataError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {error}") from error


def _load_local(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"local data {path!r}: no such file or directory")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in LOCAL_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no {'/'.join(LOCAL_EXTENSIONS)} files found")
    formats = {LOCAL_EXTENSIONS.get(f.suffix) for f in files}
    if None in formats:
        raise DataError(f"{path}: unsupported file type; use {', '.join(LOCAL_EXTENSIONS)}")
    if len(formats) > 1:
        raise DataError(f"{path}: mixes {sorted(formats)} files; keep one format per directory")
    files = _files_of_split(root, files, split)
    if formats == {"json"}:
        return _dataset_of([row for file in files for row in _json_rows(file)])
    if formats == {"csv"}:
        return _dataset_of([row for file in files for row in _csv_rows(file)])
    data_files = [str(f) for f in files]
    return datasets.load_dataset(formats.pop(), data_files=data_files, split="train", cache_dir=cache_dir)


def _files_of_split(root: Path, files: list[Path], split: str) -> list[Path]:
    """A single file is the train split; in a directory, file/folder names say the split (else all are train)."""
    if root.is_file():
        if split != "train":
            raise DataError(f"{root} is a single file, i.e. only a train split; asked for {split!r}. Slice it "
                            f"(--train_split 'train[:95%]' --eval_split 'train[95%:]'), pass a directory with "
                            f"train/validation files, or disable evaluation (--eval_split none)")
        return files

    def split_of(file: Path) -> str | None:
        words = set(re.split(r"[^a-z]+", str(file.relative_to(root).with_suffix("")).lower()))
        return next((name for name, keys in SPLIT_WORDS.items() if words & keys), None)

    named = {f: split_of(f) for f in files}
    if all(s is None for s in named.values()):
        named = dict.fromkeys(files, "train")
    unnamed = [f.name for f, s in named.items() if s is None]
    if unnamed:
        raise DataError(f"{root}: cannot tell the split of {', '.join(unnamed)}; name files after their split "
                        f"(train, validation/valid/val/dev/eval, test) or keep only training files")
    chosen = [f for f, s in named.items() if s == split]
    if not chosen:
        raise DataError(f"{root}: no file for split {split!r} (found: {', '.join(f.name for f in files)})")
    return chosen


# Rows of the local text formats. Besides the record they carry `__source__` ('file:line', or 'file[i]' for an
# item of a JSON array) and, for a row the reader could not read, `__bad_kind__`/`__bad_message__`: the bad-data
# policy is applied to it with the others when records are parsed (data/records.py, `raw_record`).

def _unreadable(kind: str, message: str) -> dict:
    return {"__bad_kind__": kind, "__bad_message__": message}


_READABLE = {"__bad_kind__": "", "__bad_message__": ""}


def _dataset_of(rows: list[dict]) -> datasets.Dataset:
    """Rows as a Dataset with the union of their columns (files of one directory may differ in columns)."""
    columns = dict.fromkeys(key for row in rows for key in row)
    return datasets.Dataset.from_dict({key: [row.get(key) for row in rows] for key in columns})


def _json_rows(file: Path) -> Iterator[dict]:
    """A JSON document's items, or a JSON-lines file's lines, as raw texts parsed later (one bad line, one bad
    sample). A document that is not UTF-8 cannot be cut into records: it is a TextEncodingError."""
    if file.suffix == ".json" and file.read_bytes().removeprefix(codecs.BOM_UTF8).lstrip()[:1] in (b"[", b"{"):
        content = read_utf8_text(file)
        try:
            loaded = json.loads(content)
        except json.JSONDecodeError as error:  # one broken document: the whole file is one bad sample
            yield {"__json__": content, "__source__": f"{file}:{error.lineno}", **_READABLE}
            return
        for i, item in enumerate(loaded if isinstance(loaded, list) else [loaded]):
            yield {"__json__": json.dumps(item), "__source__": f"{file}[{i}]", **_READABLE}
        return
    with open(file, "rb") as stream:
        for line in read_utf8_lines(stream, str(file)):
            source = f"{file}:{line.number}"
            if line.bad_offset is not None:
                yield {"__json__": "", "__source__": source, **_unreadable("bad_encoding", line.problem(source))}
            elif line.text.strip():
                yield {"__json__": line.text, "__source__": source, **_READABLE}


def _csv_rows(file: Path) -> Iterator[dict]:
    """The records of a CSV file with a header line, cells kept as the text written ('' is a missing value).

    Read with Python's csv module rather than pandas: a row can then be named by its line, a line that is not
    UTF-8 skips only its own row, and a cell such as `7` or `3.50` stays that text (pandas turns an answer
    column with one empty cell into floats: `7.0`). Lines that are not UTF-8 are parsed with U+FFFD in place of
    the bad bytes (ASCII quotes and commas are never part of a multi-byte sequence, so the row structure holds),
    then the rows they touch are marked `bad_encoding`.
    """
    bad_lines: dict[int, str] = {}

    def texts(stream) -> Iterator[str]:
        for line in read_utf8_lines(stream, str(file)):
            if line.bad_offset is not None:
                bad_lines[line.number] = line.problem(f"{file}:{line.number}")
            yield line.text

    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # the default 128 KiB is short for a reasoning
    with open(file, "rb") as stream:
        reader = csv.reader(texts(stream))
        try:
            header = next(reader, None)
            if header is None:
                return
            if bad_lines:
                raise TextEncodingError(f"{bad_lines[min(bad_lines)]}: the header line names the columns, so the "
                                        f"file cannot be read; it must be UTF-8: {REENCODE_HINT}")
            first_line = reader.line_num + 1
            for cells in reader:
                lines = range(first_line, reader.line_num + 1)
                source, first_line = f"{file}:{lines[0]}", reader.line_num + 1
                if not cells:
                    continue  # a blank line
                row = dict(zip(header, (cell if cell != "" else None for cell in cells)))
                row.update(dict.fromkeys(header[len(cells):]), __source__=source, **_READABLE)
                bad = next((bad_lines[n] for n in lines if n in bad_lines), None)
                if bad is not None:
                    row.update(_unreadable("bad_encoding", bad))
                elif len(cells) > len(header):
                    row.update(_unreadable("malformed_csv", f"{source}: {len(cells)} fields, the header names "
                                                            f"{len(header)}"))
                yield row
        except csv.Error as error:
            raise DataError(f"{file}:{reader.line_num}: not readable as CSV ({error})") from None
