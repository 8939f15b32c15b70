"""Where reasoning records come from: the synthetic set, local files, or the Hub (with an offline check).

Local JSON and JSON-lines files are read line by line here, not by `datasets`, so that a malformed line
becomes one bad sample that names its file and line instead of an exception for the whole file. A split may
be sliced (`train[:95%]`, `train[-200:]`) for every source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from llada_trm.data.arguments import ALIAS_HUB_NAMES, DataArguments, parse_split
from llada_trm.embedded.arithmetic_task import SPLITS as SYNTHETIC_SPLITS
from llada_trm.embedded.arithmetic_task import generate_split
from llada_trm.env_flags import env_flag

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_WORDS = {"train": {"train"}, "validation": {"validation", "valid", "val", "dev", "eval"}, "test": {"test"}}


class DataError(ValueError):
    """The data cannot be trained on as configured; the message says why and what to change."""


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
        texts, sources = _read_json_files(files)
        return datasets.Dataset.from_dict({"__json__": texts, "__source__": sources})
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


def _read_json_files(files: list[Path]) -> tuple[list[str], list[str]]:
    """Raw JSON texts with their 'file:line' source; parsed later so a malformed line is one bad sample."""
    texts, sources = [], []
    for file in files:
        content = file.read_text(encoding="utf-8")
        if file.suffix == ".json" and content.lstrip()[:1] in ("[", "{"):
            try:
                loaded = json.loads(content)
            except json.JSONDecodeError as error:  # one broken document: the whole file is one bad sample
                texts.append(content)
                sources.append(f"{file}:{error.lineno}")
                continue
            items = loaded if isinstance(loaded, list) else [loaded]
            texts.extend(json.dumps(item) for item in items)
            sources.extend(f"{file}[{i}]" for i in range(len(items)))
            continue
        for lineno, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                texts.append(line)
                sources.append(f"{file}:{lineno}")
    return texts, sources
