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
dropped (counted); a missing/unreadable file, a malformed record or a value that is not text (in any
format: JSONL, Parquet, hf://) raises `DataError` whose message is one line naming the file (and line
or row) and the cause, or with `data.on_error=skip` is skipped, counted and listed in `ReadStats`.
Directories are walked following symlinked directories; a directory reached a second time (a symlink
loop, or a second link to it) is not read again and is counted (`symlink_loops`) and named; hidden
names (.dotfiles, .dot-dirs) and __pycache__ are not read and are counted (`hidden_skipped`) and named.

Memory is bounded: files and lines are read in pieces of at most `max_doc_bytes`; a document longer
than that (a text file, a line, a JSONL/Parquet/hf value) is cut near the limit after the last newline
(else space or tab; else at a UTF-8 character boundary) into pieces, each passed on as a document:
counted as `docs_split` (documents cut) and `split_pieces` (what they became). A JSONL record longer
than the limit cannot be parsed in bounded memory: it is a bad record (fail, or skip and count).
"""
from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
import shutil
import sysconfig
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from xlp.pipeline.core.schema.data import MAX_DOC_BYTES
from xlp.pipeline.core.secrets import redact, redact_text, redact_urls

GLOB_CHARS = set("*?[")
MAX_LISTED = 100  # skipped files / bad records listed by name in the metrics (all are counted)
MAX_UNREAD_LISTED = 300  # hidden names and symlink loops listed by name (all are counted)

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
    "docs_split",  # documents longer than data.max_doc_bytes, cut into pieces
    "split_pieces",  # the pieces those became (each counted in docs_read as a document)
    "hidden_skipped",  # hidden files/dirs (.name) and __pycache__ dirs in walked directories, not read
    "symlink_loops",  # symlinked directories not followed: their target was already walked
)


class DataError(ValueError):
    """Bad input under `data.on_error=fail`: the message names the source, file and line (credentials
    in URLs masked: it goes to the stage log and stage.json)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(redact_text(str(message)))


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

    def __post_init__(self) -> None:  # the source names metrics and shard records: no credentials
        object.__setattr__(self, "source", redact_urls(self.source))  # per file: the URL forms only


@dataclass
class ReadStats:
    """Counts per source, plus the first MAX_LISTED skipped files and bad records by name."""

    per_source: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]
    bad_records: list = field(default_factory=list)  # [{"path", "line", "reason"}]
    unread: list = field(default_factory=list)  # [{"path", "reason"}]: hidden names, symlink loops

    def src(self, source: str) -> dict:
        d = self.per_source.get(source)  # FileRef.source is already redacted: the per-document path
        if d is None:
            source = redact_text(source)  # the name is written (metrics, manifest): no credentials in it
            d = self.per_source.get(source)
        if d is None:
            d = self.per_source[source] = {k: 0 for k in COUNTERS}
        return d

    def add(self, source: str, key: str, n: int = 1) -> None:
        self.src(source)[key] += n

    def skip(self, source: str, path: str, reason: str) -> None:
        self.add(source, "files_skipped")
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(redact({"source": source, "path": path, "reason": reason}))

    def bad(self, source: str, path: str, line: Optional[int], reason: str) -> None:
        self.add(source, "bad_records")
        if len(self.bad_records) < MAX_LISTED:
            self.bad_records.append(redact({"path": path, "line": line, "reason": reason}))

    def not_read(self, source: str, path: str, key: str, reason: str) -> None:
        """A walked name deliberately not read (key: hidden_skipped | symlink_loops): counted, listed."""
        self.add(source, key)
        if len(self.unread) < MAX_UNREAD_LISTED:
            self.unread.append(redact({"path": path, "reason": reason}))

    def merge(self, other: "ReadStats | dict") -> None:
        if isinstance(other, dict):
            other = ReadStats(**other)
        for source, counts in other.per_source.items():
            mine = self.src(source)
            for k, v in counts.items():
                mine[k] = mine.get(k, 0) + v
        self.skipped.extend(other.skipped[: max(0, MAX_LISTED - len(self.skipped))])
        self.bad_records.extend(other.bad_records[: max(0, MAX_LISTED - len(self.bad_records))])
        self.unread.extend(other.unread[: max(0, MAX_UNREAD_LISTED - len(self.unread))])

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


def one_line(text: str) -> str:
    """A message on one line (library errors may span several)."""
    return " ".join(str(text).split())


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


def _not_read_reason(name: str) -> Optional[str]:
    if name.startswith("."):
        return "hidden name (starts with '.'): not read"
    if name == "__pycache__":
        return "__pycache__ (compiled Python): not read"
    return None


def walk_files(root: str, source: str = "", stats: Optional["ReadStats"] = None,
               on_error: str = "fail") -> list[str]:
    """The files under directory `root` in sorted, depth-first order (a directory's files, then its
    subdirectories). Symlinked directories are followed; one whose real path was already walked (a
    loop back to an ancestor, or a second link to the same directory) is not walked again. Hidden
    names and __pycache__ are left out. Both are counted and named in `stats` when given. A broken
    symlink is returned as a file (opening it fails by name, or is skipped under on_error=skip). A
    subdirectory that cannot be listed raises OSError naming it (on_error=skip: skipped and counted)."""
    def note(path: str, key: str, reason: str) -> None:
        if stats is not None:
            stats.not_read(source, path, key, reason)

    out: list[str] = []
    walked = {os.path.realpath(root): root}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            reason = f"cannot list directory {d}: {e.strerror or e}"
            if d == root or on_error != "skip" or stats is None:
                raise OSError(reason) from None
            stats.skip(source, d, reason)
            continue
        subdirs = []
        for e in entries:
            full = os.path.join(d, e.name)
            why = _not_read_reason(e.name)
            if why is not None:
                note(full, "hidden_skipped", why)
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not is_dir:
                out.append(full)
                continue
            real = os.path.realpath(full)
            if real in walked:
                first = walked[real]
                here = os.path.realpath(d)
                kind = ("a symlink loop: it points back to its ancestor" if here == real or
                        here.startswith(real.rstrip(os.sep) + os.sep) else "a second link to")
                note(full, "symlink_loops", f"{full} -> {real}: {kind} {first}, not walked again")
                continue
            walked[real] = full
            subdirs.append(full)
        stack.extend(reversed(subdirs))
    return out


def _size(p: str) -> int:
    try:
        return os.path.getsize(p)
    except OSError:
        return 0  # a broken symlink: reading it fails by name


def _resolve_local(source: str, fmt: str, stats: Optional["ReadStats"] = None,
                   on_error: str = "fail") -> list[FileRef]:
    path = os.path.expanduser(source[len("file://"):] if source.startswith("file://") else source)
    keep_url = source.startswith("file://")

    def ref(p: str) -> FileRef:
        return _file_ref(source, ("file://" + os.path.abspath(p)) if keep_url else os.path.abspath(p),
                         _size(p), fmt)

    if any(c in path for c in GLOB_CHARS):
        matches = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
        return [ref(p) for p in matches]
    if os.path.isdir(path):
        return [ref(p) for p in walk_files(path, source, stats, on_error)]
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise OSError(f"not readable: {path}")
        return [ref(path)]
    raise FileNotFoundError(f"no such file or directory: {path}")


def _resolve_url(source: str, fmt: str, stats: Optional["ReadStats"] = None) -> list[FileRef]:
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
        files = []
        for p, i in sorted(infos.items()):
            if _hidden(p, path) or "__pycache__" in Path(p).parts:
                if stats is not None:
                    stats.not_read(source, url(p), "hidden_skipped",
                                   "under a hidden name (starts with '.') or __pycache__: not read")
                continue
            files.append((p, i))
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
                files = _resolve_url(source, fmt, stats)
            else:
                files = _resolve_local(source, fmt, stats, on_error)
            if not files:
                raise FileNotFoundError(f"matches no files: {source}")
        except (OSError, ValueError) as e:
            if on_error == "skip":
                stats.skip(source, source, one_line(f"{type(e).__name__}: {e}"))
                continue
            raise DataError(f"data.sources entry {source!r}: {one_line(str(e))} "
                            "(fix the path, or set data.on_error=skip to skip it)") from None
        out.extend(files)
    return out


def plan_partitions(files: list[FileRef], partition_bytes: int) -> list[list[FileRef]]:
    """Consecutive files grouped into ceil(total / partition_bytes) partitions of about equal size (a
    file is never split: one of more than that size is a partition of its own).

    Equal sizes, not partitions filled up to partition_bytes with the remainder last: a stage on few
    partitions then keeps every worker busy to its end. The stdlib corpus (31.5 MB) filled up to 8 MiB
    is 8.4, 8.4, 8.4 and 6.4 MB: two workers finish after 16.8 MB each, 1.88x one worker at best;
    as 4 equal partitions, 2x. Each file goes to the partition its middle byte falls in."""
    if not files:
        return []
    total = sum(f.size for f in files)
    n = max(1, -(-total // max(1, partition_bytes)))
    target = total / n
    parts: list[list[FileRef]] = []
    cur: list[FileRef] = []
    cur_k = pos = 0
    for f in files:
        k = min(n - 1, int((pos + f.size / 2) // target)) if target > 0 else 0
        if cur and k != cur_k:
            parts.append(cur)
            cur = []
        cur_k = k
        cur.append(f)
        pos += f.size
    parts.append(cur)
    return parts


def partition_digest(files: list[FileRef]) -> str:
    """What a partition is made of (its files, in order): a resumed stage keeps a partition's
    outputs only if they were made from the same files."""
    blob = json.dumps([asdict(f) for f in files], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def cut_point(buf: bytes | bytearray, limit: int) -> int:
    """Where to cut a piece of at most `limit` bytes off the front of `buf` (longer than `limit`):
    after the last newline in the last quarter before the limit, else after the last space or tab
    there, else at the UTF-8 character boundary at or just before the limit."""
    lo = limit - limit // 4
    i = buf.rfind(b"\n", lo, limit)
    if i < 0:
        i = max(buf.rfind(b" ", lo, limit), buf.rfind(b"\t", lo, limit))
    if i >= 0:
        return i + 1
    p = limit
    while p > limit - 3 and (buf[p] & 0xC0) == 0x80:  # a continuation byte: not a character start
        p -= 1
    return p if (buf[p] & 0xC0) != 0x80 else limit  # (not UTF-8 there: a hard cut; U+FFFD counted)


def bounded_pieces(read: Callable[[int], bytes], limit: int) -> Iterator[tuple[bytes, bool]]:
    """One document's bytes from `read(n)` (at most n bytes; b"" at its end) as pieces of at most
    `limit` bytes, cut by `cut_point`: (piece, is_last). An empty document is one empty piece. At
    most about 2 x limit bytes are held at once, however long the document is."""
    buf = bytearray()
    while True:
        while len(buf) <= limit:
            data = read(limit + 1 - len(buf))
            if not data:
                break
            buf += data
        if len(buf) <= limit:
            yield bytes(buf), True
            return
        cut = cut_point(buf, limit)
        piece = bytes(buf[:cut])
        del buf[:cut]
        yield piece, False


def _split_bytes(read: Callable[[int], bytes], limit: int, src: dict) -> Iterator[bytes]:
    """bounded_pieces, with documents that were cut counted (docs_split, split_pieces)."""
    cut = False
    for piece, last in bounded_pieces(read, limit):
        if not last and not cut:
            cut = True
            src["docs_split"] += 1
        if cut:
            src["split_pieces"] += 1
        yield piece


def _split_text(text: str, limit: int, src: dict) -> Iterator[str]:
    """A document already in memory (a JSONL/Parquet/hf value) in pieces of at most `limit` bytes."""
    if len(text) * 4 <= limit:  # cannot be longer than the limit in UTF-8
        yield text
        return
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        yield text
        return
    del text
    for piece in _split_bytes(io.BytesIO(raw).read, limit, src):
        yield piece.decode("utf-8", "surrogatepass")  # cut at character boundaries: decodes whole


def text_value(value, field_name: str) -> tuple[str, int]:
    """A record's text value as (text, U+FFFD put in): a string as it is, None as "" (an empty
    document, counted), bytes decoded; anything else raises ValueError naming its type. Every format
    (JSONL, Parquet, hf://) checks its values here."""
    if value is None:
        return "", 0
    if isinstance(value, str):
        return value, 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode(bytes(value))
    shown = one_line(repr(value))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ValueError(f"field {field_name!r} holds a {type(value).__name__} ({shown}), not a string")


def iter_documents(ref: FileRef, *, text_field: str = "text", on_error: str = "fail",
                   stats: ReadStats, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[str]:
    """Non-empty documents of one file, none longer than `max_doc_bytes` in UTF-8 (longer ones are
    split); every document read, split, dropped or skipped is counted in `stats`."""
    src = stats.src(ref.source)
    n_before = src["docs_read"]
    try:
        if ref.fmt == "hf":
            texts = _hf_texts(ref, text_field, on_error, stats, max_doc_bytes)
        else:
            f = open_binary(ref)
            src["files"] += 1
            texts = _texts(ref, f, text_field, on_error, stats, max_doc_bytes)
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
        reason = one_line(f"{type(e).__name__}: {e}") + (f" (after {n} documents, which were kept)" if n else "")
        if on_error == "skip":
            stats.skip(ref.source, ref.url, reason)
            return
        raise DataError(f"cannot read {ref.url} (source {ref.source!r}): {reason} "
                        "(set data.on_error=skip to skip it)") from None


def _bad(ref: FileRef, line: Optional[int], where: str, reason: str, on_error: str, stats: ReadStats) -> None:
    """A bad record (at JSONL `line`, or at `where`: a row and column): counted and listed under
    on_error=skip, else DataError, one line naming the file, the place and the cause."""
    reason = one_line(f"{where}: {reason}" if where else reason)
    if on_error == "skip":
        stats.bad(ref.source, ref.url, line, reason)
        return
    place = f"{ref.url}:{line}" if line is not None else ref.url
    raise DataError(f"{place}: {reason} (set data.on_error=skip to skip bad records)")


def _texts(ref: FileRef, f: IO[bytes], text_field: str, on_error: str, stats: ReadStats,
           limit: int) -> Iterator[str]:
    src = stats.src(ref.source)

    def counted(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
        def r(n: int) -> bytes:
            data = read(n)
            src["bytes"] += len(data)
            return data
        return r

    with f:
        if ref.fmt == "text":
            for piece in _split_bytes(counted(f.read), limit, src):
                text, bad = decode(piece)
                src["replacement_chars"] += bad
                yield text
        elif ref.fmt == "lines":
            while True:
                first = f.readline(limit + 1)
                if not first:
                    break
                src["bytes"] += len(first)
                yield from _line_pieces(f, first, limit, src)
        elif ref.fmt == "jsonl":
            yield from _jsonl(ref, f, text_field, on_error, stats, limit)
        elif ref.fmt == "parquet":
            yield from _parquet(ref, f, text_field, on_error, stats, limit)
        else:
            raise DataError(f"{ref.url}: unknown format {ref.fmt!r}")


def _line_pieces(f: IO[bytes], first: bytes, limit: int, src: dict) -> Iterator[str]:
    """The rest of the line that starts with `first`, read with readline(n) and cut into pieces of at
    most `limit` bytes; the line end (\n or \r\n) is not part of the document."""
    pending = [first]
    state = {"done": False}

    def read(n: int) -> bytes:
        if state["done"]:
            return b""
        if pending:
            data = pending.pop()
        else:
            data = f.readline(n)
            src["bytes"] += len(data)
        if not data or data.endswith(b"\n"):
            state["done"] = True
            data = data.rstrip(b"\r\n")
        return data

    for piece in _split_bytes(read, limit, src):
        text, bad = decode(piece)
        src["replacement_chars"] += bad
        yield text


def _jsonl(ref: FileRef, f: IO[bytes], text_field: str, on_error: str, stats: ReadStats,
           limit: int) -> Iterator[str]:
    src = stats.src(ref.source)
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            break
        lineno += 1
        src["bytes"] += len(line)
        if len(line) > limit and not line.endswith(b"\n"):  # longer than the limit: read past it
            n = len(line)
            while more := f.readline(1 << 20):
                n += len(more)
                src["bytes"] += len(more)
                if more.endswith(b"\n"):
                    break
            _bad(ref, lineno, "", f"JSONL record of {n} bytes is longer than data.max_doc_bytes={limit}: "
                 "it cannot be parsed in bounded memory (raise data.max_doc_bytes, or split the record)",
                 on_error, stats)
            continue
        if not line.strip():
            src["blank_lines"] += 1
            continue
        line_text, bad = decode(line)
        src["replacement_chars"] += bad
        del line
        try:
            record = json.loads(line_text)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            if text_field not in record:
                raise ValueError(f"no field {text_field!r} (data.text_field); fields: {sorted(record)[:10]}")
            text, _ = text_value(record[text_field], text_field)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            _bad(ref, lineno, "", f"malformed JSONL record: {e}", on_error, stats)
            continue
        yield from _split_text(text, limit, src)


def _spooled(f: IO[bytes]) -> IO[bytes]:
    """A seekable copy of a stream (a compressed Parquet file) in a temporary file, not in memory."""
    tmp = tempfile.TemporaryFile(prefix="xlp-parquet-")
    shutil.copyfileobj(f, tmp, 1 << 20)
    tmp.seek(0)
    return tmp  # type: ignore[return-value]


def _parquet(ref: FileRef, f: IO[bytes], text_field: str, on_error: str, stats: ReadStats,
             limit: int) -> Iterator[str]:
    import pyarrow.parquet as pq

    src = stats.src(ref.source)
    data = f if ref.compression is None and hasattr(f, "seek") else _spooled(f)
    pf = pq.ParquetFile(data)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"Parquet file has no column {text_field!r} (data.text_field); columns: {names[:20]}")
    src["bytes"] += int(pf.metadata.serialized_size)
    row = 0  # rows counted from 0, as Parquet tools show them
    for batch in pf.iter_batches(columns=[text_field], batch_size=256):
        for value in batch.column(0).to_pylist():
            row += 1
            try:
                text, bad = text_value(value, text_field)
            except ValueError as e:
                _bad(ref, None, f"row {row - 1}, column {text_field!r}", str(e), on_error, stats)
                continue
            src["replacement_chars"] += bad
            src["bytes"] += len(value) if isinstance(value, (str, bytes)) else 0
            yield from _split_text(text, limit, src)


def _hf_texts(ref: FileRef, text_field: str, on_error: str, stats: ReadStats, limit: int) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(ref.url, split=ref.hf_split)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset has no column {text_field!r} (data.text_field); columns: {ds.column_names}")
    ds = ds.shard(num_shards=ref.hf_num_shards, index=ref.hf_shard, contiguous=True)
    stats.src(ref.source)["files"] += 1
    yield from hf_values(ds, ref, text_field, on_error, stats, limit)


def hf_values(ds, ref: FileRef, text_field: str, on_error: str, stats: ReadStats,
              limit: int = MAX_DOC_BYTES) -> Iterator[str]:
    """The text of a `datasets.Dataset` slice, read in batches of rows (not the whole column at once),
    each value checked by `text_value` like every other format's."""
    src = stats.src(ref.source)
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=256):
        for value in batch[text_field]:
            row += 1
            try:
                text, bad = text_value(value, text_field)
            except ValueError as e:
                _bad(ref, None, f"split {ref.hf_split!r} shard {ref.hf_shard} row {row - 1}, column {text_field!r}",
                     str(e), on_error, stats)
                continue
            src["replacement_chars"] += bad
            src["bytes"] += len(text)
            yield from _split_text(text, limit, src)
