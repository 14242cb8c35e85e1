"""Cheap listings of what a stage reads, for its fingerprint (see `Stage.inputs` in pipeline/core/stage.py).

A listing says what the inputs are without reading them: for the corpus (`data.sources`) the files
the readers would open, each with its size and modification time; a file that is added, removed,
rewritten or touched changes the listing, so the data stages rerun. Single small files a stage takes
whole (`tokenizer.path`: a SentencePiece model, or a Hugging Face tokenizer's files) are hashed by
content; a checkpoint directory (`model.init_from`) is listed, its small files hashed and its big ones
(weights) taken by size and modification time.

Each function takes the resolved config and returns something JSON-able; the stage fingerprint hashes
it (`xlp.pipeline.core.stage.input_digests`). Nothing here raises for a missing or unreadable input: the listing
records the error (so `xlp status` still works), and the stage itself fails with the readers' message
when it runs.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from xlp import tokenizer as tk
from xlp.pipeline.data.readers import GLOB_CHARS, _hidden, resolve_sources, stdlib_files, stdlib_root

SMALL_FILE_BYTES = 1 << 20  # checkpoint files up to this size are hashed by content; bigger ones by size+mtime

# What fsspec stores report that changes when an object is replaced (S3/GCS/Azure/HTTP name them differently).
_URL_KEYS = ("size", "ETag", "etag", "md5Hash", "crc32c", "content_md5", "checksum", "VersionId", "generation",
             "mtime", "LastModified", "last_modified", "updated", "created", "modified")


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default) if isinstance(cfg, DictConfig) else default
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# The corpus


def corpus(cfg: Any) -> list[dict]:
    """`data.sources`, or with `data.mixture` each group's sources (tagged with the group), one entry
    per source in config order: the files the readers would open, sorted, each with what is cheap to
    know about it."""
    mixture = _cfg_get(cfg, "data.mixture", None)
    if isinstance(mixture, dict) and mixture:  # the groups in config order: which group a file is in
        return [dict(list_source(str(s)), group=name)  # shapes the shards (each group's are apart)
                for name, group in mixture.items() if isinstance(group, dict)
                for s in (group.get("sources") or [])]
    return [list_source(str(s)) for s in list(_cfg_get(cfg, "data.sources", []) or [])]


def list_source(source: str) -> dict:
    """One `data.sources` entry as a listing, by the same rules the readers expand it with."""
    try:
        if source == "stdlib" or source.startswith("stdlib:"):
            return _list_stdlib(source)
        if source.startswith("hf://"):
            return _list_hf(source)
        if "://" in source and not source.startswith("file://"):
            return _list_url(source)
        return _list_local(source)
    except Exception as e:  # noqa: BLE001 (any failure to list is recorded, not raised: see the module doc)
        return {"source": source, "error": _error(e)}


def _list_local(source: str) -> dict:
    """Files, directories, globs and file:// URLs: the readers' own expansion (so what they skip, the
    listing skips), then one stat per file: [path, size, mtime_ns]."""
    files = []
    for ref in resolve_sources([source]):  # raises DataError naming the source when nothing is there
        path = ref.url[len("file://"):] if ref.url.startswith("file://") else ref.url
        try:
            st = os.stat(path)
            files.append([path, st.st_size, st.st_mtime_ns])
        except OSError as e:  # vanished between the listing and the stat
            files.append([path, None, _error(e)])
    return {"source": source, "files": files}


def _list_stdlib(source: str) -> dict:
    """The interpreter's version and its standard library's .py files with their sizes, as paths
    relative to the stdlib root (no mtimes: the same Python installed on another node or in another
    container lists the same)."""
    root = stdlib_root()
    files = [[os.path.relpath(p, root), os.stat(p).st_size] for p in stdlib_files(source.partition(":")[2])]
    return {"source": source, "python": f"{platform.python_implementation()} {platform.python_version()}",
            "files": files}


def _list_url(source: str) -> dict:
    """An fsspec URL (a file, a directory, or a glob there), expanded as the readers do, with what the
    store reports about each object: size and ETag/checksum/version and modification time where it
    gives them. One listing call per source (no request per object)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if any(c in path for c in GLOB_CHARS):
        infos = fs.glob(path, detail=True)
        found = [(p, i) for p, i in infos.items() if i.get("type") == "file"]
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        found = [(p, i) for p, i in infos.items() if not _hidden(p, path) and "__pycache__" not in Path(p).parts]
    elif fs.exists(path):
        found = [(path, fs.info(path))]
    else:
        raise FileNotFoundError(f"no such file or directory: {source}")
    files = [[p, {k: info[k] for k in _URL_KEYS if info.get(k) is not None}] for p, info in sorted(found)]
    return {"source": source, "files": files}


def _list_hf(source: str) -> dict:
    """A Hugging Face dataset: its name and split only. Finding out whether the dataset changed on the
    Hub takes a network request, which deciding what to run must not need: an updated dataset behind
    the same name is NOT seen. Name a revision in the source (or run with --force) to take a new one."""
    name, _, split = source[len("hf://"):].partition(":")
    return {"source": source, "dataset": name, "split": split or "train",
            "note": "name and split only; updates on the Hub are not seen"}


# ---------------------------------------------------------------------------------------------
# Single files and checkpoints


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(spec: Optional[str]) -> Optional[dict]:
    """A single input file: the sha256 of its content (local path or file://); for another fsspec URL,
    what the store reports about it (ETag, size, mtime) without downloading it."""
    if not spec:
        return None
    spec = str(spec)
    try:
        if "://" in spec and not spec.startswith("file://"):
            import fsspec

            fs, path = fsspec.core.url_to_fs(spec)
            info = fs.info(path)
            return {"url": spec, "info": {k: info[k] for k in _URL_KEYS if info.get(k) is not None}}
        path = os.path.expanduser(spec[len("file://"):] if spec.startswith("file://") else spec)
        return {"path": os.path.abspath(path), "sha256": sha256_file(path)}
    except Exception as e:  # noqa: BLE001
        return {"path": spec, "error": _error(e)}


def tree_identity(path: str | os.PathLike, small: int = SMALL_FILE_BYTES) -> dict:
    """A file or directory (a checkpoint): every file's relative path and size, plus the sha256 of the
    files up to `small` bytes (configs, metadata, small weights) and the mtime_ns of bigger ones
    (hashing gigabytes of weights on every `xlp status` would cost seconds to minutes)."""
    root = Path(os.path.expanduser(str(path)))

    def entry(p: Path, rel: str) -> list:
        st = p.stat()
        return [rel, st.st_size, sha256_file(p) if st.st_size <= small else st.st_mtime_ns]

    try:
        if root.is_file():
            return {"path": str(root.resolve()), "files": [entry(root, root.name)]}
        if not root.is_dir():
            raise FileNotFoundError(f"no such file or directory: {root}")
        files = []
        for d, dirs, names in os.walk(root):
            dirs.sort()
            for n in sorted(names):
                p = Path(d) / n
                files.append(entry(p, str(p.relative_to(root))))
        return {"path": str(root.resolve()), "files": files}
    except Exception as e:  # noqa: BLE001
        return {"path": str(root), "error": _error(e)}


def tokenizer_file(cfg: Any) -> Optional[dict]:
    """`tokenizer.path`, when set: the content hash of the SentencePiece model it names, or, for a Hugging
    Face tokenizer (a tokenizer.json, or a folder holding one), of each file the tokenizer is read from
    (tokenizer.json and the special-token configs beside it)."""
    spec = _cfg_get(cfg, "tokenizer.path")
    if not spec or ("://" in str(spec) and not str(spec).startswith("file://")):
        return file_identity(spec)
    path = os.path.expanduser(str(spec)[len("file://"):] if str(spec).startswith("file://") else str(spec))
    try:
        if not os.path.isdir(path) and not tk.is_hf(path):
            return file_identity(spec)  # a SentencePiece model: as before (fingerprints of old runs hold)
        return {"path": os.path.abspath(path),
                "files": [[p.name, sha256_file(p)] for p in tk.source_files(path)]}
    except Exception as e:  # noqa: BLE001
        return {"path": str(spec), "error": _error(e)}


def init_from(cfg: Any) -> Optional[dict]:
    """`model.init_from` ("hf:PATH" or "native:PATH"), when set: the checkpoint's listing (tree_identity).
    A PATH that is not on this machine (a Hub model id) is taken by its name only."""
    spec = _cfg_get(cfg, "model.init_from")
    if not spec:
        return None
    scheme, _, path = str(spec).partition(":")
    if not os.path.exists(os.path.expanduser(path)):
        return {"spec": str(spec), "note": "not a local path: the name only"}
    return {"scheme": scheme, **tree_identity(path)}
