"""Whether the shards can give what training asks of them, checked before any rank trains.

    reason = val_split_check(shard_dir, groups=[None], seq_len=256, world_size=8)
    # None: every group's val split gives validation rows; a string: validation is skipped on purpose
    # (the shards were made with data.val_fraction=0); ValueError: a val split with no row at all

Validation reads each val split (each data.mixture group's) as one stream per rank
(xlp.pipeline.data.loader.ShardLoader); a stream of t tokens gives (t - 1) // data.seq_len whole rows.
A split none of whose streams holds a row would validate nothing (0/0: val/loss nan), so it is refused
before training, naming the group, a data.seq_len that works and data.val_fraction (a value that works,
from the train documents the manifest's `near_val` lists as the next to go to val). The train stage
runs this before it launches the ranks (local launcher: it knows their number), and every rank runs it
again (Slurm, Ray: the rank count is known there first).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from xlp.pipeline.data.loader import ShardLoader
from xlp.pipeline.data.shards import load_manifest


def val_split_check(shard_dir: str | Path, *, groups: list[Optional[str]], seq_len: int,
                    world_size: int) -> Optional[str]:
    """None when each group's val split (a group None: the whole val split) gives at least one row on
    `world_size` ranks; the reason validation is skipped when the shards hold no val split because
    data.val_fraction was 0. Raises ValueError naming the group, data.val_fraction and what works
    when a val split has no row."""
    manifest = load_manifest(str(shard_dir))
    val_fraction = (manifest.get("config") or {}).get("val_fraction")
    shards = [s for s in manifest["shards"] if s["split"] == "val"]
    if not shards and val_fraction in (None, 0, 0.0):  # no val split, as asked (or a manifest that does not say)
        return f"no val split (the shards were made with data.val_fraction={val_fraction})"
    near = manifest.get("near_val") or {}
    for group in groups:
        mine = [s for s in shards if group is None or s.get("group", "") == group]
        problem = _no_row(shard_dir, mine, group, seq_len, world_size, val_fraction, near.get(group or ""))
        if problem:
            raise ValueError(problem)
    return None


def val_fraction_that_works(near: Optional[list], val_tokens: int, need: int) -> Optional[float]:
    """The smallest data.val_fraction (3 decimals) that moves enough train documents into the val split
    for it to hold `need` tokens, from the manifest's near_val (the train documents with the smallest
    split keys, with their tokens); None when they do not tell."""
    total = val_tokens
    for key, tokens in near or []:
        if tokens is None:
            return None
        total += int(tokens)
        if total >= need:
            fraction = math.floor(key * 1000 + 1) / 1000  # above the key: that document goes to val
            return fraction if fraction < 1.0 else None
    return None


def _no_row(shard_dir: str | Path, shards: list[dict], group: Optional[str], seq_len: int, world_size: int,
            val_fraction, near: Optional[list]) -> Optional[str]:
    tokens = sum(int(s["tokens"]) for s in shards)
    if tokens >= world_size * (seq_len + 1):  # some stream holds a whole row (pigeonhole): no need to read
        return None
    streams = []
    if shards:
        streams = ShardLoader(shard_dir, split="val", seq_len=seq_len, batch_size=1, world_size=world_size,
                              group=group, epochs=1).stream_tokens()
        if any((t - 1) // seq_len >= 1 for t in streams):
            return None
    which = f"data.mixture group {group!r}'s val split" if group else "the val split"
    have = (f"{sum(int(s['samples']) for s in shards)} sample(s), {tokens} tokens" if shards
            else "no document (none of its documents hashed into it)")
    spread = ""
    if shards and world_size > 1 and tokens > seq_len:
        spread = f", dealt to {world_size} ranks (the most one rank gets: {max(streams)} tokens)"
    fixes = []
    best = max(streams, default=0)
    if best >= 2:
        fixes.append(f"data.seq_len <= {best - 1}")
    # val tokens enough for a row on some rank whatever their spread (pigeonhole); data.val_fraction is
    # part of the shard stage's fingerprint, so the shards are made again
    enough = val_fraction_that_works(near, tokens, world_size * (seq_len + 1))
    fixes.append(f"data.val_fraction={enough} (now {val_fraction}; the shard stage runs again)" if enough
                 else f"a larger data.val_fraction (now {val_fraction})")
    fixes.append("more data in it")
    return (f"{which} gives no validation row: it has {have}{spread}, and a row takes data.seq_len + 1 = "
            f"{seq_len + 1} tokens. Set {', or '.join(fixes)} (data.val_fraction=0 trains without validation, "
            "and without the eval stage)")
