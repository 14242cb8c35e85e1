"""Corpus readers: turn `data.sources` into files, files into partitions, and files into documents.

A source is a local file, directory or glob, an fsspec URL (s3://, gs://, https://, file://; a
directory or glob there too), `hf://dataset[:split]` (Hugging Face `datasets`, when installed and
online), or `stdlib`: the .py files of the running interpreter's standard library.

Formats (`data.format`, `auto` picks by extension after .gz/.zst/.zstd):
  text     one document per file              (.txt, .py, .md, anything else)
  lines    one document per line of a text file
  jsonl    one JSON object per line, text under `data.text_field`   (.jsonl, .json, .ndjson)
  parquet  text in the column `data.text_field`                     (.parquet)

Bad input never vanishes silently: undecodable bytes become U+FFFD (counted), empty documents are
dropped (counted); a missing/unreadable file or a malformed record raises `DataError` naming the
file (and line), or with `data.on_error=skip` is skipped, counted and listed in `ReadStats`.
"""
from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
import sysconfig
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

GLOB_CHARS = set("*?[")
MAX_LISTED = 100  # skipped files / bad records listed by name in the metrics (all are counted)

COUNTERS = (
    "files",  # files opened
    "files_skipped",  # missing/unreadable sources and files, skipped with data.on_error=skip
    "bytes",  # bytes read (uncompressed)
    "docs_read",  # documents found
    "docs_empty",  # empty (or whitespace-only) documents dropped
    "docs_duplicate",  # exact duplicates dropped (data.dedup)
    "docs_kept",  # documents passed on (read - empty - duplicate)
    "replacement_chars",  # U+FFFD put in for undecodable bytes
    "bad_records",  # malformed records (JSONL lines, non-text values) skipped
    "blank_lines",  # whitespace-only lines of JSONL files (not records)
)


class DataError(ValueError):
    """Bad input under `data.on_error=fail`: the message names the source, file and line."""


@dataclass(frozen=True)
class FileRef:
    """One readable unit: a file (local path or URL), or one slice of a Hugging Face dataset."""

    source: str  # the data.sources entry it came from (metrics are kept per source)
    url: str
    size: int  # bytes on storage (compressed size for .gz/.zst), used to balance partitions
    fmt: str  # text | lines | jsonl | parquet | hf
    compression: Optional[str] = None  # gzip | zstd
    hf_split: Optional[str] = None
    hf_shard: int = 0
    hf_num_shards: int = 1


@dataclass
class ReadStats:
    """Counts per source, plus the first MAX_LISTED skipped files and bad records by name."""

    per_source: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]
    bad_records: list = field(default_factory=list)  # [{"path", "line", "reason"}]

    def src(self, source: str) -> dict:
        d = self.per_source.get(source)
        if d is None:
            d = self.per_source[source] = {k: 0 for k in COUNTERS}
        return d

    def add(self, source: str, key: str, n: int = 1) -> None:
        self.src(source)[key] += n

    def skip(self, source: str, path: str, reason: str) -> None:
        self.add(source, "files_skipped")
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append({"source": source, "path": path, "reason": reason})

    def bad(self, source: str, path: str, line: Optional[int], reason: str) -> None:
        self.add(source, "bad_records")
        if len(self.bad_records) < MAX_LISTED:
            self.bad_records.append({"path": path, "line": line, "reason": reason})

    def merge(self, other: "ReadStats | dict") -> None:
        if isinstance(other, dict):
            other = ReadStats(**other)
        for source, counts in other.per_source.items():
            mine = self.src(source)
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        self.skipped.extend(other.skipped[: max(0, MAX_LISTED - len(self.skipped))])
        self.bad_records.extend(other.bad_records[: max(0, MAX_LISTED - len(self.bad_records))])

    def totals(self) -> dict:
        out = {k: 0 for k in COUNTERS}
        for counts in self.per_source.values():
            for k, v in counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Sources -> files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(package: str = "") -> list[str]:
    """The .py files of the running interpreter's standard library, sorted (site-packages left out);
    with `package` (e.g. "json", "email"), only that package's files: a small real corpus."""
    root = stdlib_root() / package.replace(".", os.sep) if package else stdlib_root()
    if package and not root.is_dir():
        raise FileNotFoundError(f"no standard-library package {package!r} in {stdlib_root()}")
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")
                         and not x.startswith("."))
        out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    return out


def is_url(s: str) -> bool:
    return "://" in s


def split_compression(name: str) -> tuple[str, Optional[str]]:
    low = name.lower()
    for ext, comp in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if low.endswith(ext):
            return name[: -len(ext)], comp
    return name, None


def detect_format(name: str, fmt: str) -> str:
    """The reader for a file name under data.format (`auto` picks by extension)."""
    if fmt != "auto":
        return fmt
    base, _ = split_compression(name)
    ext = os.path.splitext(base)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    return "text"


def _file_ref(source: str, url: str, size: int, fmt: str) -> FileRef:
    _, comp = split_compression(url)
    return FileRef(source=source, url=url, size=int(size), fmt=detect_format(url, fmt), compression=comp)


def _hidden(path: str, root: str) -> bool:
    rel = os.path.relpath(path, root)
    return any(part.startswith(".") for part in Path(rel).parts)


def _resolve_local(source: str, fmt: str) -> list[FileRef]:
    path = os.path.expanduser(source[len("file://"):] if source.startswith("file://") else source)
    keep_url = source.startswith("file://")

    def ref(p: str) -> FileRef:
        return _file_ref(source, ("file://" + os.path.abspath(p)) if keep_url else os.path.abspath(p),
                         os.path.getsize(p), fmt)

    if any(c in path for c in GLOB_CHARS):
        matches = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
        return [ref(p) for p in matches]
    if os.path.isdir(path):
        out = []
        for d, dirs, files in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
            out.extend(ref(os.path.join(d, f)) for f in sorted(files) if not f.startswith("."))
        return out
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise OSError(f"not readable: {path}")
        return [ref(path)]
    raise FileNotFoundError(f"no such file or directory: {path}")


def _resolve_url(source: str, fmt: str) -> list[FileRef]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def url(p: str) -> str:
        return p if "://" in p else f"{protocol}://{p}"

    if any(c in path for c in GLOB_CHARS):
        infos = fs.glob(path, detail=True)
        files = sorted((p, i) for p, i in infos.items() if i.get("type") == "file")
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        files = sorted((p, i) for p, i in infos.items()
                       if not _hidden(p, path) and "__pycache__" not in Path(p).parts)
    elif fs.exists(path):
        files = [(path, fs.info(path))]
    else:
        raise FileNotFoundError(f"no such file or directory: {source}")
    return [_file_ref(source, url(p), i.get("size") or 0, fmt) for p, i in files]


def _resolve_hf(source: str, partition_bytes: int) -> list[FileRef]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise OSError(f"{source}: reading Hugging Face datasets needs the `datasets` package "
                      "(pip install datasets) and network access") from None
    name, _, split = source[len("hf://"):].partition(":")
    split = split or "train"
    import datasets

    builder = datasets.load_dataset_builder(name)
    info = builder.info.splits.get(split) if builder.info.splits else None
    nbytes = int(getattr(info, "num_bytes", 0) or 0)
    n = max(1, -(-nbytes // partition_bytes))
    return [FileRef(source=source, url=name, size=max(1, nbytes // n), fmt="hf", hf_split=split,
                    hf_shard=i, hf_num_shards=n) for i in range(n)]


def resolve_sources(
    sources: list[str], *, fmt: str = "auto", on_error: str = "fail",
    partition_bytes: int = 8 << 20, stats: Optional[ReadStats] = None,
) -> list[FileRef]:
    """All files of all sources, in source order (each source's files sorted by path)."""
    stats = stats if stats is not None else ReadStats()
    out: list[FileRef] = []
    for source in sources:
        stats.src(source)
        try:
            if source == "stdlib" or source.startswith("stdlib:"):
                files = [_file_ref(source, p, os.path.getsize(p), "text" if fmt == "auto" else fmt)
                         for p in stdlib_files(source.partition(":")[2])]
            elif source.startswith("hf://"):
                files = _resolve_hf(source, partition_bytes)
            elif is_url(source) and not source.startswith("file://"):
                files = _resolve_url(source, fmt)
            else:
                files = _resolve_local(source, fmt)
            if not files:
                raise FileNotFoundError(f"matches no files: {source}")
        except (OSError, ValueError) as e:
            if on_error == "skip":
                stats.skip(source, source, f"{type(e).__name__}: {e}")
                continue
            raise DataError(f"data.sources entry {source!r}: {e} "
                            "(fix the path, or set data.on_error=skip to skip it)") from None
        out.extend(files)
    return out


def plan_partitions(files: list[FileRef], partition_bytes: int) -> list[list[FileRef]]:
    """Consecutive files grouped into partitions of about `partition_bytes` (a big file is its own)."""
    parts: list[list[FileRef]] = []
    cur: list[FileRef] = []
    size = 0
    for f in files:
        if cur and size + f.size > partition_bytes:
            parts.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += f.size
    if cur:
        parts.append(cur)
    return parts


# ---------------------------------------------------------------------------------------------
# Files -> documents


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of U+FFFD put in for undecodable bytes."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def open_binary(ref: FileRef) -> IO[bytes]:
    """The file's bytes, decompressed."""
    if is_url(ref.url) and not ref.url.startswith("file://"):
        import fsspec

        raw: IO[bytes] = fsspec.open(ref.url, "rb").open()
    else:
        raw = open(ref.url[len("file://"):] if ref.url.startswith("file://") else ref.url, "rb")
    if ref.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if ref.compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)  # type: ignore[arg-type]  # (line iteration)
    return raw


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this file cannot be read" (not a bug in the reader)."""
    errs: list[type[BaseException]] = [OSError, EOFError, ValueError, KeyError, TypeError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    try:
        import pyarrow

        errs.append(pyarrow.ArrowException)
    except ImportError:
        pass
    return tuple(errs)


def doc_hash(text: str) -> bytes:
    """16-byte digest of a document's text: the train/val split and exact dedup are keyed by it."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_unit(digest: bytes) -> float:
    """A number in [0, 1) from the first 8 bytes of a digest (uniform over documents)."""
    return int.from_bytes(digest[:8], "little") / 2.0**64


def iter_documents(ref: FileRef, *, text_field: str = "text", on_error: str = "fail",
                   stats: ReadStats) -> Iterator[str]:
    """Non-empty documents of one file; every document read, dropped or skipped is counted in `stats`."""
    src = stats.src(ref.source)
    n_before = src["docs_read"]
    try:
        if ref.fmt == "hf":
            texts = _hf_texts(ref, text_field, stats)
        else:
            f = open_binary(ref)
            src["files"] += 1
            texts = _texts(ref, f, text_field, on_error, stats)
        for text in texts:
            src["docs_read"] += 1
            if not text.strip():
                src["docs_empty"] += 1
                continue
            yield text
    except DataError:
        raise
    except _read_errors() as e:
        # missing/unreadable file, truncated or corrupt compression, unreadable Parquet ...
        n = src["docs_read"] - n_before
        reason = f"{type(e).__name__}: {e}" + (f" (after {n} documents, which were kept)" if n else "")
        if on_error == "skip":
            stats.skip(ref.source, ref.url, reason)
            return
        raise DataError(f"cannot read {ref.url} (source {ref.source!r}): {reason} "
                        "(set data.on_error=skip to skip it)") from None


def _texts(ref: FileRef, f: IO[bytes], text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    src = stats.src(ref.source)
    with f:
        if ref.fmt == "text":
            raw = f.read()
            src["bytes"] += len(raw)
            text, bad = decode(raw)
            src["replacement_chars"] += bad
            yield text
        elif ref.fmt == "lines":
            for line in f:
                src["bytes"] += len(line)
                text, bad = decode(line.rstrip(b"\r\n"))
                src["replacement_chars"] += bad
                yield text
        elif ref.fmt == "jsonl":
            yield from _jsonl(ref, f, text_field, on_error, stats)
        elif ref.fmt == "parquet":
            yield from _parquet(ref, f, text_field, stats)
        else:
            raise DataError(f"{ref.url}: unknown format {ref.fmt!r}")


def _jsonl(ref: FileRef, f: IO[bytes], text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    src = stats.src(ref.source)
    for lineno, line in enumerate(f, 1):
        src["bytes"] += len(line)
        if not line.strip():
            src["blank_lines"] += 1
            continue
        line_text, bad = decode(line)
        src["replacement_chars"] += bad
        try:
            record = json.loads(line_text)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            if text_field not in record:
                raise ValueError(f"no field {text_field!r} (data.text_field); fields: {sorted(record)[:10]}")
            text = record[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise ValueError(f"field {text_field!r} is a {type(text).__name__}, not a string")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            reason = f"malformed JSONL record: {e}"
            if on_error == "skip":
                stats.bad(ref.source, ref.url, lineno, reason)
                continue
            raise DataError(f"{ref.url}:{lineno}: {reason} (set data.on_error=skip to skip bad records)") from None
        yield text


def _parquet(ref: FileRef, f: IO[bytes], text_field: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    src = stats.src(ref.source)
    data = f if ref.compression is None and hasattr(f, "seek") else io.BytesIO(f.read())
    pf = pq.ParquetFile(data)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"Parquet file has no column {text_field!r} (data.text_field); columns: {names[:20]}")
    src["bytes"] += int(pf.metadata.serialized_size)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                yield ""
            elif isinstance(value, bytes):
                text, bad = decode(value)
                src["replacement_chars"] += bad
                src["bytes"] += len(value)
                yield text
            elif isinstance(value, str):
                src["bytes"] += len(value)
                yield value
            else:
                stats.bad(ref.source, ref.url, None, f"column {text_field!r} holds a {type(value).__name__}")


def _hf_texts(ref: FileRef, text_field: str, stats: ReadStats) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(ref.url, split=ref.hf_split)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset has no column {text_field!r} (data.text_field); columns: {ds.column_names}")
    ds = ds.shard(num_shards=ref.hf_num_shards, index=ref.hf_shard, contiguous=True)
    src = stats.src(ref.source)
    src["files"] += 1
    for value in ds[text_field]:
        text = value if isinstance(value, str) else ("" if value is None else str(value))
        src["bytes"] += len(text)
        yield text
