"""The global order of training rows, and the loader that hands each rank its rows of it.

    loader = GlobalLoader("runs/demo/shard", seq_len=256, micro_batch_size=8, rows_per_step=G, rank=r,
                          world_size=W, streams=8, seed=0, mixture=None)   # None: one group
    for batch in loader:    # (B, S) input_ids, targets, doc_starts; (B,) rows (global indices), groups;
        ...                 # row_hash: the sum of the rows' 32-bit hashes (row_hashes)
    state = loader.global_state(all_gather(loader.snapshots()))  # the same on every rank
    other = GlobalLoader(..., world_size=M); other.load_global_state(state)  # continues on M ranks

What row comes when is a function of (seed, shards, seq_len, streams, mixture, global row index) and
nothing else: not of the number of ranks, loader workers or the micro-batch split.

- Each mixture group (one group, "", without `data.mixture`) reads its own train shards as `streams`
  endless streams (xlp.pipeline.data.loader's plan with n_streams=streams: shuffled by (seed, epoch), a
  stream reads every streams-th shard, or every streams-th sample when there are fewer shards); a
  group with fewer train samples than `streams` is read as one stream per sample (`group_streams`). A
  stream is cut into rows of S+1 tokens overlapping by one by the loader's row packing (_Rows, the
  same code ShardLoader packs with).
- Global row i belongs to a group chosen by weight (`Apportioner`: the group furthest below its share
  of the rows so far, so every prefix of the run holds each group within one row of its weight); the
  q-th row of group g is row q // streams of its stream q % streams.
- A step takes the next G = micro_batch_size x grad_accum x ranks global rows; rank r of W takes the
  rows i = r, r+W, r+2W, ... of them, in order, in micro-batches of micro_batch_size. G is a multiple
  of W, so a rank's row sequence does not depend on grad_accum, and the rows of step s are global rows
  [s*G, (s+1)*G) whatever W is.
- A rank advances a stream only to the rows it takes (lazily, skipping the others without building
  them): with W dividing `streams` and one group, rank r reads only the streams r, r+W, ... . With
  DataLoader workers, worker w builds the rank's micro-batches w, w + num_workers, ... the same way.
- Shards are verified as in ShardLoader (size, sha256; data.on_error=skip leaves a bad one out, named
  and counted). A group's streams share one cache of parsed shards per process.

Resume: the state is the global rows consumed, the apportioner's counts, and for each stream a
(stream row, position) no further than the rows consumed; every rank's snapshots are merged
(`merge_snapshots`), so the state is rank-independent and loads on any world size (a stream restarts
at its position and skips forward to the row it needs).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xlp.pipeline.data.loader import ON_ERROR, Pos, _Plan, _Rows, _segments
from xlp.pipeline.data.shards import load_manifest

STATE_VERSION = 1
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The mixture: groups, weights, phases


@dataclass(frozen=True)
class Mixture:
    """Group names (in config order) and their weights per phase: phases[k] = (first step, weights)."""

    groups: tuple[str, ...]
    phases: tuple[tuple[int, tuple[float, ...]], ...]

    @staticmethod
    def one_group() -> "Mixture":
        return Mixture(groups=("",), phases=((0, (1.0,)),))

    @staticmethod
    def from_config(mixture: Optional[dict], phases: Optional[list]) -> "Mixture":
        """From `data.mixture` ({name: {sources, weight}}) and `data.mixture_phases`
        ([{step, weights: {name: weight}}]), already validated (xlp.pipeline.core.schema.data)."""
        if not mixture:
            return Mixture.one_group()
        names = tuple(mixture)
        out = [(0, _normalised([float(mixture[n].get("weight", 1.0)) for n in names]))]
        for p in sorted(phases or [], key=lambda p: int(p["step"])):
            w = dict(p["weights"])
            out.append((int(p["step"]), _normalised([float(w.get(n, 0.0)) for n in names])))
        return Mixture(groups=names, phases=tuple(out))

    @staticmethod
    def describe(phases: list) -> str:
        return "; ".join(f"from step {max(1, start)}: " + ", ".join(f"{g} {w:.2f}" for g, w in weights.items())
                         for start, weights in phases)

    def to_json(self) -> list:
        """[[first step, {group: weight}], ...]: what a checkpoint records."""
        return [[start, dict(zip(self.groups, weights))] for start, weights in self.phases]


def _normalised(weights: list[float]) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(w / total for w in weights)


@dataclass
class Apportioner:
    """Which group each global row belongs to. In a phase, row n (counted from the phase's first row)
    goes to the group with the largest deficit weight*(n+1) - rows_in_phase (ties: the first group),
    so each group stays within one row of its share. Deterministic; the state is small and JSON."""

    mixture: Mixture
    rows_per_step: int
    row: int = 0  # global rows assigned so far
    phase_start: int = 0  # global row where the current phase began
    in_phase: list[int] = field(default_factory=list)  # rows of each group since phase_start
    totals: list[int] = field(default_factory=list)  # rows of each group since row 0

    def __post_init__(self) -> None:
        n = len(self.mixture.groups)
        self.in_phase = self.in_phase or [0] * n
        self.totals = self.totals or [0] * n
        # a phase "from step S on" begins with step S's rows (steps count from 1)
        self._starts = [max(0, s - 1) * self.rows_per_step for s, _ in self.mixture.phases]
        self._weights = self.mixture.phases[0][1]
        self._sync_phase()

    def _sync_phase(self) -> None:
        """The phase of self.row; entering a later phase than the recorded one restarts its counts."""
        k = max(i for i, s in enumerate(self._starts) if s <= self.row)
        start = self._starts[k]
        self._weights = self.mixture.phases[k][1]
        if start > self.phase_start:
            self.phase_start, self.in_phase = start, [0] * len(self.in_phase)
        self._next_start = self._starts[k + 1] if k + 1 < len(self._starts) else None

    def next(self) -> int:
        """The group of global row self.row; advances."""
        if self._next_start is not None and self.row >= self._next_start:
            self._sync_phase()
        n = self.row - self.phase_start
        best, best_deficit = 0, -1e300
        for g, w in enumerate(self._weights):
            if w <= 0.0:
                continue
            deficit = w * (n + 1) - self.in_phase[g]
            if deficit > best_deficit + 1e-12:
                best, best_deficit = g, deficit
        self.in_phase[best] += 1
        self.totals[best] += 1
        self.row += 1
        return best

    def advance(self, n: int) -> None:
        """Assign the next n rows (one group: counted, not walked)."""
        if len(self.mixture.groups) == 1:
            self.row += n
            self.in_phase[0] += n
            self.totals[0] += n
            return
        for _ in range(n):
            self.next()

    def state(self) -> dict:
        return {"row": self.row, "phase_start": self.phase_start, "in_phase": list(self.in_phase),
                "totals": list(self.totals)}

    @staticmethod
    def restored(mixture: Mixture, rows_per_step: int, state: Optional[dict]) -> "Apportioner":
        if not state:
            return Apportioner(mixture, rows_per_step)
        return Apportioner(mixture, rows_per_step, row=int(state["row"]), phase_start=int(state["phase_start"]),
                           in_phase=[int(x) for x in state["in_phase"]], totals=[int(x) for x in state["totals"]])


# ---------------------------------------------------------------------------------------------
# One stream of one group, cut into rows lazily


class _SharedPlan(_Plan):
    """A stream's plan whose parsed shards live in a cache shared by the group's streams in this
    process: with fewer shards than streams every stream reads every shard (each keeps its own
    samples), and the shard is read and parsed once, not once per stream. The cache holds up to
    `capacity` shards (streams + 1: each stream's current one, and one more)."""

    def __init__(self, *args, shared: OrderedDict, capacity: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared, self.capacity = shared, capacity

    def load(self, shard: int):
        if shard in self.bad:
            return None
        samples = self.shared.get(shard)
        if samples is not None:
            self.shared.move_to_end(shard)
            return samples
        samples = super().load(shard)
        self._cache = (None, [])  # held in the shared cache only
        if samples is not None:
            self.shared[shard] = samples
            while len(self.shared) > self.capacity:
                self.shared.popitem(last=False)
        return samples


class _Stream(_Rows):
    """Rows of S+1 tokens (overlapping by one) of endless stream `g` of a plan, packed by _Rows; `index`
    is the next row's number and `position()` where it starts, so a reader can be restarted there."""

    def __init__(self, plan: _Plan, g: int, seq_len: int, index: int = 0, pos: Pos = (0, 0, 0, 0)):
        super().__init__(_segments(plan, g, pos, None), seq_len, index, pos)
        self.plan, self.g = plan, g

    def _next_segment(self):
        try:
            return super()._next_segment()
        except ValueError as e:
            if "gets no samples" not in str(e):
                raise
            raise ValueError(f"{e} (here: data.streams={self.plan.n_streams} streams per mixture group; "
                             "lower data.streams)") from None

    def seek(self, index: int) -> None:
        """Skip forward to row `index` (never back)."""
        while self.index < index:
            self.take()


# ---------------------------------------------------------------------------------------------
# The loader


_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
_hash_weights: dict[int, np.ndarray] = {}


def row_hashes(index: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """32-bit hashes of global rows (their indices and tokens, (n, S+1)), as uint64. A global batch's
    hash is the sum over its rows: the same however the rows are split over ranks and micro-batches,
    and exact when summed in float64 (the trainer's all-reduce) for up to 2**21 rows a step. A fixed
    random linear map of the tokens (mod 2**64), then the index, mixed (an equality check, not crypto;
    array arithmetic on uint64 wraps around silently)."""
    n = rows.shape[1]
    weights = _hash_weights.get(n)
    if weights is None:
        weights = _hash_weights[n] = np.random.default_rng([0x4A5, n]).integers(1, 2**63, size=n, dtype=np.uint64)
    h = np.ascontiguousarray(rows, dtype=np.int64).view(np.uint64) @ weights
    h ^= np.asarray(index, dtype=np.uint64) * _HASH_MUL
    h ^= h >> np.uint64(29)
    h *= _HASH_MUL
    h ^= h >> np.uint64(32)
    return h & np.uint64(0xFFFFFFFF)


def row_hash(index: int, tokens: np.ndarray) -> int:
    """The hash of one global row (row_hashes)."""
    return int(row_hashes(np.asarray([index]), np.asarray(tokens, dtype=np.int64)[None, :])[0])


class _RankRows(IterableDataset):
    """Micro-batches t = worker, worker + num_workers, ... of this rank from global row `start` on.
    Yields (t, batch, stream snapshots {(group, stream): (row, position)} after building it)."""

    def __init__(self, loader: "GlobalLoader", start: dict):
        super().__init__()
        self.loader, self.start = loader, start

    def __iter__(self):
        L = self.loader
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        order = Apportioner.restored(L.mixture, L.rows_per_step, self.start["apportioner"])
        one_group = len(L.mixture.groups) == 1  # group row q = global row i: no apportioning
        streams: dict[tuple[int, int], _Stream] = {}
        by_slot: list[Optional[_Stream]] = [None] * sum(L.group_streams)  # the same, by slot0[g]+k
        caches = [OrderedDict() for _ in L.mixture.groups]  # parsed shards, per group, shared by its streams
        saved = self.start["streams"]
        group_rows = list(order.totals)  # the q of the next row of each group
        B, S, W, r = L.micro_batch_size, L.seq_len, L.world_size, L.rank
        Ks, slot0 = L.group_streams, L._slot0
        first = order.row
        t = 0
        while True:
            mine = t % nw == wid
            picks: list[tuple[int, int, int]] = []  # (global row i, group g, group row q) of this rank
            if one_group:
                base = first + t * B * W
                picks = [(i, 0, i) for i in range(base + r, base + B * W, W)] if mine else []
            else:
                for _ in range(B * W):  # the global rows of micro-batch t (all ranks)
                    i = order.row
                    g = order.next()
                    q = group_rows[g]
                    group_rows[g] += 1
                    if mine and i % W == r:
                        picks.append((i, g, q))
            t += 1
            if not mine:
                continue
            x = np.empty((B, S + 1), dtype=np.int64)
            d = np.empty((B, S + 1), dtype=bool)
            for b, (i, g, q) in enumerate(picks):
                K = Ks[g]
                s = by_slot[slot0[g] + q % K]
                if s is None:
                    at = saved.get(f"{g}/{q % K}")
                    s = (_Stream(L._plan(g, caches[g]), q % K, S, int(at[0]), tuple(at[1:])) if at
                         else _Stream(L._plan(g, caches[g]), q % K, S))
                    by_slot[slot0[g] + q % K] = streams[(g, q % K)] = s
                if s.index < q // K:
                    s.seek(q // K)
                s.take(x[b], d[b])
            index = np.asarray([p[0] for p in picks], dtype=np.int64)
            xt = torch.from_numpy(x)
            doc_starts = torch.from_numpy(d[:, :S].copy())
            doc_starts[:, 0] = True
            batch = {"input_ids": xt[:, :-1].contiguous(), "targets": xt[:, 1:].contiguous(), "doc_starts": doc_starts,
                     "rows": torch.from_numpy(index),
                     "groups": torch.from_numpy(np.asarray([p[1] for p in picks], dtype=np.int64)),
                     "row_hash": torch.from_numpy(np.asarray(row_hashes(index, x).sum(), dtype=np.int64))}
            snap = {f"{g}/{k}": [s.index, *s.position()] for (g, k), s in streams.items()}
            notes = [n for s in streams.values() for n in s.plan.take_notes()]
            yield t - 1, batch, snap, notes


class GlobalLoader:
    """This rank's micro-batches of the global row order (see the module docstring)."""

    def __init__(self, shard_dir: str | Path, *, seq_len: int, micro_batch_size: int, rows_per_step: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0, streams: int = 8,
                 mixture: Optional[Mixture] = None, on_error: str = "fail", prefetch_factor: int = 4):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if rows_per_step % (micro_batch_size * world_size):
            raise ValueError(f"a step's {rows_per_step} rows are not a multiple of micro_batch_size "
                             f"{micro_batch_size} x {world_size} ranks")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error is {on_error!r}; valid values: {', '.join(ON_ERROR)}")
        self.shard_dir = str(shard_dir)
        self.seq_len, self.micro_batch_size, self.rows_per_step = int(seq_len), int(micro_batch_size), int(rows_per_step)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.seed, self.streams, self.on_error = int(seed), int(streams), on_error
        self.prefetch_factor = prefetch_factor
        self.mixture = mixture or Mixture.one_group()
        self.manifest = load_manifest(self.shard_dir)
        self.dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[self.manifest["dtype"]])
        train = [s for s in self.manifest["shards"] if s["split"] == "train"]
        self.group_shards: list[list[dict]] = []
        for name in self.mixture.groups:
            mine = [s for s in train if not name or s.get("group", "") == name]
            if not mine:
                have = sorted({s.get("group", "") for s in train})
                raise ValueError(f"no train shards of mixture group {name!r} in {self.shard_dir} (groups there: "
                                 f"{have}); rerun the shard stage with this data.mixture")
            self.group_shards.append(mine)
        # A group with fewer train samples than `streams` is read as one stream per sample (each stream
        # needs a sample of its own): a function of the shards, so the order stays a function of them.
        self.group_streams = group_streams(self.group_shards, self.streams)
        self._slot0 = [sum(self.group_streams[:g]) for g in range(len(self.group_streams))]
        # where the run stands: the rows every rank consumed (advanced as this rank's batches are
        # consumed: at a step boundary the ranks agree), and the stream positions to restart from
        self._order = Apportioner(self.mixture, self.rows_per_step)
        self._streams: dict[str, list[int]] = {}
        self._snapshots: dict[str, list[int]] = {}
        self.skipped: dict[str, str] = {}  # shard path -> why it was left out (data.on_error=skip)

    def _plan(self, group: int, shared: OrderedDict) -> _Plan:
        k = self.group_streams[group]
        return _SharedPlan(self.shard_dir, self.group_shards[group], self.dtype, k, self.seed, True,
                           self.on_error, shared=shared, capacity=k + 1)

    def fewer_streams(self) -> list[str]:
        """One line per group read with fewer streams than data.streams (too few train samples); for the log."""
        out = []
        for name, shards, k in zip(self.mixture.groups, self.group_shards, self.group_streams):
            if k < self.streams:
                which = f"mixture group {name!r}" if name else "the train split"
                out.append(f"{which} has {sum(s['samples'] for s in shards)} samples: read as {k} streams, "
                           f"not data.streams={self.streams}")
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._streams = self.snapshots()
        ds = _RankRows(self, {"apportioner": self._order.state(), "streams": self._streams})
        if self.num_workers == 0:
            it: Any = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                 prefetch_factor=self.prefetch_factor, persistent_workers=False))
        for _t, batch, snap, notes in it:
            for path, problem in notes:  # bad shards left out (data.on_error=skip)
                if path not in self.skipped:
                    self.skipped[path] = problem
                    log.warning("skipped (data.on_error=skip): %s", problem)
            self._order.advance(self.micro_batch_size * self.world_size)
            for key, value in snap.items():
                if key not in self._snapshots or value[0] > self._snapshots[key][0]:
                    self._snapshots[key] = value
            yield batch

    # -- state -----------------------------------------------------------------------------------

    def snapshots(self) -> dict[str, list[int]]:
        """This rank's furthest stream positions, none past a row consumed (merge them over ranks)."""
        out = dict(self._streams)
        for key, value in self._snapshots.items():
            if key not in out or value[0] > out[key][0]:
                out[key] = value
        return out

    def global_state(self, snapshots: list[dict[str, list[int]]]) -> dict:
        """The loader state of the run at a step boundary, from every rank's `snapshots()`: the same on
        every rank, and loadable by any number of ranks."""
        order = self._order
        return {"version": STATE_VERSION, "kind": "global", **self._shape(), "apportioner": order.state(),
                "streams": merge_snapshots(snapshots)}

    def load_global_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "global":
            raise ValueError("the checkpoint's loader state is not a global-order state (written by another "
                             "version); start a fresh run dir")
        mine = self._shape()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("the checkpoint's loader state was saved with other data settings; the global "
                             "order needs the same " + ", ".join(f"{k} (saved {a!r}, now {b!r})"
                                                                 for k, (a, b) in diff.items()))
        self._order = Apportioner.restored(self.mixture, self.rows_per_step, state["apportioner"])
        self._streams = dict(state["streams"])
        self._snapshots = {}

    def _shape(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "n_streams": self.streams,
                "groups": list(self.mixture.groups),
                "shards": [[s["sha256"] for s in shards][:1] + [len(shards)] for shards in self.group_shards]}

    def rows_by_group(self) -> dict[str, int]:
        """Global rows drawn from each group so far (all ranks), at a step boundary."""
        return dict(zip(self.mixture.groups, self._order.totals))


def group_streams(group_shards: list[list[dict]], streams: int) -> list[int]:
    """The streams each group's train shards are read as: data.streams, or the group's sample count when
    it has fewer samples (a stream with no sample of its own would have no rows)."""
    return [max(1, min(streams, sum(int(s["samples"]) for s in shards))) for shards in group_shards]


def merge_snapshots(snapshots: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Per stream, the furthest position any rank recorded (each is no further than the rows consumed)."""
    out: dict[str, list[int]] = {}
    for snap in snapshots:
        for key, value in snap.items():
            if key not in out or value[0] > out[key][0]:
                out[key] = list(value)
    return dict(sorted(out.items()))
