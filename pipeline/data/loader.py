"""WebDataset token shards -> packed (B, S) batches of one split, split over ranks and workers.

    loader = ShardLoader("runs/demo/shard", split="val", seq_len=256, batch_size=8,
                         rank=rank, world_size=world, num_workers=2, seed=0)
    for batch in loader.one_epoch():                  # validation: exactly one pass
        batch["input_ids"], batch["targets"], batch["doc_starts"]   # (B, S) each
    for step, batch in zip(range(steps), loader): ... # endless epochs

Training reads the global row order (xlp.pipeline.data.order.GlobalLoader), which is built from this
module's plan, segments and row packing (_Plan, _segments, _Rows); ShardLoader is the validation and
evaluation reader (and the benchmarks'). Each iter() of a ShardLoader starts at its first batch.

How data is split and ordered (all of it a function of seed and epoch, nothing else):
- There are W = world_size * max(1, num_workers) streams; stream g = rank * max(1, num_workers) + w.
- Each epoch the split's shards are permuted by (seed, epoch), and the samples inside a shard by
  (seed, epoch, shard). With at least W shards, stream g reads shards g, g+W, ... of that order; with
  fewer (a small val split), every stream reads every shard and keeps every W-th sample. Either way
  each sample is read by exactly one stream per epoch.
- A stream concatenates its samples' tokens (documents end with <eos>) and cuts rows of S+1 tokens
  that overlap by one: input_ids = row[:-1], targets = row[1:]. doc_starts marks each document's first
  token, and position 0 of every row. In endless mode a stream runs on into the next epoch; with
  `epochs=n` it stops after n epochs and drops its last incomplete batch (`partial=True`: yields it,
  with fewer rows; the rows are always whole).
- A DataLoader worker makes whole batches from its own stream; batches arrive round-robin from the
  workers.

Shards are verified: the first time a process opens a shard, its size (before reading) and sha256
(over the bytes read) are compared with the manifest (xlp.pipeline.data.shards.read_verified). A missing,
truncated, damaged or unparsable shard raises ShardError, one line naming the shard and the expected
and actual size or hash, before any of its samples is used. With `on_error="skip"` (data.on_error)
the shard is left out instead: a warning names it, `skipped_shards` counts it, and it contributes no
samples; every other shard's samples stay where they were in their stream's order (the plan does not
change), so the global order's resume from a checkpoint still reproduces the batches exactly.
"""
from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xlp.pipeline.data.shards import ShardError, load_manifest, read_shard, read_verified

log = logging.getLogger(__name__)
ON_ERROR = ("fail", "skip")

Pos = tuple[int, int, int, int]  # (epoch, piece index in the stream's epoch plan, sample index, token offset)


class _Plan:
    """Which samples a stream reads, in which order (pure function of the manifest, seed, epoch)."""

    def __init__(self, shard_dir: str, shards: list[dict], dtype: np.dtype, n_streams: int, seed: int,
                 shuffle: bool, on_error: str = "fail"):
        self.shard_dir, self.shards, self.dtype = shard_dir, shards, dtype
        self.n_streams, self.seed, self.shuffle = n_streams, seed, shuffle
        self.on_error = on_error
        self._cache: tuple[Optional[int], list] = (None, [])
        self.bad: dict[int, str] = {}  # shard index -> its problem (skipped; not read again)
        self.notes: list[tuple[str, str]] = []  # (shard path, problem) skipped since the last take_notes()

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n).tolist()

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.shards[shard]["samples"]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, shard, 0x5A]).permutation(n)

    @property
    def shard_level(self) -> bool:
        return len(self.shards) >= self.n_streams

    def pieces(self, g: int, epoch: int) -> list[tuple[int, Optional[int]]]:
        """The stream's shards this epoch: (shard index, global sample offset or None for 'all')."""
        order = self.shard_order(epoch)
        if self.shard_level:
            return [(s, None) for s in order[g::self.n_streams]]
        out, offset = [], 0
        for s in order:
            out.append((s, offset))
            offset += self.shards[s]["samples"]
        return out

    def load(self, shard: int) -> Optional[list[tuple[str, np.ndarray, np.ndarray]]]:
        """The shard's samples, verified against the manifest; None when it is bad and skipped."""
        if shard in self.bad:
            return None
        if self._cache[0] != shard:
            rec = self.shards[shard]
            try:
                samples = read_verified(self.shard_dir, rec, lambda data, name: read_shard(data, self.dtype, name))
            except ShardError as e:
                if self.on_error != "skip":
                    raise
                self.bad[shard] = str(e)
                self.notes.append((rec["path"], str(e)))
                return None
            self._cache = (shard, samples)
        return self._cache[1]

    def take_notes(self) -> list[tuple[str, str]]:
        notes, self.notes = self.notes, []
        return notes

    def kept(self, g: int, epoch: int, piece: tuple[int, Optional[int]]) -> np.ndarray:
        """Indices (in the shard) of the samples of `piece` stream g reads, in reading order."""
        shard, offset = piece
        order = self.sample_order(epoch, shard)
        if offset is None:
            return order
        j = np.arange(len(order))
        return order[(offset + j) % self.n_streams == g]

    def stream_tokens(self, g: int, epoch: int) -> int:
        if self.shard_level:
            return sum(self.shards[s]["tokens"] for s, _ in self.pieces(g, epoch))
        total = 0
        for piece in self.pieces(g, epoch):
            samples = self.load(piece[0])
            if samples is not None:
                total += sum(len(samples[i][1]) for i in self.kept(g, epoch, piece))
        return total


def _segments(plan: _Plan, g: int, pos: Pos, last_epoch: Optional[int]) -> Iterator[tuple[np.ndarray, np.ndarray, Pos]]:
    """(tokens, doc_start flags, position of tokens[0]) of stream g from `pos` onward."""
    epoch, piece0, sample0, off0 = pos
    first = True
    while last_epoch is None or epoch <= last_epoch:
        pieces = plan.pieces(g, epoch)
        produced = False
        for pi in range(piece0 if first else 0, len(pieces)):
            kept = plan.kept(g, epoch, pieces[pi])
            if not len(kept):
                continue
            samples = plan.load(pieces[pi][0])
            if samples is None:  # bad and skipped (on_error="skip"): the plan stays as it is
                continue
            start_si = sample0 if first and pi == piece0 else 0
            for si in range(start_si, len(kept)):
                _, tokens, lens = samples[kept[si]]
                starts = np.zeros(len(tokens), dtype=bool)
                starts[0] = True
                starts[np.cumsum(lens[:-1], dtype=np.int64)] = True
                off = off0 if first and pi == piece0 and si == start_si else 0
                first = False
                produced = True
                yield tokens[off:].astype(np.int64), starts[off:], (epoch, pi, si, off)
        if not produced and last_epoch is None and not _stream_has_data(plan, g, epoch):
            raise ValueError(
                f"loader stream {g} of {plan.n_streams} gets no samples in epoch {epoch}: the split has "
                f"{sum(s['samples'] for s in plan.shards)} samples in {len(plan.shards)} shards; use fewer "
                "ranks/workers or more data (smaller data.sample_tokens)")
        if not produced and last_epoch is None and plan.bad:
            skipped = sorted({plan.shards[s]["path"] for s, _ in pieces if s in plan.bad})
            raise ShardError(f"loader stream {g} of {plan.n_streams}: every shard it reads in epoch {epoch} is "
                             f"damaged and skipped (data.on_error=skip): {', '.join(skipped)}")
        first = False
        epoch += 1


def _stream_has_data(plan: _Plan, g: int, epoch: int) -> bool:
    return any(len(plan.kept(g, epoch, p)) for p in plan.pieces(g, epoch))


class _Rows:
    """The one row packing (ShardLoader's streams and the global order's, xlp.pipeline.data.order): a
    stream's segments cut into rows of S+1 tokens that overlap by one (all but a row's last token are
    consumed: that one starts the next row). `index` counts the rows taken; `position()` is where the
    next row starts, so a reader can be restarted there. Segments are pulled only as a row needs them."""

    def __init__(self, segments: Iterator[tuple[np.ndarray, np.ndarray, Pos]], seq_len: int, index: int = 0,
                 pos: Pos = (0, 0, 0, 0)):
        self.S, self.index = seq_len, index
        self._segments = segments
        self._start = pos
        self._buf: deque = deque()
        self._n = 0

    def position(self) -> Pos:
        return self._buf[0][2] if self._buf else self._start

    def _next_segment(self) -> Optional[tuple[np.ndarray, np.ndarray, Pos]]:
        return next(self._segments, None)

    def take(self, row: Optional[np.ndarray] = None, starts: Optional[np.ndarray] = None) -> bool:
        """The next row: its S+1 tokens into `row` and doc-start flags into `starts` (int64 and bool
        arrays of S+1), or skipped without building it when they are None. False (nothing taken) when
        the segments end before a whole row (a stream of `epochs=n`: its last partial row is dropped)."""
        need = self.S + 1
        while self._n < need:
            seg = self._next_segment()
            if seg is None:
                return False
            if len(seg[0]):
                self._buf.append(seg)
                self._n += len(seg[0])
        if row is not None and starts is not None:
            k = 0
            for t, st, _ in self._buf:
                n = min(len(t), need - k)
                row[k:k + n] = t[:n]
                starts[k:k + n] = st[:n]
                k += n
                if k == need:
                    break
        c = self.S  # all but the row's last token: it starts the next row
        while c:
            t, st, p = self._buf[0]
            if len(t) <= c:
                self._buf.popleft()
                c -= len(t)
                self._n -= len(t)
            else:
                self._buf[0] = (t[c:], st[c:], (p[0], p[1], p[2], p[3] + c))
                self._n -= c
                c = 0
        self.index += 1
        return True


class _Streams(IterableDataset):
    """Each DataLoader worker (or the main process) yields (batch, skipped shards noticed since its last
    item, error). A worker passes its ShardError on as the item's `error` (torch would re-raise it with
    the worker's traceback pasted into the message); skip notes ride on the next batch rather than
    taking a batch's place in the workers' round-robin order, so that skipping does not reorder the
    other batches."""

    def __init__(self, loader: "ShardLoader", last_epoch: Optional[int], start_epoch: int):
        super().__init__()
        self.loader = loader
        self.last_epoch = last_epoch
        self.start_epoch = start_epoch

    def __iter__(self):
        L = self.loader
        info = get_worker_info()
        g = L.rank * max(1, L.num_workers) + (info.id if info is not None else 0)
        plan = L._plan()
        B, S = L.batch_size, L.seq_len
        rows = _Rows(_segments(plan, g, (self.start_epoch, 0, 0, 0), self.last_epoch), S)
        try:
            while True:
                x = np.empty((B, S + 1), dtype=np.int64)
                d = np.empty((B, S + 1), dtype=bool)
                n = 0
                while n < B and rows.take(x[n], d[n]):
                    n += 1
                if n < B:  # the stream ended: its last incomplete batch is dropped, or kept (L.partial)
                    if not (L.partial and n):
                        break
                    x, d = x[:n], d[:n]
                xt = torch.from_numpy(x)
                doc_starts = torch.from_numpy(d[:, :S].copy())
                doc_starts[:, 0] = True
                batch = {"input_ids": xt[:, :-1].contiguous(), "targets": xt[:, 1:].contiguous(),
                         "doc_starts": doc_starts}
                yield batch, plan.take_notes(), None
                if n < B:
                    break
        except Exception as e:  # (not `except ShardError`: that name may be gone when a generator
            if info is None or not isinstance(e, ShardError):  # is closed at interpreter exit)
                raise
            yield None, plan.take_notes(), str(e)
            return
        if plan.notes:  # skipped after this stream's last whole batch (epochs=n): still reported
            yield None, plan.take_notes(), None


class ShardLoader:
    """Packed (B, S) batches from the shard stage's output; see the module docstring."""

    def __init__(self, shard_dir: str | Path, *, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, epochs: Optional[int] = None,
                 shuffle: bool = True, pin_memory: bool = False, prefetch_factor: int = 4,
                 on_error: str = "fail", group: Optional[str] = None, partial: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None (endless) or >= 1, got {epochs}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error is {on_error!r}; valid values: {', '.join(ON_ERROR)}")
        self.on_error = on_error
        self.skipped: dict[str, str] = {}  # shard path -> why it was skipped (on_error="skip")
        self.shard_dir = str(shard_dir)
        self.split, self.seq_len, self.batch_size = split, int(seq_len), int(batch_size)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.seed, self.epochs, self.shuffle = int(seed), epochs, shuffle
        # with `epochs`: a stream's last incomplete batch (fewer rows) is yielded, not dropped (validation
        # of a split smaller than a batch)
        self.partial = partial
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.manifest = load_manifest(self.shard_dir)
        self.group = group  # a data.mixture group: only its shards (None: every shard of the split)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split
                       and (group is None or s.get("group", "") == group)]
        if not self.shards:
            splits = sorted({s["split"] for s in self.manifest["shards"]})
            which = f"{split!r}" + (f" (mixture group {group!r})" if group is not None else "")
            raise ValueError(f"no {which} shards in {self.shard_dir} (splits there: {splits})")
        self.dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[self.manifest["dtype"]])
        self.tokens = sum(s["tokens"] for s in self.shards)
        self._start_epoch = 0

    @property
    def n_streams(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def _plan(self) -> _Plan:
        return _Plan(self.shard_dir, self.shards, self.dtype, self.n_streams, self.seed, self.shuffle, self.on_error)

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        last_epoch = None if self.epochs is None else self._start_epoch + self.epochs - 1
        ds = _Streams(self, last_epoch, self._start_epoch)
        if self.num_workers == 0:
            it: Any = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                 prefetch_factor=self.prefetch_factor, persistent_workers=False))
        for batch, notes, error in it:
            for path, problem in notes:
                self._note_skipped(path, problem)
            if error is not None:
                raise ShardError(error)
            if batch is None:
                continue
            yield batch

    def _note_skipped(self, path: str, problem: str) -> None:
        if path not in self.skipped:
            self.skipped[path] = problem
            log.warning("skipped (data.on_error=skip): %s", problem)

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards this loader has skipped as bad (on_error="skip")."""
        return len(self.skipped)

    def one_epoch(self, epoch: int = 0) -> "ShardLoader":
        """A fresh loader over exactly one epoch (`epoch` picks the shuffle), e.g. for validation."""
        other = ShardLoader(self.shard_dir, split=self.split, seq_len=self.seq_len, batch_size=self.batch_size,
                            rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                            seed=self.seed, epochs=1, shuffle=self.shuffle, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor, on_error=self.on_error, group=self.group,
                            partial=self.partial)
        other._start_epoch = epoch
        return other

    def epoch_batches(self, rank: Optional[int] = None, epoch: int = 0) -> int:
        """Batches `rank` (default: this one) gets from one epoch in `epochs=1` mode."""
        rank = self.rank if rank is None else rank
        nw = max(1, self.num_workers)
        plan = self._plan()
        total = 0
        for local in range(nw):
            t = plan.stream_tokens(rank * nw + local, epoch)
            rows = (t - 1) // self.seq_len if t > 1 else 0
            total += rows // self.batch_size
        for path, problem in plan.take_notes():  # shards it had to read (fewer shards than streams)
            self._note_skipped(path, problem)
        return total

    def stream_tokens(self, epoch: int = 0) -> list[int]:
        """Tokens each stream (every rank's and worker's) reads in one epoch; a stream of t tokens gives
        (t - 1) // seq_len rows. Reads the shards when there are fewer than streams."""
        plan = self._plan()
        out = [plan.stream_tokens(g, epoch) for g in range(self.n_streams)]
        for path, problem in plan.take_notes():
            self._note_skipped(path, problem)
        return out

    def common_epoch_batches(self, epoch: int = 0) -> int:
        """The fewest batches any rank gets from one epoch: iterate that many on every rank so that
        collective ops stay in step (e.g. `itertools.islice(loader.one_epoch(), n)`)."""
        return min(self.epoch_batches(r, epoch) for r in range(self.world_size))

    def __repr__(self) -> str:
        return (f"ShardLoader({self.shard_dir!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"num_workers={self.num_workers}, shards={len(self.shards)}, tokens={self.tokens})")


def shards_skipped_everywhere(loader: ShardLoader) -> int:
    """Distinct shards skipped as bad by `loader` on any rank (a collective when torch.distributed is
    initialized: call it on every rank)."""
    import torch.distributed as dist

    names = set(loader.skipped)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(names))
        names = {n for g in gathered for n in g}
    return len(names)
