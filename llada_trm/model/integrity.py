"""File integrity: one readable line for every missing, truncated, corrupt or mis-typed file, and manifests.

Every directory the trainer writes (a checkpoint, its `model/`, the exported `output_dir/model`) gets a
`manifest.json`, written last, listing each file with its size. A directory is complete only when its manifest
is present and every listed file exists, is a regular file of the recorded size and parses as what its name
says (safetensors header, JSON, torch zip archive, UTF-8 text). The checks read headers only, never tensor
data, so validating an 8B checkpoint costs milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TEXT_SUFFIXES = (".jinja", ".txt", ".md", ".model")
TORCH_ARCHIVE_SUFFIXES = (".bin", ".pt", ".pth")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class BrokenFileError(OSError):
    """A file that cannot be used: missing, truncated, corrupt, a directory, ... The message is one line,
    `PATH: what is wrong`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {' '.join(str(problem).split())}")


class CheckpointMismatchError(RuntimeError):
    """Weights on disk that do not fit the model: never silently replaced by a random init."""


def one_line(error: BaseException) -> str:
    """An exception's message collapsed to one line (library errors often span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------- single files
def require_file(path: Path) -> int:
    """The size of `path`, which must exist and be a regular file."""
    if path.is_dir():
        raise BrokenFileError(path, "is a directory, expected a file")
    if not path.exists():
        raise BrokenFileError(path, "missing")
    if not path.is_file():
        raise BrokenFileError(path, "is not a regular file")
    return path.stat().st_size


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header against its size; returns the header (tensor name -> info)."""
    size = require_file(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BrokenFileError(path, f"truncated safetensors file ({size} bytes, no header)")
        header_size = struct.unpack("<Q", prefix)[0]
        if header_size > size - 8:
            raise BrokenFileError(path, f"corrupt or truncated safetensors header (header of {header_size} bytes "
                                        f"in a file of {size})")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, ValueError):
            raise BrokenFileError(path, "corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise BrokenFileError(path, "corrupt safetensors header (not a mapping)")
    data_size = size - 8 - header_size
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
        except (TypeError, KeyError, ValueError):
            raise BrokenFileError(path, f"corrupt safetensors header (entry {name!r})") from None
        expected = count * DTYPE_BYTES.get(info.get("dtype"), 0)
        if stop < begin or (info.get("dtype") in DTYPE_BYTES and stop - begin != expected):
            raise BrokenFileError(path, f"corrupt safetensors header (tensor {name!r} has inconsistent offsets)")
        end = max(end, stop)
    if end != data_size:
        state = "truncated" if end > data_size else "has trailing bytes"
        raise BrokenFileError(path, f"{state}: tensors need {end} data bytes, the file holds {data_size}")
    return header


def check_json(path: Path):
    """Parse a JSON file; returns its content."""
    require_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BrokenFileError(path, "corrupt JSON (not UTF-8 text)") from None
    except ValueError as error:
        raise BrokenFileError(path, f"corrupt or truncated JSON ({one_line(error)})") from None


def check_torch_archive(path: Path) -> None:
    """A `torch.save` zip archive: the central directory and every member's local header must be readable."""
    require_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                archive.open(info).close()  # opening reads and checks the member's local header
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
        raise BrokenFileError(path, f"corrupt or truncated torch archive ({one_line(error)})") from None


def check_text(path: Path) -> None:
    """UTF-8 text; a chat template must also parse (a cut-off template usually does not)."""
    require_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BrokenFileError(path, "corrupt text file (not UTF-8)") from None
    if path.suffix == ".jinja":
        import jinja2

        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as error:
            raise BrokenFileError(path, f"corrupt or truncated template ({one_line(error)})") from None


def check_file(path: Path) -> None:
    """Check one file by what its name says it is (other kinds only need to be a readable regular file)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        check_safetensors(path)
    elif suffix == ".json":
        check_json(path)
    elif suffix in TORCH_ARCHIVE_SUFFIXES:
        check_torch_archive(path)
    elif suffix in TEXT_SUFFIXES:
        check_text(path)
    else:
        require_file(path)


# ---------------------------------------------------------------------- manifests
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_manifest(directory: Path, **info) -> dict:
    """List every file under `directory` (size in bytes) in its manifest.json, after syncing each file to disk.
    Call it last: a directory without a manifest is incomplete by definition."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != f".{MANIFEST}.tmp" and path != directory / MANIFEST:
            fsync_file(path)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    manifest = {"format": MANIFEST_FORMAT, "written_at_ns": time.time_ns(), **info, "files": files}
    staging = directory / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_file(staging)
    os.replace(staging, directory / MANIFEST)
    fsync_directory(directory)
    return manifest


def replace_directory(staging: Path, target: Path) -> None:
    """Put the finished directory `staging` at `target`: the old one is renamed aside first and removed last, so
    `target` is always either the old directory or the new one, never a half-written mix."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_model_directory(model, tokenizer, target: Path, json_files: dict[str, dict] | None = None) -> Path:
    """A model (`save_pretrained`), its tokenizer, any `json_files` (name -> content) and a manifest (written last)
    into a staging directory beside `target`, then renamed to it (`replace_directory`)."""
    target = Path(target)
    staging = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for name, content in (json_files or {}).items():
        (staging / name).write_text(json.dumps(content, indent=2) + "\n")
    write_manifest(staging)
    replace_directory(staging, target)
    return target


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists() and not path.is_dir():
        raise BrokenFileError(path, "missing: the directory was never completed (interrupted while written, "
                                    "or written by an older version)")
    manifest = check_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BrokenFileError(path, "not a manifest (no file list)")
    return manifest


def verify_manifest(directory: Path) -> dict:
    """Check every file the manifest lists (presence, kind, size, header); returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, size in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BrokenFileError(directory / MANIFEST, f"lists {name!r}, outside the directory")
        path = directory / name
        actual = require_file(path)
        if actual != size:
            state = "truncated" if actual < size else "changed"
            raise BrokenFileError(path, f"{state}: {actual} bytes, the manifest records {size}")
        check_file(path)
    return manifest
