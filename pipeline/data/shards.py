"""WebDataset tar shards of token ids, their per-shard records, and the manifest.

A shard is a plain tar (WebDataset layout: members `KEY.EXT`, the members of one sample adjacent).
A sample holds one or more whole documents, in order, each ending with `<eos>`:

    KEY.tokens.npy    token ids, a 1-D NumPy array of `dtype` (uint16 when the vocabulary fits, else uint32)
    KEY.doclens.npy   the documents' lengths, a 1-D uint32 NumPy array; they sum to the number of tokens

so document boundaries survive into training. The members are NumPy's .npy files, so WebDataset's own
decoders read them (`webdataset.WebDataset(url).decode()` gives arrays). Shards of format v1 (members
`KEY.tokens` and `KEY.doclens`: the same arrays as raw little-endian bytes) are still read. Tar headers carry fixed metadata (mtime 0, uid 0,
mode 0644): the same documents give byte-identical shards.

Shards are named `{split}-{partition:05d}-{index:04d}.tar`. Each is written under a temporary name
and renamed when whole, after its record `meta/{name}.json` (samples, docs, tokens, bytes, sha256,
per-source counts) is in place; a finished partition writes `meta/part-{partition:05d}.json`.
`manifest.json` is assembled from the records once every partition is done.

Shards are checked against those records where they are used: the loader compares each shard's size
(before reading it) and sha256 (over the bytes it read) with the manifest the first time a process
opens it (`read_verified`), and a resumed shard stage checks the shards it keeps (`complete_shards`).
A mismatch is a ShardError whose one-line message names the shard and both sizes or both hashes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from xlp.pipeline.core.diskfull import DiskFull, disk_full, is_disk_full
from xlp.pipeline.core.layout import MANIFEST  # the index's name in a shard dir (which may be a URL)
from xlp.pipeline.core.node import node_name
from xlp.pipeline.data.manifest import parse_manifest

META_DIR = "meta"
FORMAT = "xlp-webdataset-tokens-v2"  # v2: .npy members; v1 (raw members) is still read
TOKENS, DOCLENS = "tokens.npy", "doclens.npy"  # a sample's members (v1: "tokens", "doclens")
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[np.dtype(dtype).itemsize]


def shard_name(split: str, partition: int, index: int) -> str:
    return f"{split}-{partition:05d}-{index:04d}.tar"


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path) from e
        raise
    os.replace(tmp, path)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class ShardWriter:
    """Writes one split of one partition: documents -> samples -> shards of at most `shard_bytes`.

    `start_index`/`start_sample` continue after the shards a killed attempt already finished.
    Returns a record per finished shard from `add_doc`/`close` (via `finished`).
    Running out of disk space raises DiskFull naming the file (the shard being written is removed,
    so the space is free again; the finished shards stay and a rerun continues after them).
    """

    def __init__(self, out_dir: Path, split: str, partition: int, *, dtype: np.dtype,
                 sample_tokens: int, shard_bytes: int, start_index: int = 0, start_sample: int = 0,
                 group: str = "", plan: str = ""):
        self.out_dir = Path(out_dir)
        self.meta_dir = self.out_dir / META_DIR
        self.split, self.partition = split, partition
        self.dtype = np.dtype(dtype)
        self.sample_tokens, self.shard_bytes = sample_tokens, shard_bytes
        self.index, self.next_sample = start_index, start_sample
        self.group = group  # a data.mixture group: recorded with each shard (the loader draws by group)
        self.plan = plan  # the partition's files' digest (readers.partition_digest): a resume checks it
        self.finished: list[dict] = []
        self._docs: list[np.ndarray] = []
        self._doc_sources: list[str] = []
        self._ntok = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp: Optional[Path] = None
        self._shard = self._new_shard_stats()

    def _new_shard_stats(self) -> dict:
        return {"samples": 0, "docs": 0, "tokens": 0, "sources": {}}

    def add_doc(self, tokens: np.ndarray, source: str) -> None:
        """One document's ids (already ending with <eos>)."""
        if self._docs and self._ntok + len(tokens) > self.sample_tokens:
            self._guarded(self._flush_sample)
        self._docs.append(tokens)
        self._doc_sources.append(source)
        self._ntok += len(tokens)

    def _flush_sample(self) -> None:
        if not self._docs:
            return
        tokens = npy_bytes(np.concatenate(self._docs).astype(self.dtype, copy=False))
        lens = npy_bytes(np.asarray([len(d) for d in self._docs], dtype="<u4"))
        if self._tar is not None and self._shard["tokens"] and \
                (self._shard["tokens"] * self.dtype.itemsize + len(tokens)) > self.shard_bytes:
            self._close_shard()
        if self._tar is None:
            name = shard_name(self.split, self.partition, self.index)
            self._tmp = self.out_dir / f".{name}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        key = f"{self.split}-{self.partition:05d}-{self.next_sample:08d}"
        self._tar.addfile(_tarinfo(f"{key}.{TOKENS}", len(tokens)), io.BytesIO(tokens))
        self._tar.addfile(_tarinfo(f"{key}.{DOCLENS}", len(lens)), io.BytesIO(lens))
        self.next_sample += 1
        st = self._shard
        st["samples"] += 1
        st["docs"] += len(self._docs)
        st["tokens"] += self._ntok
        for doc, source in zip(self._docs, self._doc_sources):
            s = st["sources"].setdefault(source, {"docs": 0, "tokens": 0})
            s["docs"] += 1
            s["tokens"] += len(doc)
        self._docs, self._doc_sources, self._ntok = [], [], 0

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        name = shard_name(self.split, self.partition, self.index)
        record = dict(self._shard, path=name, split=self.split, partition=self.partition, index=self.index,
                      bytes=self._tmp.stat().st_size, sha256=sha256_file(self._tmp), node=node_name())
        if self.group:
            record["group"] = self.group
        if self.plan:
            record["plan"] = self.plan
        self.meta_dir.mkdir(exist_ok=True)
        _atomic_json(self.meta_dir / f"{name}.json", record)  # the record first, then the shard
        os.replace(self._tmp, self.out_dir / name)
        self.finished.append(record)
        self._tar, self._tmp = None, None
        self._shard = self._new_shard_stats()
        self.index += 1

    def close(self) -> None:
        self._guarded(self._flush_sample)
        if self._tar is not None:
            self._guarded(self._close_shard)

    def _guarded(self, fn) -> None:
        """fn(); out of disk space: the open shard removed, DiskFull naming the file being written."""
        try:
            fn()
        except DiskFull:
            self.abort()
            raise
        except OSError as e:
            if not is_disk_full(e):
                raise
            path = self._tmp if self._tmp is not None else self.out_dir
            self.abort()
            raise disk_full(path) from e

    def abort(self) -> None:
        """Drop the shard being written (its temporary file)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:  # e.g. no space for the end-of-archive blocks: the file goes anyway
                pass
            self._tar = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def complete_shards(out_dir: Path, split: str, partition: int,
                    damaged: Optional[list[str]] = None, plan: Optional[str] = None) -> list[dict]:
    """Records of the shards of (split, partition) a previous attempt finished: a prefix 0..k-1 whose
    files match their records (size and sha256, read once). The first one that does not (a disk
    error, a copy cut short, someone's edit) ends the prefix: it and every later shard of the
    (split, partition) are removed, so the writer redoes them (same input -> the same bytes); its
    one-line problem is appended to `damaged` when given. With `plan`, a shard written from other
    files (its record's plan differs: the partitioning changed since) ends the prefix too."""
    records, problem = verified_prefix(out_dir, split, partition, plan)
    if problem is not None:
        if damaged is not None:
            damaged.append(problem)
        remove_shards_from(out_dir, split, partition, len(records))
    return records


def verified_prefix(out_dir: Path, split: str, partition: int,
                    plan: Optional[str] = None) -> tuple[list[dict], Optional[str]]:
    """(records of shards 0..k-1 of (split, partition) that are there and match their records (and,
    given `plan`, were written from the partition's current files), the problem of shard k when it is
    there but does not match). Removes nothing."""
    out_dir = Path(out_dir)
    out: list[dict] = []
    while True:
        name = shard_name(split, partition, len(out))
        meta = out_dir / META_DIR / f"{name}.json"
        if not (out_dir / name).is_file() or not meta.is_file():
            return out, None
        try:
            rec = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return out, f"shard {out_dir / name}: its record {meta} is unreadable; {REWRITE}"
        if plan is not None and rec.get("plan") != plan:
            return out, (f"shard {out_dir / name}: written from other files than partition {partition} has now "
                         f"(the corpus was partitioned differently); {REWRITE}")
        problem = check_shard_file(out_dir / name, rec, against="its record", advice=REWRITE)
        if problem is not None:
            return out, problem
        out.append(rec)


def remove_shards_from(out_dir: Path, split: str, partition: int, index: int) -> int:
    """Delete the shards (and their records) of (split, partition) numbered `index` and up; returns how many."""
    out_dir = Path(out_dir)
    n = 0
    prefix = f"{split}-{partition:05d}-"
    for p in sorted(out_dir.glob(f"{prefix}*.tar")) + sorted((out_dir / META_DIR).glob(f"{prefix}*.tar.json")):
        stem = p.name[len(prefix):].split(".", 1)[0]
        if stem.isdigit() and int(stem) >= index:
            p.unlink(missing_ok=True)
            n += int(p.suffix == ".tar")
    return n


def remove_incomplete(out_dir: Path) -> int:
    """Delete temporary files a killed attempt left behind; returns how many."""
    n = 0
    for p in list(Path(out_dir).glob(".*.tmp")) + list((Path(out_dir) / META_DIR).glob(".*.tmp")):
        p.unlink(missing_ok=True)
        n += 1
    return n


def remove_all(out_dir: Path) -> None:
    """Delete the shard stage's own outputs (shards, records, manifest) from `out_dir`."""
    out_dir = Path(out_dir)
    for pattern in ("*.tar", ".*.tmp", MANIFEST):
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)
    meta = out_dir / META_DIR
    if meta.is_dir():
        for p in meta.iterdir():
            p.unlink(missing_ok=True)
        meta.rmdir()


# ---------------------------------------------------------------------------------------------
# Reading


def iter_tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a WebDataset tar held in memory."""
    cur_key: Optional[str] = None
    cur: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            base = ti.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur
                cur_key, cur = key, {}
            f = tf.extractfile(ti)
            assert f is not None
            cur[ext] = f.read()
    if cur_key is not None:
        yield cur_key, cur


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as a .npy file (NumPy's format; the same array gives the same bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: Optional[bytes], dtype: np.dtype, what: str) -> np.ndarray:
    """The 1-D array of `dtype` in a .npy file's bytes, without a copy; ValueError naming `what`."""
    if data is None:
        raise ValueError(f"{what} is missing")
    buf = io.BytesIO(data)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
        np.lib.format.read_magic(buf))
    if read_header is None:
        raise ValueError(f"{what} is not a .npy file of version 1.0 or 2.0")
    shape, fortran, found = read_header(buf, max_header_size=10000)
    if found != np.dtype(dtype) or len(shape) != 1 or fortran:
        raise ValueError(f"{what} holds a {found} array of shape {shape}, not a 1-D {np.dtype(dtype)} one")
    return np.frombuffer(data, dtype=found, count=shape[0], offset=buf.tell())


def read_shard(data: bytes, dtype: np.dtype, name: str = "shard") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(key, tokens, doclens)] of a shard's bytes; ShardError naming `name` when they do not parse."""
    out = []
    try:
        for key, members in iter_tar_samples(data):
            if TOKENS in members or DOCLENS in members:
                tokens = npy_array(members.get(TOKENS), dtype, f"sample {key!r} member {TOKENS}")
                lens = npy_array(members.get(DOCLENS), np.dtype("<u4"), f"sample {key!r} member {DOCLENS}")
            else:  # format v1: raw little-endian arrays
                missing = [m for m in ("tokens", "doclens") if m not in members]
                if missing:
                    raise ValueError(f"sample {key!r} has no {TOKENS} (or v1 {' or '.join(missing)}) member")
                tokens = np.frombuffer(members["tokens"], dtype=dtype)
                lens = np.frombuffer(members["doclens"], dtype="<u4")
            out.append((key, tokens, lens))
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise ShardError(f"shard {name}: not a readable token shard ({e}); {REPAIR}") from None
    return out


def _local_path(base: str, rel: str) -> Optional[Path]:
    """The local file of `rel` under `base`, or None when base is a (non-file) URL."""
    if "://" in base and not base.startswith("file://"):
        return None
    if base.startswith("file://"):
        base = base[len("file://"):]
    return Path(base) / rel


def open_bytes(base: str | Path, rel: str) -> bytes:
    """The bytes of `rel` under a local directory or an fsspec URL."""
    base = str(base)
    local = _local_path(base, rel)
    if local is None:
        import fsspec

        with fsspec.open(base.rstrip("/") + "/" + rel, "rb") as f:
            return f.read()
    return local.read_bytes()


# ---------------------------------------------------------------------------------------------
# Verifying shards against what was recorded when they were written

REPAIR = "rerun the shard stage with --force or restore the file"
REWRITE = "written again from its partition's input"  # what a resumed shard stage does about it


class ShardError(ValueError):
    """A shard that is missing, truncated, damaged or unparsable. The message is one line naming the
    shard and the cause (with both hashes, or both sizes)."""


def shard_problem(name: str, size: int, digest: Optional[str], record: dict, against: str = "manifest",
                  advice: str = REPAIR) -> Optional[str]:
    """Why a shard of `size` bytes (and sha256 `digest`, when known) does not match `record`
    (its manifest entry or its meta record); None when it does. `advice` ends the line."""
    want_size = record.get("bytes")
    if want_size is not None and size != int(want_size):
        how = "truncated" if size < int(want_size) else "longer than written"
        return f"shard {name}: {size} bytes, {against} says {want_size} ({how}); {advice}"
    want = record.get("sha256")
    if digest is not None and want and digest != want:
        return f"shard {name}: sha256 {digest} != {against} {want} (damaged); {advice}"
    return None


def check_shard_file(path: Path, record: dict, against: str = "manifest", advice: str = REPAIR) -> Optional[str]:
    """A local shard file checked against its record: size first (a stat), then sha256 (one streaming
    read). None when it matches; else the one-line problem."""
    try:
        size = Path(path).stat().st_size
        problem = shard_problem(str(path), size, None, record, against, advice)
        if problem is None and record.get("sha256"):
            problem = shard_problem(str(path), size, sha256_file(Path(path)), record, against, advice)
    except FileNotFoundError:
        return f"shard {path}: missing; {advice}"
    except OSError as e:
        return f"shard {path}: unreadable ({e.strerror or e}); {advice}"
    return problem


# (location, sha256, (size, mtime_ns, inode)) of the shards this process has read whole and found to
# match the manifest: each is hashed the first time a process opens it, not on every epoch. A file
# replaced since (another mtime or inode) is checked again.
_verified: set = set()


def read_verified(base: str | Path, record: dict, parse: Optional[Callable[[bytes, str], Any]] = None) -> Any:
    """The shard `record` (a manifest entry: path, bytes, sha256) under `base`, checked against it:
    `parse(bytes, name)` of it, or its bytes when parse is None. Raises ShardError naming the shard:
    missing, truncated (the size is compared first, from a stat, before anything is read or parsed),
    damaged (sha256, expected and actual), or unparsable (parse's ShardError).

    The loader holds a whole shard in memory to parse it (tar members, then a shuffled sample order),
    so the hash is taken over the bytes it read: no second read of the file. The first time a process
    opens a shard the hash runs in a thread while `parse` runs (hashlib releases the GIL), and the
    result is returned only after both agree with the manifest, so a damaged shard's samples are
    never used; when the parse fails on damaged bytes, the hash mismatch is what is reported."""
    base = str(base)
    rel = record["path"]
    local = _local_path(base, rel)
    name = str(local) if local is not None else base.rstrip("/") + "/" + rel
    ident = None
    try:
        if local is not None:
            st = local.stat()
            problem = shard_problem(name, st.st_size, None, record)  # truncation, before any read
            if problem is not None:
                raise ShardError(problem)
            ident = (st.st_size, st.st_mtime_ns, st.st_ino)
            data = local.read_bytes()
        else:
            data = open_bytes(base, rel)
    except FileNotFoundError:
        raise ShardError(f"shard {name}: missing; {REPAIR}") from None
    except OSError as e:
        raise ShardError(f"shard {name}: unreadable ({e.strerror or e}); {REPAIR}") from None
    problem = shard_problem(name, len(data), None, record)  # a URL's size, or a file that changed
    if problem is not None:
        raise ShardError(problem)
    key = (name, record.get("sha256"), ident)
    if key in _verified or not record.get("sha256"):
        return data if parse is None else parse(data, name)
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()), daemon=True)
    hasher.start()
    try:
        out = data if parse is None else parse(data, name)
    except ShardError:
        hasher.join()
        problem = shard_problem(name, len(data), digest[0], record)
        if problem is not None:
            raise ShardError(problem) from None  # damaged bytes that did not parse: say so
        raise
    finally:
        hasher.join()
    problem = shard_problem(name, len(data), digest[0], record)
    if problem is not None:
        raise ShardError(problem)
    _verified.add(key)
    return out


def load_manifest(shard_dir: str | Path) -> dict:
    """The shard dir's manifest.json, checked (ManifestError naming the file when it is damaged)."""
    try:
        raw = open_bytes(shard_dir, MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {shard_dir}: run the shard stage first") from None
    return parse_manifest(raw, f"{str(shard_dir).rstrip('/')}/{MANIFEST}")


def build_manifest(out_dir: Path, *, dtype: np.dtype, tokenizer_info: dict, config: dict,
                   read_counts: dict, per_source: dict, listed: Optional[dict] = None) -> dict:
    """The manifest from the shard records in `out_dir/meta` (no times inside: deterministic).
    `listed`: the reader's lists by name (skipped files, bad records, names not read), each capped."""
    out_dir = Path(out_dir)
    records = []
    for meta in sorted((out_dir / META_DIR).glob("*.tar.json")):
        rec = json.loads(meta.read_text())
        if (out_dir / rec["path"]).is_file():
            records.append(rec)
    records.sort(key=lambda r: (SPLITS.index(r["split"]) if r["split"] in SPLITS else 9, r["partition"], r["index"]))
    splits = {}
    for split in SPLITS:
        rs = [r for r in records if r["split"] == split]
        splits[split] = {k: sum(r[k] for r in rs) for k in ("samples", "docs", "tokens", "bytes")}
        splits[split]["shards"] = len(rs)
    sources = {name: dict(counts, tokens=0, docs_written=0) for name, counts in per_source.items()}
    for r in records:
        for name, c in r["sources"].items():
            s = sources.setdefault(name, {"tokens": 0, "docs_written": 0})
            s["tokens"] += c["tokens"]
            s["docs_written"] += c["docs"]
    shards = [{k: r[k] for k in ("path", "split", "samples", "docs", "tokens", "bytes", "sha256")} for r in records]
    groups: dict[str, dict] = {}  # data.mixture groups: each shard's, and tokens per group and split
    for shard, r in zip(shards, records):
        shard["node"] = r.get("node")  # the node that wrote it (older records: None)
        if r.get("group"):
            shard["group"] = r["group"]
            g = groups.setdefault(r["group"], {split: {"tokens": 0, "shards": 0} for split in SPLITS})
            if r["split"] in g:
                g[r["split"]]["tokens"] += r["tokens"]
                g[r["split"]]["shards"] += 1
    return {
        "format": FORMAT,
        "dtype": dtype_name(dtype),
        "members": {TOKENS: f"token ids: a 1-D {dtype_name(dtype)} NumPy array (.npy)",
                    DOCLENS: "document lengths (each document ends with eos): a 1-D uint32 NumPy array (.npy)"},
        "tokenizer": tokenizer_info,
        "config": config,
        "splits": splits,
        "tokens": sum(r["tokens"] for r in records),
        "counts": read_counts,
        "listed": listed or {},
        "sources": sources,
        "shards": shards,
        "nodes": sorted({s["node"] for s in shards if s["node"]}),
        **({"groups": groups} if groups else {}),
    }
