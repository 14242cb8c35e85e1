"""Verified checkpoints and disk-full failures (issue 16, items 4-5); forged and foreign checkpoints
(issue 29, items 2-3).

Fast: the verify function (truncated, missing, changed files), choosing the checkpoint to resume from
(fallback, train.resume_from_step, another trajectory's refused, an older version's resumed), pruning
only this trajectory's, RNG state through JSON bit for bit, DiskFull, ShardWriter and stage.json on a
full tmpfs (root only), a forged pickle refused by the restricted load, checkpoint folders that a
symlink takes out of the run directory.
Slow (real DeepSpeed, gloo ranks as in test_train.py): a truncated newest checkpoint falls back to
the previous one (saved before checkpoints recorded their trajectory) and ends bitwise equal;
train.resume_from_step; a checkpoint save that fills its disk; a forged model-states pickle, another
run's checkpoints through a symlink and through train.checkpoint_dir, all refused on real ranks.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from xlp.pipeline.core.diskfull import DiskFull, disk_full, free_bytes
from xlp.pipeline.core.errors import PipelineError
from xlp.pipeline.core.layout import RunLayout, TrainLayout, check_train_paths
from xlp.pipeline.runner import clean, keep_stale
from xlp.pipeline.train import checkpoint as ckpt
from xlp.pipeline.train.hooks import TrainHooks
from test_train import make_shards, train, weights  # noqa: F401  (make_shards: the fixture's)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def fake_checkpoint(root: Path, step: int, files: dict[str, bytes], **meta) -> Path:
    """A checkpoint folder as save() leaves it: the files, and meta.json recording them."""
    d = root / ckpt.name_of(step)
    d.mkdir(parents=True)
    records = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        records[name] = ckpt.file_record(d / name)
    (d / ckpt.META).write_text(json.dumps({"step": step, ckpt.FILES: records, **meta}))
    return d


FILES = {"mp_rank_00_model_states.pt": os.urandom(5000), "rank_00000.json": b'{"a": 1}\n'}


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for p in reversed(mounts):
        subprocess.run(["umount", "-l", str(p)], check=False)


# ---------------------------------------------------------------------------------------------
# fast


def test_verify_finds_truncated_missing_and_changed_files(tmp_path):
    d = fake_checkpoint(tmp_path, 10, FILES)
    assert ckpt.verify(d) == []
    model = d / "mp_rank_00_model_states.pt"
    data = model.read_bytes()

    model.write_bytes(data[:1000])
    assert ckpt.verify(d) == ["mp_rank_00_model_states.pt: truncated (1000 bytes, 5000 recorded)"]
    assert ckpt.verify(d, full_hash=False) != []  # the size check alone finds it

    flipped = bytearray(data)
    flipped[1234] ^= 0xFF
    model.write_bytes(bytes(flipped))
    problems = ckpt.verify(d)
    assert len(problems) == 1 and problems[0].startswith("mp_rank_00_model_states.pt: sha256 mismatch")
    assert ckpt.verify(d, full_hash=False) == []  # same size: only the hash tells

    model.write_bytes(data)
    (d / "rank_00000.json").unlink()
    assert ckpt.verify(d) == ["rank_00000.json: missing"]

    # two ranks split the files; together they find everything
    shares = [ckpt.verify(d, share=(r, 2)) for r in range(2)]
    assert sorted(sum(shares, [])) == ["rank_00000.json: missing"] and [] in shares

    (d / ckpt.META).write_text(json.dumps({"step": 10}))  # an older version's checkpoint: no records
    assert "cannot be verified" in ckpt.verify(d)[0]
    (d / ckpt.META).write_text("{not json")
    assert ckpt.verify(d)[0].startswith("meta.json: unreadable")


def test_choose_falls_back_from_a_damaged_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10, FILES)
    d20 = fake_checkpoint(root, 20, FILES)
    (root / (ckpt.TMP_PREFIX + ckpt.name_of(30))).mkdir()  # a killed save
    with open(d20 / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    said: list[str] = []
    chosen = ckpt.choose(root, rank=0, world_size=1, say=said.append)
    assert chosen == root / ckpt.name_of(10)
    assert any("step_00000020 is damaged: mp_rank_00_model_states.pt: truncated (100 bytes, 5000 recorded)" in s
               for s in said), said
    assert (root / (ckpt.DAMAGED_PREFIX + ckpt.name_of(20))).is_dir()  # kept for inspection, out of the way
    fake_checkpoint(root, 40, {"a": b"x"})
    (root / ckpt.name_of(40) / "a").write_bytes(b"y")
    stale = tmp_path / ".stale"
    assert ckpt.choose(root, rank=0, world_size=1, aside=stale) == root / ckpt.name_of(10)
    assert (stale / f"train-{ckpt.name_of(40)}-damaged").is_dir()  # RUN_DIR/.stale, for `xlp clean`
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10]
    assert not (root / (ckpt.TMP_PREFIX + ckpt.name_of(30))).exists()

    # nothing verifies: an error naming each, not a silent fresh start
    (root / ckpt.name_of(10) / "rank_00000.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint .* verifies.*step_00000010: rank_00000.json: missing"):
        ckpt.choose(root, rank=0, world_size=1, say=said.append)
    assert ckpt.choose(tmp_path / "none", rank=0, world_size=1) is None


def test_choose_resume_from_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        fake_checkpoint(root, step, FILES)
    with pytest.raises(ckpt.CheckpointError, match=r"resume_from_step=15: there is no checkpoint of step 15 .*"
                                                   r"available steps: 10, 20, 30"):
        ckpt.choose(root, rank=0, world_size=1, resume_from_step=15)
    said: list[str] = []
    assert ckpt.choose(root, rank=0, world_size=1, resume_from_step=20, say=said.append) == root / ckpt.name_of(20)
    # the old trajectory's newer checkpoint is kept aside, so neither pruning nor a later resume takes it
    assert (root / (ckpt.SUPERSEDED_PREFIX + ckpt.name_of(30))).is_dir()
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10, 20]
    # the branch saved step 25 and was stopped: the same config continues the branch
    fake_checkpoint(root, 25, FILES, resume_from_step=20)
    assert ckpt.choose(root, rank=0, world_size=1, resume_from_step=20) == root / ckpt.name_of(25)
    # a damaged chosen checkpoint is an error (no silent fallback to another step)
    (root / ckpt.name_of(25) / "rank_00000.json").write_bytes(b'{"a": 2}\n')
    with pytest.raises(ckpt.CheckpointError, match="resume_from_step=20: .*step_00000025 is damaged.*sha256"):
        ckpt.choose(root, rank=0, world_size=1, resume_from_step=20)


def test_prune_never_removes_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        fake_checkpoint(root, step, FILES)
    ckpt.prune(root, keep=1, trajectory=None, protect=root / ckpt.name_of(20))
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [20, 30]


OURS, THEIRS = "0123456789abcdef", "fedcba9876543210"


def test_another_trajectorys_checkpoint_is_refused_and_never_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5, FILES)  # saved before checkpoints recorded their trajectory
    for step in (10, 20):
        fake_checkpoint(root, step, FILES, trajectory=OURS)
    fake_checkpoint(root, 30, FILES, trajectory=THEIRS)  # another run's, in the same folder
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ckpt.CheckpointError, match=rf"{ckpt.name_of(30)} is not this run's: it records train "
                                                   rf"trajectory {THEIRS}, and this run's is {OURS}"):
        ckpt.choose(root, rank=0, world_size=1, trajectory=OURS, aside=tmp_path / ".stale")
    assert sorted(p.name for p in root.iterdir()) == before and not (tmp_path / ".stale").exists()

    # pruning to one keeps the newest of ours, and neither the other run's nor the unmarked one
    ckpt.prune(root, keep=1, trajectory=OURS, protect=root / ckpt.name_of(20))
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [5, 20, 30]

    # the other run's checkpoint moved out: ours resumes
    shutil.move(root / ckpt.name_of(30), tmp_path / "theirs")
    said: list[str] = []
    assert ckpt.choose(root, rank=0, world_size=1, trajectory=OURS, say=said.append) == root / ckpt.name_of(20)
    assert not said  # ours: nothing to say

    # an older version's checkpoint is resumed as this run's, with a note
    (root / ckpt.name_of(20) / ckpt.META).unlink()
    assert ckpt.choose(root, rank=0, world_size=1, trajectory=OURS, say=said.append) == root / ckpt.name_of(5)
    assert said == [f"checkpoint {ckpt.name_of(5)} records no trajectory (saved by an older version): resuming it "
                    "as this run's; checkpoints without one are never pruned (delete them once they are not needed)"]


def test_restricted_load_refuses_a_forged_pickle(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # what DeepSpeed's files hold loads: tensors, containers, torch.Size and its own data classes
    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
                "param_shapes": [{"w": torch.Size([2, 2])}], "module": {"w": torch.ones(2, 2)}, "ds_version": "x"},
               good)
    state = ckpt.restricted_load(good, map_location="cpu")
    assert state["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert torch.equal(state["module"]["w"], torch.ones(2, 2))

    # a forged model-states file: real torch.save of a payload that creates a directory when unpickled
    marker = tmp_path / "pwned"
    forged = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "dp_world_size": _Boom(str(marker))}, forged)
    with pytest.raises(ckpt.UnsafeCheckpoint, match=rf"refusing to load checkpoint file {forged}: its pickle names "
                                                    rf"{os.mkdir.__module__}\.mkdir"):
        ckpt.restricted_load(forged, map_location="cpu")
    assert not marker.exists()
    torch.load(forged, weights_only=False)  # what DeepSpeed's own load would do: the payload runs
    assert marker.is_dir()


def test_checkpoint_folders_linked_out_of_the_run_are_refused(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other" / "checkpoints"
    out = TrainLayout(run / "train")
    other.mkdir(parents=True)
    fake_checkpoint(other, 30, FILES, trajectory=THEIRS)
    check_train_paths(run, out, None)  # nothing there yet
    out.root.mkdir(parents=True)
    out.checkpoints.symlink_to(other)
    with pytest.raises(PipelineError, match=rf"{out.checkpoints} leads out of the run directory {run} through a "
                                            rf"symlink \(to {other}\).*set train.checkpoint_dir={other}"):
        check_train_paths(run, out, None)
    check_train_paths(run, out, str(other))  # the place the user names explicitly
    with pytest.raises(PipelineError, match=rf"train.checkpoint_dir is {tmp_path}/elsewhere, but "
                                            rf"{out.checkpoints} is a link to {other}"):
        check_train_paths(run, out, str(tmp_path / "elsewhere"))
    # a link inside the run directory is the run's own
    out.checkpoints.unlink()
    (run / "ckpt").mkdir()
    out.checkpoints.symlink_to(run / "ckpt")
    check_train_paths(run, out, None)
    # a step folder linked in from outside
    (run / "ckpt" / ckpt.name_of(30)).symlink_to(other / ckpt.name_of(30))
    with pytest.raises(PipelineError, match=rf"{ckpt.name_of(30)} is a symlink that leads out of the checkpoints"):
        check_train_paths(run, out, None)
    # the train folder itself
    shutil.rmtree(out.root)
    out.root.symlink_to(other.parent)
    with pytest.raises(PipelineError, match=rf"{out.root} leads out of the run directory"):
        check_train_paths(run, out, None)
    out.root.unlink()
    # train.checkpoint_dir: the run makes the link (in place of an empty folder); a folder with
    # checkpoints of its own stays and is refused
    out.checkpoints.mkdir(parents=True)
    target = tmp_path / "big" / "run1"
    check_train_paths(run, out, str(target), create=True)
    assert out.checkpoints.is_symlink() and out.checkpoints.resolve() == target.resolve()
    out.checkpoints.unlink()
    fake_checkpoint(out.checkpoints, 10, FILES)
    with pytest.raises(PipelineError, match=rf"{out.checkpoints} is a folder of the run directory"):
        check_train_paths(run, out, str(target), create=True)
    assert ckpt.complete_checkpoints(out.checkpoints)
    assert [s for s, _ in ckpt.complete_checkpoints(other)] == [30]  # nothing of the other run's touched


def test_a_stale_folder_linked_out_of_the_run_is_neither_filled_nor_cleaned(tmp_path):
    run, theirs = RunLayout(tmp_path / "run"), tmp_path / "other" / ".stale"
    (theirs / "train-0123").mkdir(parents=True)
    (theirs / "train-0123" / "model.safetensors").write_bytes(b"another run's weights")
    (run.root / "train").mkdir(parents=True)
    run.stale_dir.symlink_to(theirs)
    for act in (lambda: clean(run.root, io.StringIO()), lambda: keep_stale(run, "train", {"fingerprint": "ab"}),
                lambda: check_train_paths(run.root, run.train, None)):
        with pytest.raises(PipelineError, match=rf"{run.stale_dir} leads out of the run directory {run.root} "
                                                rf"through a symlink \(to {theirs}\)"):
            act()
    assert (theirs / "train-0123" / "model.safetensors").is_file() and (run.root / "train").is_dir()


def test_rng_state_through_json_is_exact():
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)
    state = json.loads(json.dumps(ckpt.rng_state()))

    def draw():
        return (torch.rand(5).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1),
                np.random.standard_normal(3).tolist(), np.random.randint(0, 1 << 30, 3).tolist())

    first = draw()
    ckpt.set_rng_state(state)
    assert draw() == first


def test_own_files_are_read_without_unpickling(tmp_path, monkeypatch):
    d = tmp_path / ckpt.name_of(10)
    d.mkdir()
    ckpt.write_json_file(d / ckpt.rank_state_name(0), {"rng": ckpt.rng_state(), "loader": {"batches": 3}})
    marker = tmp_path / "pwned"
    (d / "rank_00000.pt").write_bytes(pickle.dumps(_Boom(str(marker))))  # an old-style file, crafted

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load called on our own files")

    monkeypatch.setattr(torch, "load", no_torch_load)
    state = ckpt.read_json_file(d / ckpt.rank_state_name(0))
    ckpt.set_rng_state(state["rng"])
    assert state["loader"] == {"batches": 3} and not marker.exists()


class _Boom:
    """Unpickling this creates a directory: the proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_disk_full_error_message_and_pickling():
    e = disk_full("/runs/x/train/checkpoints/.tmp.step_00000010/a.pt")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e) == ("No space left on device writing /runs/x/train/checkpoints/.tmp.step_00000010/a.pt: "
                      "free space or move run.dir")
    back = pickle.loads(pickle.dumps(e))  # crosses a Ray task boundary intact
    assert type(back) is DiskFull and str(back) == str(e) and back.errno == errno.ENOSPC


@needs_root
def test_shard_writer_disk_full(tmp_path, tmpfs):
    from xlp.pipeline.data.shards import ShardWriter, complete_shards, token_dtype
    from test_train import synthetic_docs

    out = tmpfs(tmp_path / "shard", "96k")
    w = ShardWriter(out, "train", 0, dtype=token_dtype(64), sample_tokens=512, shard_bytes=8_000)
    with pytest.raises(DiskFull, match=r"No space left on device writing .*/shard/.*: free space or move run.dir"):
        for doc in synthetic_docs(5000, 0):
            w.add_doc(doc, "synthetic")
        w.close()
    assert not list(out.glob(".*.tmp")), "the shard being written is removed"
    done = complete_shards(out, "train", 0)
    assert done and all((out / r["path"]).is_file() for r in done)  # finished shards stay, for a rerun


@needs_root
def test_stage_json_says_failed_on_a_full_disk(tmp_path, tmpfs):
    from conftest import fill_disk
    from xlp.pipeline.core.stage import StageMarker, atomic_write_json, marker_status

    d = tmpfs(tmp_path / "stage", "64k")
    marker = StageMarker(d / "stage.json", "train", fingerprint="abc", trajectory="t", resumed=False)
    fill_disk(d / "filler")
    with pytest.raises(OSError):
        atomic_write_json(d / "probe.json", {"x": 1})  # an atomic rewrite has no room
    marker.failed("DiskFull: No space left on device writing /x: free space or move run.dir")
    got = json.loads((d / "stage.json").read_text())
    assert got["status"] == "failed" and "No space left" in got["error"]
    assert marker_status(got, "abc") == "failed"


# ---------------------------------------------------------------------------------------------
# slow: real DeepSpeed ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data") / "shard")


COMMON = ["train.zero_stage=2", "train.steps=20", "train.save_every=10", "train.eval_every=10",
          "train.eval_batches=2", "train.keep_checkpoints=2", "model.d_model=16", "data.seq_len=16"]


def rank0_log(run: Path) -> str:
    return (run / "train" / "logs" / "rank_0.log").read_text()


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back(tmp_path, shards):
    run = tmp_path / "run"
    train(run, shards, COMMON)
    root = run / "train" / "checkpoints"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10, 20]
    full = weights(run)
    newest = root / ckpt.name_of(20)
    # our files are JSON (nothing of ours to unpickle); meta.json records every file, and they verify
    assert sorted(p.name for p in newest.glob("rank_*")) == ["rank_00000.json", "rank_00001.json"]
    files = ckpt.read_meta(newest)[ckpt.FILES]
    assert set(files) == {p.name for p in newest.iterdir() if p.name != ckpt.META}
    assert any(n.endswith("optim_states.pt") for n in files) and ckpt.verify(newest) == []

    victim = max(files, key=lambda n: files[n]["bytes"])
    with open(newest / victim, "r+b") as f:
        f.truncate(files[victim]["bytes"] // 2)
    marker = tmp_path / "pwned"  # a crafted pickle where the old format kept the rank state
    (root / ckpt.name_of(10) / "rank_00000.pt").write_bytes(pickle.dumps(_Boom(str(marker))))
    shutil.rmtree(run / "train" / "model")
    (run / "train" / "result.json").unlink()
    # step 10 as a version before issue 29 saved it: no trajectory in meta.json (it still resumes)
    meta = ckpt.read_meta(root / ckpt.name_of(10))
    assert meta.pop(ckpt.TRAJECTORY) == ckpt.read_meta(newest)[ckpt.TRAJECTORY]
    (root / ckpt.name_of(10) / ckpt.META).write_text(json.dumps(meta))

    result = train(run, shards, COMMON)
    assert result["step"] == 20
    log = rank0_log(run)
    assert f"{newest} is damaged: {victim}: truncated" in log, log[-3000:]
    assert f"{ckpt.name_of(10)} records no trajectory (saved by an older version): resuming it" in log
    assert f"resumed from {root / ckpt.name_of(10)}" in log
    assert (run / ".stale" / f"train-{newest.name}-damaged").is_dir()  # kept until `xlp clean`
    assert ckpt.verify(newest) == []  # saved again, whole
    assert not marker.exists()
    again = weights(run)
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k


@pytest.mark.slow
def test_resume_from_step(tmp_path, shards):
    from xlp.pipeline.cluster.launch import TrainFailed

    run = tmp_path / "run"
    train(run, shards, COMMON)
    full = weights(run)
    root = run / "train" / "checkpoints"
    with pytest.raises(TrainFailed, match=r"resume_from_step=7: there is no checkpoint of step 7 .*available steps: 10, 20"):
        train(run, shards, [*COMMON, "train.resume_from_step=7"])
    result = train(run, shards, [*COMMON, "train.resume_from_step=10"])
    assert result["step"] == 20
    assert f"resumed from {root / ckpt.name_of(10)}" in rank0_log(run)
    assert (run / ".stale" / f"train-{ckpt.name_of(20)}-superseded").is_dir()
    assert ckpt.read_meta(root / ckpt.name_of(20))["resume_from_step"] == 10
    again = weights(run)
    for k in full:
        assert torch.equal(full[k], again[k]), k


def tree(root: Path) -> dict[str, int]:
    """Every file under `root`: its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def rehash(folder: Path, name: str) -> None:
    """Record `name`'s new size and sha256 in meta.json, as a forger who can write the folder would."""
    meta = ckpt.read_meta(folder)
    meta[ckpt.FILES][name] = ckpt.file_record(folder / name)
    (folder / ckpt.META).write_text(json.dumps(meta))


@pytest.mark.slow
def test_forged_and_foreign_checkpoints_are_refused(tmp_path, shards):
    from xlp.pipeline.cluster.launch import TrainFailed

    short = [*COMMON, "train.steps=4", "train.save_every=2", "train.eval_every=0"]
    run = tmp_path / "a"
    train(run, shards, short, procs=1)
    root = run / "train" / "checkpoints"
    listing = tree(root)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2, 4]
    trajectory = ckpt.read_meta(root / ckpt.name_of(4))[ckpt.TRAJECTORY]
    assert len(trajectory) == 16 and ckpt.read_meta(root / ckpt.name_of(2))[ckpt.TRAJECTORY] == trajectory

    # item 3: another run (another learning rate) whose checkpoints folder is a link to run a's
    b = tmp_path / "b"
    (b / "train").mkdir(parents=True)
    (b / "train" / "checkpoints").symlink_to(root)
    other = [*short, "train.lr=2e-3", "train.steps=8"]
    with pytest.raises(TrainFailed, match=rf"{b}/train/checkpoints leads out of the run directory {b} through a "
                                          rf"symlink \(to {root}\)"):
        train(b, shards, other, procs=1)
    # named explicitly, the folder is used, and a's checkpoints are refused as another trajectory's
    with pytest.raises(TrainFailed, match=rf"{ckpt.name_of(4)} is not this run's: it records train trajectory "
                                          rf"{trajectory}, and this run's is (?!{trajectory})[0-9a-f]{{16}}"):
        train(b, shards, [*other, f"train.checkpoint_dir={root}"], procs=1)
    assert tree(root) == listing  # nothing written, moved or pruned
    assert all(ckpt.verify(p) == [] for _, p in ckpt.complete_checkpoints(root))

    # item 2: a forged model-states pickle, meta.json re-hashed to match
    marker = tmp_path / "pwned"
    newest = root / ckpt.name_of(4)
    torch.save({"module": {}, "dp_world_size": _Boom(str(marker))}, newest / "mp_rank_00_model_states.pt")
    rehash(newest, "mp_rank_00_model_states.pt")
    assert ckpt.verify(newest) == []
    with pytest.raises(TrainFailed, match=rf"refusing to load checkpoint file {newest}/mp_rank_00_model_states.pt: "
                                          rf"its pickle names {os.mkdir.__module__}\.mkdir"):
        train(run, shards, [*short, "train.steps=6"], procs=1)
    assert not marker.exists()
    assert sorted(tree(root)) == sorted(listing)  # the forged checkpoint is kept, for a look


class FillDiskAfterFirstSave(TrainHooks):
    """Rank 0, once the first checkpoint is whole: fill its file system up to half a checkpoint's
    size from full, so that the next save (which keeps the old one until it is whole) cannot fit."""

    def __init__(self) -> None:
        self.done = False

    def saved(self, step):
        if self.done or os.environ.get("RANK", "0") != "0":
            return
        self.done = True
        folder = Path(os.environ["XLP_TEST_CKPT_DIR"]) / ckpt.name_of(step)
        size = sum(p.stat().st_size for p in folder.iterdir())
        free = free_bytes(folder)
        with open(folder.parent / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(1, free - size // 2))


FILL_DISK_AFTER_FIRST_SAVE = FillDiskAfterFirstSave


@pytest.mark.slow
@needs_root
def test_checkpoint_save_on_a_full_disk(tmp_path, shards, tmpfs, monkeypatch):
    from xlp.pipeline.cluster.launch import TrainFailed

    run = tmp_path / "run"
    root = tmpfs(run / "train" / "checkpoints", "64m")
    monkeypatch.setenv("XLP_TEST_CKPT_DIR", str(root))
    common = [*COMMON, "train.keep_checkpoints=1"]
    with pytest.raises(TrainFailed, match=r"No space left on device writing \S*/checkpoints/\.tmp\.step_00000020\S*: "
                                          "free space or move run.dir"):
        train(run, shards, common, hooks="test_checkpoints:FILL_DISK_AFTER_FIRST_SAVE")
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10]
    assert ckpt.verify(root / ckpt.name_of(10)) == []  # the older checkpoint is whole
    assert not [p for p in root.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]  # the failed save's space is free

    subprocess.run(["mount", "-o", "remount,size=256m", str(root)], check=True)  # space freed
    result = train(run, shards, common)
    assert result["step"] == 20
    assert f"resumed from {root / ckpt.name_of(10)}" in rank0_log(run)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [20]
