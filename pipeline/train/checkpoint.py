"""Training checkpoints: atomic, verified, newest-N kept; resumable on the same number of ranks, or
on another one when the run is resizable (train.global_batch_size; pipeline/train/elastic.py).

Layout of `RUN_DIR/train/checkpoints/`:
    step_00000030/            a complete checkpoint (it has meta.json)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (module, ZeRO optimizer
                                                       partitions, engine step counters; torch.save)
        rank_00000.json ...   ours, one per rank: RNG states, the run's loader state (the same on
                              every rank: any world size can read it) (JSON, never unpickled)
        elastic.safetensors   resizable runs: whole fp32 parameters and Adam moments (elastic.py)
        meta.json             written last: step, tokens seen, ranks, ZeRO stage, the train stage's
                              trajectory fingerprint (whose run it is), and under "files" every
                              other file's {"bytes", "sha256"}
    .tmp.step_00000060/       being written: ignored, removed on the next start
Set aside on a resume (never deleted; `xlp clean` removes them): a checkpoint that failed verification
to `RUN_DIR/.stale/train-step_00000090-damaged/`, and, under train.resume_from_step, the old
trajectory's newer ones to `RUN_DIR/.stale/train-step_00000120-superseded/` (to `checkpoints/damaged.<name>`
or `superseded.<name>` when .stale is on another file system).

Saving (collective): every rank writes into `.tmp.<name>`; each file is fsynced and hashed right
after it is written, by the rank that wrote it (DeepSpeed's files through a wrapper around its
checkpoint engine's `save`, ours as we write them); rank 0 gathers the records, writes meta.json
(fsynced) and renames the folder (one atomic rename on a POSIX file system), so a killed save never
looks complete and a complete one says what it must hold. Only then are older checkpoints pruned;
the new one is never pruned.

Cost of hashing: one extra read of each file, from the page cache it was just written to, plus
sha256 (about 1-2 GB/s per core with OpenSSL's SHA extensions). Each rank hashes only its own files,
in parallel with the others: a 7B model's ~100 GB checkpoint over 64 ranks is ~1.6 GB (about 1-2 s)
per rank; over 8 ranks of one node ~12 GB (about 10 s), against minutes to write it. Verifying on
resume reads the checkpoint once more, split the same way over the ranks.

Resuming: the newest checkpoint (or `train.resume_from_step`'s) is verified (every listed file
present, of its size, with its sha256); a damaged one is named with its file and reason in rank 0's
log, set aside, and the previous one tried. A failed save (e.g. out of disk space) removes its
`.tmp.` folder and fails with a message naming the file; the older checkpoints are untouched.

Whose checkpoint it is: meta.json records the trajectory fingerprint of the run that saved it (the
train stage's fingerprint without the keys a run may change and continue: xlp.pipeline.core.stage).
A resume refuses a checkpoint of another trajectory, naming both (another run's folder, or one trained
with another learning rate, would otherwise continue as this run); pruning deletes only this
trajectory's checkpoints. A checkpoint saved before meta.json recorded it resumes (with a note) and is
never pruned.

Loading DeepSpeed's files: DeepSpeed reads them with torch.load(weights_only=False), which runs
whatever a pickle names (a forged `mp_rank_00_model_states.pt`, with meta.json re-hashed to match,
would run its payload). While `load` runs, DeepSpeed's checkpoint engine loads through torch's
weights-only unpickler instead, which may construct tensors, containers and numbers and, beyond
those, only deepspeed_globals() (the classes DeepSpeed's own ZeRO 0-3 files hold); a file that names
anything else fails with UnsafeCheckpoint naming the file and the global, before any of it runs.
(Restricting the load itself rather than scanning the files first: what is checked is what is
loaded, in the one read DeepSpeed does anyway, with no window between a check and the load.)

The learning-rate schedule is a function of the step, so the step restores it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from xlp.pipeline.core.diskfull import disk_full, is_disk_full, writing
from xlp.pipeline.core.stage import atomic_write_json
from xlp.xlstm_model import build_model, save_model

NAME_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp."
DAMAGED_PREFIX = "damaged."
SUPERSEDED_PREFIX = "superseded."
META = "meta.json"
FILES = "files"  # meta.json key: {relative path: {"bytes": int, "sha256": hex}}
HASH_CHUNK = 16 << 20


TRAJECTORY = "trajectory"  # meta.json key: the train stage's trajectory fingerprint of the run that saved it
FOREIGN_PREFIX = "foreign."


class CheckpointError(RuntimeError):
    pass


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file whose pickle names a global DeepSpeed's checkpoints never hold."""


def name_of(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first (complete: it has
    meta.json; whether its files are whole is `verify`'s question)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = NAME_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def remove_partial(root: Path) -> None:
    """Remove folders a killed save or prune left behind (rank 0, before anyone saves)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# RNG state as JSON (restored bit for bit; nothing to unpickle)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _bytes_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Torch (and CUDA), Python and NumPy generator states as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


# ---------------------------------------------------------------------------------------------
# Records: size and sha256 of each file


def file_record(path: Path) -> dict:
    """fsync `path`, then its size and sha256 (one read, from the page cache right after a write)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while got := f.readinto(buf):
            h.update(view[:got])
            n += got
    return {"bytes": n, "sha256": h.hexdigest()}


def write_json_file(path: Path, obj: Any) -> dict:
    """Write `obj` as JSON to `path`, fsynced, hashed as it is written; returns its record."""
    data = (json.dumps(obj, sort_keys=True) + "\n").encode()
    with writing(path):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_json_file(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class _RecordingEngine:
    """While active, DeepSpeed's checkpoint engine `save` of this rank also fsyncs and hashes each
    file it writes; a failure is recorded (the partial file removed) instead of raised, so this rank
    still reaches DeepSpeed's barriers and every rank learns of it after save_checkpoint returns."""

    def __init__(self, engine, folder: Path):
        self.ce = engine.checkpoint_engine
        self.folder = folder
        self.records: dict[str, dict] = {}
        self.error: Optional[dict] = None

    def __enter__(self) -> "_RecordingEngine":
        self._orig = self.ce.save
        self.ce.save = self._save  # an instance attribute shadows the class's method
        return self

    def __exit__(self, *exc) -> None:
        try:
            del self.ce.save
        except AttributeError:
            self.ce.save = self._orig

    def _save(self, state_dict, path, *args, **kwargs):
        if self.error is not None:  # this rank's save already failed: write nothing more
            return None
        p = Path(path)
        try:
            out = self._orig(state_dict, path, *args, **kwargs)
            self.records[os.path.relpath(p, self.folder)] = file_record(p)
            return out
        except Exception as e:  # noqa: BLE001  (reported collectively by save())
            self.error = _failure(e, p)
            p.unlink(missing_ok=True)
            return None


def _failure(e: BaseException, path: Path) -> dict:
    traceback.print_exc()
    if is_disk_full(e, path):
        return {"disk_full": True, "path": str(path), "message": str(disk_full(path))}
    return {"disk_full": False, "path": str(path), "message": f"{type(e).__name__}: {e} (writing {path})"}


def _raise_failures(failures: list[tuple[int, dict]]) -> None:
    for _, f in failures:
        if f["disk_full"]:
            raise disk_full(f["path"])
    rank, f = failures[0]
    raise CheckpointError(f"saving the checkpoint failed on rank {rank}: {f['message']}")


# ---------------------------------------------------------------------------------------------
# Saving


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (collective; [obj] without a process group)."""
    return _all_gather(obj)


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(engine, root: Path, step: int, *, rank: int, rank_state: dict, meta: dict, keep: int,
         write_extra: Optional[Callable[[Path], dict[str, dict]]] = None, aside: Optional[Path] = None) -> Path:
    """Save a checkpoint of `step` (collective: every rank calls it). Returns its final path.
    `write_extra(folder)`, called on every rank after DeepSpeed's files, writes more files into the
    checkpoint and returns their records ({name: file_record}), e.g. xlp.pipeline.train.elastic.save_state.
    `meta[TRAJECTORY]` (rank 0's) says whose checkpoint it is: older checkpoints of that trajectory are
    pruned to `keep`; one of this step that is not of it is moved aside (`_set_aside`), not replaced.

    Raises DiskFull (naming the file) when the disk fills up, CheckpointError on other write errors;
    either way the `.tmp.` folder is removed and the older checkpoints are left as they were."""
    root = Path(root)
    name = name_of(step)
    tmp = root / (TMP_PREFIX + name)
    if rank == 0:
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    recorder = _RecordingEngine(engine, tmp)
    try:
        with recorder:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
    except Exception as e:  # outside the checkpoint engine (e.g. DeepSpeed copying its scripts)
        failure = _failure(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_failures([(rank, failure)])
    error = recorder.error
    if error is None and write_extra is not None:
        try:
            recorder.records.update(write_extra(tmp))
        except Exception as e:  # noqa: BLE001  (reported collectively below)
            error = _failure(e, tmp)
    if error is None:
        own = tmp / rank_state_name(rank)
        try:
            recorder.records[own.name] = write_json_file(own, rank_state)
        except Exception as e:  # noqa: BLE001
            error = _failure(e, own)
            own.unlink(missing_ok=True)
    gathered = _all_gather((recorder.records, error))
    failures = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # every rank is done writing: free the space
        _barrier()
        _raise_failures(failures)

    final = root / name
    outcome: Optional[dict] = None
    if rank == 0:
        try:
            files: dict[str, dict] = {}
            for records, _ in gathered:
                files.update(records)
            for dirpath, _, names in os.walk(tmp):  # files DeepSpeed wrote without its engine (scripts)
                for n in names:
                    rel = os.path.relpath(os.path.join(dirpath, n), tmp)
                    if rel not in files and rel != META:
                        files[rel] = file_record(tmp / rel)
            atomic_write_json(tmp / META, dict(meta, **{FILES: dict(sorted(files.items()))}))
            _fsync_dir(tmp)
            if final.exists() and _trajectory_of(final) != (meta.get(TRAJECTORY) or ""):
                _set_aside(final, "foreign", aside)  # not ours to replace: kept
            if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
                trash = root / (TMP_PREFIX + "old." + name)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(root)
            problems = verify(final, full_hash=False)  # cheap: every file there, of its size
            if problems:
                raise CheckpointError(f"checkpoint {final} is not whole right after saving: {'; '.join(problems)}")
            prune(root, keep, trajectory=meta.get(TRAJECTORY), protect=final)
        except Exception as e:  # noqa: BLE001
            outcome = _failure(e, tmp / META if tmp.exists() else final)
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = _broadcast(outcome)
    if outcome is not None:
        _raise_failures([(0, outcome)])
    return final


def prune(root: Path, keep: int, *, trajectory: Optional[str], protect: Optional[Path] = None) -> None:
    """Delete all but the `keep` newest complete checkpoints of `trajectory` (meta.json's; None: those
    that record none); never `protect` (the one just saved), nor any other run's (or an older
    version's) checkpoint that shares the folder."""
    found = [(s, p) for s, p in complete_checkpoints(root) if _trajectory_of(p) == (trajectory or "")]
    for _, path in found[:-keep] if keep > 0 else []:
        if protect is not None and path == Path(protect):
            continue
        trash = path.parent / (TMP_PREFIX + "del." + path.name)
        os.replace(path, trash)  # gone from the listing at once, then deleted
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def _trajectory_of(path: Path) -> Optional[str]:
    """The trajectory checkpoint `path` records: "" when it records none (an older version's), None
    when its meta.json cannot be read (so it matches no run's)."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return None
    value = meta.get(TRAJECTORY) if isinstance(meta, dict) else None
    return str(value) if value else ""


# ---------------------------------------------------------------------------------------------
# Verifying and choosing the checkpoint to resume from


def verify(path: Path, *, share: tuple[int, int] = (0, 1), full_hash: bool = True) -> list[str]:
    """What is wrong with checkpoint `path` ([] when it is whole): meta.json readable and listing its
    files; each listed file of this share (`(i, n)`: every n-th file by size, from the i-th, so n
    ranks split the hashing) present, of its recorded size and (full_hash) sha256."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return [f"{META}: missing"]
    except (OSError, ValueError) as e:
        return [f"{META}: unreadable ({e})"]
    files = meta.get(FILES) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"{META} records no files and hashes (written by an older version): cannot be verified"]
    i, n = share
    order = sorted(files, key=lambda k: (-int(files[k].get("bytes", 0)), k))
    problems = []
    for rel in order[i::n]:
        want = files[rel]
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            problems.append(f"{rel}: not a path inside the checkpoint")
            continue
        p = path / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "size changed"
            problems.append(f"{rel}: {what} ({size} bytes, {want['bytes']} recorded)")
            continue
        if full_hash:
            got = file_record(p)["sha256"]
            if got != want["sha256"]:
                problems.append(f"{rel}: sha256 mismatch (recorded {want['sha256'][:16]}..., now {got[:16]}...)")
    return problems


def choose(root: Path, *, rank: int, world_size: int, resume_from_step: Optional[int] = None,
           say: Callable[[str], None] = print, aside: Optional[Path] = None,
           trajectory: Optional[str] = None) -> Optional[Path]:
    """The checkpoint to resume from, verified (collective: every rank calls it and hashes its share
    of each candidate's files). None when there is none (a fresh start).

    resume_from_step None: the newest checkpoint that verifies; damaged newer ones are named (file
    and reason) through `say` on rank 0 and set aside (`_set_aside`: to `aside`, e.g. RUN_DIR/.stale,
    or beside the others as `damaged.<name>`). When checkpoints exist
    but none verifies, CheckpointError (rather than silently training from step 0).
    resume_from_step N: the checkpoint of step N, or a newer one a run resumed from N wrote (so a
    stopped branch continues); CheckpointError naming the available steps when there is none, or
    when it is damaged. Newer checkpoints of the old trajectory are set aside as superseded.

    trajectory: this run's train trajectory fingerprint (rank 0's counts). A candidate recording
    another one is refused (CheckpointError naming both; nothing is moved); one recording none (saved
    before checkpoints recorded it) is resumed, with a note through `say`."""
    root = Path(root)
    plan: Any = None
    if rank == 0:
        try:
            remove_partial(root)
            plan = dict(_candidates(root, resume_from_step), ours=trajectory or "")
        except Exception as e:  # noqa: BLE001
            plan = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, CheckpointError) else str(e)}
    plan = _broadcast(plan)
    if "error" in plan:
        raise CheckpointError(plan["error"])
    chosen: Optional[str] = None
    damaged: list[tuple[str, list[str]]] = []
    ours = plan["ours"]  # rank 0's trajectory: every rank decides alike
    for cand in plan["candidates"]:
        theirs = plan["trajectories"].get(cand)
        if theirs and theirs != ours:
            raise CheckpointError(
                f"checkpoint {cand} is not this run's: it records train trajectory {theirs}, and this run's is "
                f"{ours or '(none)'} (another run's checkpoint, or one trained with another config); resuming it "
                f"would continue that training as this run. Nothing was changed: move it out of {root}, or "
                "use another run.dir (or train.checkpoint_dir)")
        problems = sum(_all_gather(verify(Path(cand), share=(rank, world_size))), [])
        if not problems:
            chosen = cand
            break
        damaged.append((cand, problems))
        if rank == 0:
            say(f"checkpoint {cand} is damaged: {'; '.join(problems)}")
        if resume_from_step is not None:
            raise CheckpointError(f"train.resume_from_step={resume_from_step}: checkpoint {cand} is damaged: "
                                  + "; ".join(problems))
    if chosen is None and damaged:
        raise CheckpointError(
            f"no checkpoint in {root} verifies (" + " | ".join(f"{Path(c).name}: {'; '.join(p)}" for c, p in damaged)
            + "); move them out of the way to train from step 0, or restore the damaged files")
    if rank == 0 and chosen is not None:
        for cand, _ in damaged:
            kept = _set_aside(Path(cand), "damaged", aside)
            say(f"the damaged checkpoint is kept in {kept}; resuming from the previous whole one, {chosen}")
        if trajectory and not plan["trajectories"].get(chosen):
            say(f"checkpoint {Path(chosen).name} records no trajectory (saved by an older version): resuming it as "
                "this run's; checkpoints without one are never pruned (delete them once they are not needed)")
        chosen_step = int(NAME_RE.match(Path(chosen).name).group(1))  # type: ignore[union-attr]
        for step, p in complete_checkpoints(root):
            if step > chosen_step and _trajectory_of(p) in ("", ours):  # another run's is not ours to move
                kept = _set_aside(p, "superseded", aside)
                say(f"train.resume_from_step={resume_from_step}: the newer checkpoint {p.name} is kept in {kept}")
    _barrier()
    return Path(chosen) if chosen else None


def _set_aside(path: Path, kind: str, aside: Optional[Path]) -> Path:
    """Move checkpoint `path` out of the listing, keeping it: to `aside/train-<name>-<kind>`, or (no
    `aside`, or another file system) to `<kind>.<name>` beside it."""
    if aside is not None:
        target = Path(aside) / f"train-{path.name}-{kind}"
        n = 1
        while target.exists():
            n += 1
            target = Path(aside) / f"train-{path.name}-{kind}.{n}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            return target
        except OSError:  # e.g. EXDEV: checkpoints on their own file system
            pass
    prefix = {"damaged": DAMAGED_PREFIX, "superseded": SUPERSEDED_PREFIX, "foreign": FOREIGN_PREFIX}[kind]
    target = path.with_name(prefix + path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def _candidates(root: Path, resume_from_step: Optional[int]) -> dict:
    """Rank 0: the checkpoints to try in order, newest first."""
    found = complete_checkpoints(root)
    trajectories = {str(p): _trajectory_of(p) for _, p in found}
    if resume_from_step is None:
        return {"candidates": [str(p) for _, p in reversed(found)], "trajectories": trajectories}
    n = resume_from_step
    branch = []
    for step, p in reversed(found):
        if step == n:
            branch.append(p)
        elif step > n:
            try:
                if read_meta(p).get("resume_from_step") == n:
                    branch.append(p)
            except (OSError, ValueError):
                pass
    if not branch:
        steps = ", ".join(str(s) for s, _ in found) or "none"
        return {"error": f"train.resume_from_step={n}: there is no checkpoint of step {n} in {root}; "
                         f"available steps: {steps}"}
    return {"candidates": [str(branch[0])], "trajectories": trajectories}


def load(engine, path: Path, *, rank: int, world_size: int) -> tuple[dict, dict]:
    """Load model, optimizer and engine state from checkpoint `path`; returns (meta, this rank's state).
    Our own files are JSON; DeepSpeed's are read by DeepSpeed through the weights-only unpickler
    (`restricted_load`): UnsafeCheckpoint, before anything in it runs, when one names another global."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world_size") != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {world_size}. "
            "Resume with the same number of ranks (train.cpu_processes or GPUs), or start a fresh run dir "
            "with train.global_batch_size set (a resizable run)."
        )
    with _RestrictedLoads(engine):
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rank_state = read_json_file(path / rank_state_name(rank))
    return meta, rank_state


# ---------------------------------------------------------------------------------------------
# Unpickling DeepSpeed's files: weights only


def deepspeed_globals() -> list:
    """What DeepSpeed's own checkpoint files hold beyond what torch's weights-only unpickler allows
    (tensors, storages, OrderedDict, torch.Size, numbers, strings, containers): read from the pickles of
    its ZeRO 0-3 files, fp32 and bf16. Plain data classes: constructing one runs no code of the file's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def restricted_load(path: Any, map_location: Any = None) -> Any:
    """torch.load of a DeepSpeed checkpoint file through the weights-only unpickler, allowing
    `deepspeed_globals()` besides torch's own list. A pickle naming anything else (os.system, a
    module's function, another class) raises UnsafeCheckpoint naming the file and the global."""
    allowed = deepspeed_globals()
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: for this load only
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
        what = (f"names {m.group(1)}" if m else
                "needs more than tensors and containers (" + text.strip().splitlines()[-1][:300] + ")")
        raise UnsafeCheckpoint(
            f"refusing to load checkpoint file {path}: its pickle {what}, which DeepSpeed's checkpoints never "
            "hold (unpickling it would run that code). Loading stopped before any of it ran. The file was "
            "changed or forged after the save (its meta.json may have been re-hashed to match): do not resume "
            "from this checkpoint; move its folder out of the checkpoints folder to resume from the previous "
            "one. (A newer DeepSpeed that saves another plain data class: add it to "
            "xlp.pipeline.train.checkpoint.deepspeed_globals.)") from None


class _RestrictedLoads:
    """While active, DeepSpeed's checkpoint engine of `engine` loads through `restricted_load` (every
    file DeepSpeed's load_checkpoint reads goes through its engine's `load`)."""

    def __init__(self, engine):
        self.ce = engine.checkpoint_engine

    def __enter__(self) -> "_RestrictedLoads":
        self.ce.load = self._load  # an instance attribute shadows the class's method
        return self

    def __exit__(self, *exc) -> None:
        del self.ce.load

    @staticmethod
    def _load(path, map_location=None, *args, **kwargs):
        return restricted_load(path, map_location=map_location)


# ---------------------------------------------------------------------------------------------
# The consolidated model: full fp32 weights on rank 0, from any ZeRO stage


def gather_full_state(engine, *, rank: int) -> dict[str, torch.Tensor]:
    """Every parameter (fp32 master copy where there is one) and buffer, whole, on rank 0's CPU.

    Collective under ZeRO-3 (each parameter is gathered in turn, so peak memory is one parameter).
    Other ranks get {}.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = engine.zero_optimization_stage() == 3
    uses_master = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if uses_master else None
        if full is None and zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data.detach().clone() if rank == 0 else None
        elif full is None:
            full = p.detach()
        if rank == 0:
            out[name] = full.detach().to("cpu", torch.float32).clone()
    for name, b in engine.module.named_buffers():
        if rank == 0:
            out[name] = b.detach().cpu().clone()
    return out


def export_model(state: dict[str, torch.Tensor], model_cfg: Any, out: Path) -> Path:
    """Write the consolidated model (safetensors + config.json) to `out` atomically (rank 0 only)."""
    out = Path(out)
    model = build_model(model_cfg)
    names = dict(model.named_parameters())
    names.update(dict(model.named_buffers()))
    missing = [n for n in names if n not in state]
    if missing:
        raise RuntimeError(f"consolidated state lacks {missing[:5]}")
    with torch.no_grad():
        for n, t in names.items():
            t.copy_(state[n].to(t.dtype))
    tmp = out.parent / (TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, model_cfg, tmp)
    if out.exists():
        trash = out.parent / (TMP_PREFIX + "old." + out.name)
        os.replace(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, out)
    return out
