"""The shard stage's index, `shard/manifest.json`, checked where it is read.

A manifest that is truncated, not JSON, or lacks what its readers use (the token dtype, the list of
shards with their path, split and tokens) fails with ManifestError naming the file and what is wrong,
instead of a KeyError or a JSONDecodeError deep in a training rank. `xlp status` and `xlp run` check it
too (the shard stage's `check`, for markers written before the marker recorded the manifest's sha256):
the shard stage then reads as failed and the next run redoes its bookkeeping, keeping the shards.
Imports no NumPy: `xlp status` runs this.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from xlp.pipeline.core.layout import MANIFEST
from xlp.pipeline.core.stage import json_cut_short

DTYPES = ("uint16", "uint32")
REWRITE = ("run `xlp run CONFIG` again: the shard stage keeps the shards that match their records and "
           "writes the manifest again")


class ManifestError(ValueError):
    """A manifest.json that is not one the shard stage wrote; the message names the file."""


def parse_manifest(raw: bytes, where: str) -> dict:
    """The manifest in `raw` (the bytes of `where`), checked; ManifestError naming `where` and the fix."""
    problem, data = _parse(raw)
    if problem is not None:
        raise ManifestError(f"{where} is damaged: {problem}; {REWRITE}")
    return data


def manifest_problem(shard_dir: Path) -> Optional[str]:
    """What is wrong with `shard_dir`'s manifest.json, or None (the shard stage's Stage.check)."""
    path = Path(shard_dir) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:
        return f"{path} is unreadable ({e.strerror or e})"
    problem, _ = _parse(raw)
    return None if problem is None else f"{path} is damaged: {problem}"


def _parse(raw: bytes) -> tuple[Optional[str], Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else "truncated" if json_cut_short(text) else "not JSON"
        return f"{what}: {e.msg} at character {e.pos} of {len(text)}", None
    return manifest_data_problem(data), data


def manifest_data_problem(data: Any) -> Optional[str]:
    """What makes `data` not a manifest the shard stage writes (pipeline/data/shards.py build_manifest)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if data.get("dtype") not in DTYPES:
        return f"its dtype is {data.get('dtype')!r}, not one of {', '.join(DTYPES)}"
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        return "it lists no shards" if shards == [] else "no list of shards in it"
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard entry {i} is a {type(shard).__name__}"
        for key, types in (("path", str), ("split", str), ("tokens", int)):
            if not isinstance(shard.get(key), types):
                return f"shard entry {i} has no {key}"
        if shard.get("sha256") is not None and not isinstance(shard["sha256"], str):
            return f"shard entry {i} ({shard['path']}) has a sha256 that is not a string"
    return None
