"""What a stage is: a function of the config keys it reads, the inputs it lists and the stages it needs.

A stage's fingerprint hashes the values of the keys it reads, a cheap listing of its inputs (files
with sizes and mtimes, content hashes of single files; see pipeline/data/listing.py) and its upstream
fingerprints (marin's executor steps). Its outputs live in `RUN_DIR/<stage>/`;
`RUN_DIR/<stage>/stage.json` says whether they are whole: it is written last, atomically, with
`status: done` (datatrove's completion marker), so a killed stage never looks done.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from xlp.pipeline.core.declared import declared_view
from xlp.pipeline.core.layout import STAGE_JSON, RunLayout
from xlp.pipeline.core.lock import RunLock

# Bump when a stage's code changes what it writes, so old outputs become stale.
# 2: the fingerprint hashes the stage's input listing (Stage.inputs) too.
FINGERPRINT_VERSION = 2


@dataclass(frozen=True)
class Stage:
    """A pipeline stage.

    name:  the stage's directory name under the run dir and its name on the command line.
    reads: config keys (dotted; a key names its whole subtree) whose values the fingerprint hashes.
    needs: names of upstream stages whose outputs this stage reads.
    fn:    "module:function"; the function takes a StageContext and returns a dict of metrics.
           An import string, so the registry imports nothing heavy and Ray workers import the code.
    ignores: keys inside `reads` that change how the stage runs but not what it writes (where the
           ranks are launched, how often it logs): left out of the fingerprint.
    resumable: keep the outputs of an interrupted attempt with the same fingerprint (the stage
           itself skips the work already whole: shards written, checkpoints saved).
    continues: keys inside `reads` whose change gives a new fingerprint, but whose old output the
           stage continues instead of redoing (a longer `train.steps` continues from the checkpoints):
           outputs of the same *trajectory* (the fingerprint without these keys) are kept.
    headline: metric names `xlp status` shows.
    inputs: "module:function" import strings; each function takes the config and returns a JSON-able
           listing of inputs the stage reads outside the run directory (corpus files with size and
           mtime, the content hash of tokenizer.path), read without reading the data. The fingerprint
           hashes them, so an added or changed file reruns the stage. Import strings, like `fn`, so the
           registry stays cheap to import; stages naming the same function share one listing per
           `fingerprints()` call.
    sees:  keys the stage reads at run time but does not hash, because they change nothing it writes
           (monitoring, parallelism, the run's name) or are hashed another way (through `inputs`).
           The stage gets a view of the config with `reads` and `sees` only (`view`): reading any
           other key raises UndeclaredKey (pipeline/core/declared.py).
    """

    name: str
    reads: tuple[str, ...]
    needs: tuple[str, ...]
    fn: str
    ignores: tuple[str, ...] = ()
    continues: tuple[str, ...] = ()
    resumable: bool = True
    headline: tuple[str, ...] = ()
    description: str = ""
    inputs: tuple[str, ...] = ()
    sees: tuple[str, ...] = ()
    # files of RUN_DIR/<stage>/ whose sha256 the done marker records (`outputs`): one that no longer
    # matches (truncated, overwritten) makes the stage "failed, resumable" instead of done
    outputs: tuple[str, ...] = ()
    # "module:function" taking the stage's directory and returning what is wrong with its outputs, or
    # None: how a done marker written before it recorded `outputs` is checked
    check: str = ""
    # keys inside `reads` declared after runs were made, with a null default: hashed only when set, so
    # the runs made before (and any run that leaves them null) keep their fingerprints
    added: tuple[str, ...] = ()

    def view(self, cfg: DictConfig) -> DictConfig:
        """`cfg` as this stage may read it: its `reads` and `sees`; any other key raises UndeclaredKey."""
        return declared_view(cfg, self.name, self.reads + self.sees)

    def load_fn(self) -> Callable[["StageContext"], dict]:
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass
class StageContext:
    """What a stage function gets: the resolved config, where to write, where its inputs are."""

    name: str
    cfg: DictConfig  # the resolved, validated config as the stage may read it (Stage.view; read-only)
    run_dir: Path
    fingerprint: str
    resumed: bool = False  # an interrupted attempt with the same fingerprint left outputs here
    log_file: Optional[Path] = None

    @property
    def layout(self) -> RunLayout:
        """The paths of the run directory (its inputs: layout.tokenizer_model, layout.manifest, ...)."""
        return RunLayout(self.run_dir)

    @property
    def out_dir(self) -> Path:
        """The stage's output directory, `RUN_DIR/<stage>/`; it exists when the stage runs."""
        return self.layout.stage_dir(self.name)

    def input_dir(self, stage: str) -> Path:
        """Output directory of an upstream stage; the runner has checked that it is done."""
        return self.layout.stage_dir(stage)

    def input_metrics(self, stage: str) -> dict:
        return read_stage_json(self.input_dir(stage)).get("metrics", {})


def select_keys(cfg: DictConfig, keys: Iterable[str], ignores: Iterable[str] = ()) -> dict[str, Any]:
    """The values of `keys` (dotted) in `cfg`, resolved to plain Python, without the `ignores` keys
    inside them; a missing key is None."""
    out = {}
    for key in keys:
        if key in ignores:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        for ignored in ignores:
            if ignored.startswith(key + ".") and isinstance(value, dict):
                node = value
                *parents, leaf = ignored[len(key) + 1:].split(".")
                for part in parents:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(leaf, None)
        out[key] = value
    return out


def _without_unset(values: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`values` (select_keys') without those of `keys` whose value is None."""
    for key in keys:
        top = next((k for k in values if key == k or key.startswith(k + ".")), None)
        if top is None:
            continue
        if key == top:
            if values[top] is None:
                del values[top]
            continue
        node = values[top]
        *parents, leaf = key[len(top) + 1:].split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] is None:
            del node[leaf]
    return values


def input_digests(stages: Iterable[Stage], cfg: DictConfig) -> dict[str, str]:
    """sha256 of each input listing the stages name (Stage.inputs), each listing computed once."""
    out: dict[str, str] = {}
    for stage in stages:
        for spec in stage.inputs:
            if spec not in out:
                module, _, attr = spec.partition(":")
                listing = getattr(importlib.import_module(module), attr)(cfg)
                blob = json.dumps(listing, sort_keys=True, default=str).encode()
                out[spec] = hashlib.sha256(blob).hexdigest()
    return out


def fingerprint(stage: Stage, cfg: DictConfig, upstream: dict[str, str], *, trajectory: bool = False,
                inputs: Optional[dict[str, str]] = None) -> str:
    """sha256 over the stage's name, the values of the keys it reads, the digests of its input listings
    (`inputs`: from input_digests, computed here when not given) and its upstream fingerprints.
    trajectory=True leaves the `continues` keys out too: outputs with the same trajectory fingerprint
    can be continued into each other."""
    if inputs is None or any(spec not in inputs for spec in stage.inputs):
        inputs = input_digests([stage], cfg)
    payload = {
        "stage": stage.name,
        "version": FINGERPRINT_VERSION,
        "reads": _without_unset(select_keys(cfg, stage.reads, stage.ignores + (stage.continues if trajectory else ())),
                                stage.added),
        # named as before the xlp namespace (pipeline.data.listing:corpus): the module's import path is
        # not what the stage read, and runs made before keep their fingerprints
        "inputs": {spec.removeprefix("xlp."): inputs[spec] for spec in sorted(stage.inputs)},
        "upstream": {name: upstream[name] for name in sorted(stage.needs)},
    }
    if trajectory:
        payload["trajectory"] = True
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprints(stages: list[Stage], cfg: DictConfig, *, inputs: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Fingerprints of all stages (in dependency order). The input listings are made once per call
    (or passed in as `inputs`, from input_digests)."""
    inputs = input_digests(stages, cfg) if inputs is None else inputs
    fps: dict[str, str] = {}
    for stage in toposort(stages):
        fps[stage.name] = fingerprint(stage, cfg, fps, inputs=inputs)
    return fps


def trajectories(stages: list[Stage], cfg: DictConfig, *, inputs: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Trajectory fingerprints of all stages (each over its upstream stages' full fingerprints); the
    input listings are made once per call, or passed in."""
    inputs = input_digests(stages, cfg) if inputs is None else inputs
    fps = fingerprints(stages, cfg, inputs=inputs)
    return {stage.name: fingerprint(stage, cfg, fps, trajectory=True, inputs=inputs) for stage in stages}


def toposort(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    order: list[Stage] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in by_name:
            raise ValueError(f"stage {path[-1]!r} needs unknown stage {name!r}")
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"stage dependency cycle: {' -> '.join(path + (name,))}")
        state[name] = 1
        for dep in by_name[name].needs:
            visit(dep, path + (name,))
        state[name] = 2
        order.append(by_name[name])

    for s in stages:
        visit(s.name, ())
    return order


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and the stage.json marker


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class StageMarker:
    """`RUN_DIR/<stage>/stage.json` of one attempt: running (with a heartbeat), then done or failed."""

    def __init__(self, path: Path, stage: str, *, fingerprint: str, trajectory: str, resumed: bool):
        started = time.time()
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "stage": stage, "status": "running", "fingerprint": fingerprint, "trajectory": trajectory,
            "started_at": started, "heartbeat_at": started, "host": socket.gethostname(), "pid": os.getpid(),
            "resumed": resumed,
        }
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)

    def beat(self) -> None:
        self.data["heartbeat_at"] = time.time()
        self._write()

    def done(self, metrics: dict, outputs: Optional[dict[str, str]] = None) -> None:
        """Mark the attempt done; `outputs`: {file name: sha256} of files `read_marker` checks later."""
        ended = time.time()
        self.data.update(status="done", ended_at=ended, heartbeat_at=ended,
                         duration_s=round(ended - self.data["started_at"], 3), metrics=metrics or {})
        if outputs:
            self.data["outputs"] = dict(outputs)
        self._write()

    def failed(self, error: str) -> None:
        """Mark the attempt failed, even on a full disk: when the atomic rewrite fails (no room for the
        temporary copy), a short marker overwrites the file in place (it fits in the block the file
        already has). Should that fail too, the marker says "running" with an old heartbeat, which
        `xlp status` shows as failed once the run lock is released (same host) or the heartbeat is stale."""
        self.data.update(status="failed", ended_at=time.time(), error=error)
        try:
            self._write()
            return
        except OSError as e:
            why = e
        short = {k: self.data[k] for k in ("stage", "status", "fingerprint", "trajectory", "started_at", "ended_at",
                                           "host", "pid", "resumed") if k in self.data}
        short["error"] = error[:1500]
        data = (json.dumps(short, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e2:
            print(f"warning: could not record the failure in {self.path} ({why}; then {e2}); `xlp status` shows "
                  "the stage as failed once this run has ended", file=sys.stderr, flush=True)


STATUSES = ("running", "done", "failed")
# A marker that says "running" but has not been refreshed for this long belongs to a dead run.
STALE_HEARTBEAT_S = 60.0


def read_stage_json(stage_dir: Path) -> dict:
    """The stage's marker, {} when the stage never started. A marker that cannot be read or is not one
    (truncated, not JSON, a field missing or of the wrong type) reads as a failed attempt (`damaged`:
    why), with the fingerprint and trajectory that can still be read from it, if any: the runner
    resumes its output instead of moving it aside, and `xlp status` names the file."""
    path = Path(stage_dir) / STAGE_JSON
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        return damaged_marker(path, f"unreadable: {e.strerror or e}", b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return damaged_marker(path, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else "truncated" if json_cut_short(text) else "not JSON"
        return damaged_marker(path, f"{what}: {e.msg} at character {e.pos} of {len(text)}", raw)
    problem = marker_problem(data)
    return damaged_marker(path, problem, raw) if problem else data


def json_cut_short(text: str) -> bool:
    """Whether `text`, which does not parse, looks like a JSON object cut short: it starts as one and
    does not end as one (a write that stopped part way), rather than something else."""
    stripped = text.strip()
    return stripped.startswith("{") and not stripped.endswith("}")


def marker_problem(data: Any) -> Optional[str]:
    """What makes `data` not a stage marker StageMarker writes, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    status = data.get("status")
    if status not in STATUSES:
        return f"status {status!r} is none of {', '.join(STATUSES)}"
    if not isinstance(data.get("fingerprint"), str) or not data["fingerprint"]:
        return "no fingerprint"
    if status == "running":  # its age decides whether it still runs; `xlp status` shows its start
        for key in ("started_at", "heartbeat_at"):
            if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool):
                return f"a running marker without a number in {key!r}"
    optional = {"trajectory": str, "error": str, "host": str, "metrics": dict, "outputs": dict,
                "started_at": (int, float), "heartbeat_at": (int, float), "ended_at": (int, float),
                "duration_s": (int, float)}
    for key, types in optional.items():
        if key in data and data[key] is not None and not isinstance(data[key], types):
            return f"{key!r} is a {type(data[key]).__name__}"
    return None


_SALVAGE = {key: re.compile(rb'"%s": "([0-9a-f]{16})"' % key.encode()) for key in ("fingerprint", "trajectory")}


def damaged_marker(path: Path, reason: str, raw: bytes) -> dict:
    """A damaged marker as a failed attempt. The fingerprint and trajectory StageMarker writes near the
    start of the file are taken from what is left of it, so outputs of another config still move aside."""
    out: dict[str, Any] = {"status": "failed", "damaged": f"{path} is damaged: {reason}",
                           "error": f"{path} is damaged ({reason}); the stage resumes on the next `xlp run`"}
    for key, pattern in _SALVAGE.items():
        found = pattern.findall(raw)
        if len(set(found)) == 1:
            out[key] = found[0].decode()
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_hashes(stage: Stage, stage_dir: Path) -> dict[str, str]:
    """{file: sha256} of the stage's `outputs` that exist in `stage_dir` (what its done marker records)."""
    return {name: file_sha256(Path(stage_dir) / name) for name in stage.outputs if (Path(stage_dir) / name).is_file()}


def outputs_problem(stage: Stage, stage_dir: Path, marker: dict) -> Optional[str]:
    """What is wrong with the outputs of a done stage: a file whose sha256 is not the one its marker
    recorded, or (a marker written before it recorded any) what the stage's `check` finds. None: whole."""
    recorded = marker.get("outputs") or {}
    for name in stage.outputs:
        path = Path(stage_dir) / name
        if name not in recorded:
            continue
        try:
            digest = file_sha256(path)
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as e:
            return f"{path} is unreadable ({e.strerror or e})"
        if digest != recorded[name]:
            return (f"{path} is damaged: its sha256 is {digest[:12]}..., not the {recorded[name][:12]}... "
                    f"{STAGE_JSON} recorded when the stage finished")
    if stage.check and not any(name in recorded for name in stage.outputs):
        module, _, attr = stage.check.partition(":")
        return getattr(importlib.import_module(module), attr)(Path(stage_dir))
    return None


def read_marker(stage: Stage, stage_dir: Path) -> dict:
    """The stage's marker (read_stage_json), with a done stage whose outputs are damaged (outputs_problem)
    read as a failed attempt of the same fingerprint: the next run resumes it."""
    marker = read_stage_json(stage_dir)
    if marker.get("status") == "done":
        problem = outputs_problem(stage, stage_dir, marker)
        if problem:
            return {**marker, "status": "failed", "damaged": problem,
                    "error": f"{problem}; the stage resumes on the next `xlp run`"}
    return marker


def marker_status(marker: dict, fp: str, run_dir: Optional[Path] = None) -> str:
    """done | stale | running | failed | pending: a stage's marker against the fingerprint the current
    config gives it. A "running" marker whose run is gone (its heartbeat is old, or on this machine no
    process holds the run directory's lock) is failed."""
    status = marker.get("status")
    if status is None:
        return "pending"
    if status == "done":
        return "done" if marker.get("fingerprint") == fp else "stale"
    if status == "running" and _still_running(marker, run_dir):
        return "running"
    return "failed"  # it raised, its process died without saying so (SIGKILL, node lost), or it is damaged


def _still_running(marker: dict, run_dir: Optional[Path]) -> bool:
    if time.time() - marker.get("heartbeat_at", 0) > STALE_HEARTBEAT_S:
        return False
    if run_dir is not None and marker.get("host") == socket.gethostname():
        return RunLock(run_dir).held_by_other()  # same machine: the lock tells at once
    return True


@contextlib.contextmanager
def output_to(path: Path, *, append: bool = True) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors too, for subprocesses) to `path`
    (appended to, or truncated first), then restore them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
