"""The train stage: config, schedule, parameter groups, checkpoints, and (slow) real 2-rank DeepSpeed runs
on CPU gloo processes: ZeRO 0-3 agreement, exact resume after SIGKILL, learning, W&B offline metrics,
SIGTERM, non-finite steps.

The slow tests start DeepSpeed ranks as subprocesses (~10-20 s of start-up each on two cores);
nothing is JIT-compiled (xlp.pipeline.train.dist.skip_shm_comm_build).
"""
from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xlp.pipeline.core.config import ConfigError, load_config, to_yaml
from xlp.pipeline.data.shards import MANIFEST, ShardWriter, build_manifest, token_dtype
from xlp.pipeline.train import checkpoint as ckpt
from xlp.pipeline.core.schema.train import TrainConfig
from xlp.pipeline.train.dist import detect
from xlp.pipeline.train.hooks import TrainHooks, load_hooks
from xlp.pipeline.train.monitor import read_metrics
from xlp.pipeline.train.optim import StepGate, param_groups
from xlp.pipeline.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers: tiny synthetic shards, configs, a reader for offline W&B runs

VOCAB = 64
EOS = 2


def synthetic_docs(n_docs: int, seed: int, vocab: int = VOCAB) -> list[np.ndarray]:
    """Documents from a sparse Markov chain: each token has 2 likely successors, so the next-token
    entropy (about 0.8 nats) is far below the unigram entropy (about log(vocab - 3) nats)."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(1234).integers(3, vocab, size=(vocab, 2))
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(40, 200))
        tok = int(rng.integers(3, vocab))
        out = []
        for _ in range(n):
            out.append(tok)
            r = rng.random()
            tok = int(table[tok, 0] if r < 0.7 else table[tok, 1] if r < 0.95 else rng.integers(3, vocab))
        out.append(EOS)
        docs.append(np.asarray(out, dtype=np.int64))
    return docs


def make_shards(out_dir: Path, *, train_docs: int = 400, val_docs: int = 60, shard_bytes: int = 8_000,
                seed: int = 0, group: str = "", partition: int = 0) -> Path:
    """A shard-stage output (manifest.json + tar shards) written with the data library. `group`: the
    shards are that data.mixture group's; call once per group (each its own `partition`) into one folder,
    and the manifest lists them all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(VOCAB)
    for split, n, s in (("train", train_docs, seed), ("val", val_docs, seed + 1)):
        w = ShardWriter(out_dir, split, partition, dtype=dtype, sample_tokens=512, shard_bytes=shard_bytes,
                        group=group)
        for doc in synthetic_docs(n, s):
            w.add_doc(doc, "synthetic")
        w.close()
    manifest = build_manifest(out_dir, dtype=dtype, tokenizer_info={"vocab_size": VOCAB}, config={},
                              read_counts={}, per_source={})
    (out_dir / MANIFEST).write_text(json.dumps(manifest))
    return out_dir


def unigram_entropy(docs: list[np.ndarray]) -> float:
    """Entropy (nats) of the token distribution of the targets (every token after the first)."""
    counts = np.bincount(np.concatenate([d[1:] for d in docs]), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.num_blocks=2", "model.num_heads=2",
    "data.seq_len=32", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup=2", "train.min_lr=3e-4",
    "train.eval_batches=4", "train.log_every=5", "wandb.mode=disabled",
]


def write_config(run_dir: Path, overrides: list[str]) -> Path:
    cfg = load_config(None, [f"run.dir={run_dir}", *TINY, *overrides])
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (`run-<id>.wandb`)."""
    return read_wandb_records(run_file, "history")


def read_wandb_summary(run_file: Path) -> dict:
    """The run summary of an offline W&B run file: each key's last value."""
    out: dict = {}
    for update in read_wandb_records(run_file, "summary"):
        out.update(update)
    return out


def read_wandb_records(run_file: Path, kind: str) -> list[dict]:
    """The records of one kind ("history" rows, "summary" updates) of an offline W&B run file, as dicts.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
    records, each with a 7-byte header (crc32, little-endian uint16 length, type: 1 full, 2 first,
    3 middle, 4 last); each whole record is a protobuf `wandb.proto.Record`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block = 32 * 1024
    pos, rows, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if rtype == 0 and length == 0:
            continue
        buf = chunk if rtype in (1, 2) else buf + chunk
        if rtype in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") != kind:
                continue
            items = rec.history.item if kind == "history" else rec.summary.update
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


# ---------------------------------------------------------------------------------------------
# fast


def test_config_defaults_and_validation():
    cfg = load_config(None, ["train.schedule=wsd", "train.betas=[0.9,0.99]",
                             "train.deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert cfg.train.schedule == "wsd" and list(cfg.train.betas) == [0.9, 0.99]
    for override, key in [
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.precision=fp16", "train.precision"),
        ("train.schedule=linear", "train.schedule"),
        ("train.min_lr=1", "train.min_lr"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.hang_timeout=-1", "train.hang_timeout"),
        ("train.offload_params=true", "train.offload_params"),
        ("train.deepspeed={gradient_accumulation_steps: 4}", "train.deepspeed.gradient_accumulation_steps"),
        ("train.deepspeed={zero_optimization: {stage: 3}}", "train.deepspeed.zero_optimization.stage"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(None, ["train.nope=1"])


def test_deepspeed_config_passthrough():
    tc = TrainConfig(micro_batch_size=4, grad_accum=3, zero_stage=2, grad_clip=0.5, offload_optimizer=True,
                     deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "communication_data_type": "fp32"})
    ds = tc.deepspeed_config(world_size=2, cuda=False)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 1000}
    assert ds["communication_data_type"] == "fp32" and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert lr_at(1, **kw) == pytest.approx(0.1) and lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    wsd = dict(kw, schedule="wsd", wsd_decay=0.2)  # decay over the last 22 steps
    assert lr_at(50, **wsd) == 1.0 and lr_at(88, **wsd) == 1.0
    assert lr_at(99, **wsd) == pytest.approx(0.55) and lr_at(110, **wsd) == pytest.approx(0.1)
    assert all(lr_at(s, **wsd) >= lr_at(s + 1, **wsd) for s in range(10, 110))


def test_exp_schedule_is_the_xlstm_7b_one():
    """xLSTM 7B (../shared/reference/xlstm-papers.md): 3,000 warmup steps, exponential decay reaching 0.1x the
    peak at step 500k, a 7,000-step linear cooldown ending the 550k steps; with a fixed rate a longer run
    follows the same curve until its own cooldown (so it can be continued)."""
    from xlp.pipeline.core.schema.train import TrainConfig
    from xlp.pipeline.train.schedule import continuation_note

    x7b = dict(lr=5e-4, min_lr=5e-5, warmup=3000, steps=550_000, schedule="exp", wsd_decay=7000 / 550_000,
               exp_decay_steps=497_000)
    assert lr_at(3000, **x7b) == pytest.approx(5e-4) and lr_at(1500, **x7b) == pytest.approx(2.5e-4)
    assert lr_at(500_000, **x7b) == pytest.approx(5e-5)  # 0.1x the peak at step 500k
    at_cooldown = lr_at(543_000, **x7b)
    assert at_cooldown == pytest.approx(5e-4 * 0.1 ** (540_000 / 497_000))  # still exponential at step 543k
    assert lr_at(546_500, **x7b) == pytest.approx(at_cooldown / 2) and lr_at(550_000, **x7b) == 0.0
    lrs = [lr_at(s, **x7b) for s in range(3000, 550_001, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    longer = dict(x7b, steps=700_000)  # same curve until the shorter run's cooldown
    assert all(lr_at(s, **longer) == lr_at(s, **x7b) for s in (10, 3000, 100_000, 543_000))
    note = continuation_note(at=200_000, old_steps=550_000, old_schedule="exp", old_warmup=3000,
                             old_wsd_decay=7000 / 550_000, old_exp_decay_steps=497_000, new_steps=700_000)
    assert "exactly the run configured with train.steps=700000" in note
    with pytest.raises(ValueError, match="train.min_lr"):
        TrainConfig(schedule="exp", min_lr=0.0).validate()


def test_param_groups_exclude_norms_biases_embeddings():
    from xlp.xlstm_model import ModelConfig, build_model

    for arch, extra in [("xlstm", {"slstm_at": [1]}), ("llama", {"tie_weights": True}), ("xlstm_large", {})]:
        model = build_model(ModelConfig(arch=arch, vocab_size=VOCAB, d_model=32, num_blocks=2, num_heads=2, **extra))
        groups = {g["name"]: g for g in param_groups(model, 0.1)}
        no_decay = {id(p) for p in groups["no_decay"]["params"]}
        decay = {id(p) for p in groups["decay"]["params"]}
        assert not no_decay & decay
        assert no_decay | decay == {id(p) for p in model.parameters()}
        for name, p in model.named_parameters():
            if p.ndim < 2 or "emb" in name or name.endswith("bias"):
                assert id(p) in no_decay, name
        emb = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        assert emb and all(id(w) in no_decay for w in emb)
        assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1


def test_step_gate_skips_update_and_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    gate = StepGate(opt)
    p.grad = torch.ones(3)
    gate.close()
    opt.step()
    gate.open()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_dist_detect(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_PROCID",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert detect().launcher == "single"
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert detect() == ckpt_env(5, 8, 1, 4, "slurm")
    monkeypatch.setenv("RANK", "3")  # torchrun/deepspeed inside an allocation win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert detect() == ckpt_env(3, 4, 1, 2, "env")


def ckpt_env(*a):
    from xlp.pipeline.train.dist import DistEnv

    return DistEnv(*a)


def test_checkpoint_listing_ignores_partial_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        d = root / ckpt.name_of(step)
        d.mkdir(parents=True)
        (d / ckpt.META).write_text(json.dumps({"step": step}))
    (root / ckpt.name_of(40)).mkdir()  # no meta.json: a save that never finished renaming
    (root / (ckpt.TMP_PREFIX + ckpt.name_of(50))).mkdir()
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [10, 20, 30]
    ckpt.remove_partial(root)
    assert not (root / (ckpt.TMP_PREFIX + ckpt.name_of(50))).exists()
    ckpt.prune(root, keep=2, trajectory=None)  # checkpoints that record no trajectory
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [20, 30]


def test_hooks_and_metrics_reader(tmp_path):
    from train_faults import KILL_AFTER_SAVE_30, NAN_LOSS_AT_3_4

    assert type(load_hooks(None)) is TrainHooks and load_hooks("train_faults:NAN_LOSS_AT_3_4") is NAN_LOSS_AT_3_4
    assert load_hooks("train_faults:KILL_AFTER_SAVE_30") is KILL_AFTER_SAVE_30
    assert math.isnan(NAN_LOSS_AT_3_4.loss(3, 0, torch.tensor(1.0))) and NAN_LOSS_AT_3_4.loss(3, 1, 1.0) == 1.0
    assert NAN_LOSS_AT_3_4.loss(5, 0, 1.0) == 1.0
    for spec, words in (("nocolon", "expected module:name"), ("train_faults:NOPE", "NOPE"),
                        ("train_faults:signal", "not a TrainHooks")):
        with pytest.raises(ValueError, match=words):
            load_hooks(spec)
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 2, "a": 3}\n{"step": 3, "a"')
    assert read_metrics(p) == {1: {"step": 1, "a": 1}, 2: {"step": 2, "a": 3}}


def test_train_stage_registered():
    from xlp.pipeline.core.registry import STAGES

    stage = {s.name: s for s in STAGES}["train"]
    assert stage.needs == ("tokenizer", "shard")
    assert not any(k.startswith("wandb") for k in stage.reads)
    assert callable(stage.load_fn())


# ---------------------------------------------------------------------------------------------
# slow: real DeepSpeed ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data") / "shard")


def train(run_dir: Path, shards: Path, overrides: list[str], procs: int = 2, hooks: str | None = None) -> dict:
    from xlp.pipeline.cluster.launch import launch

    config = write_config(run_dir, [f"train.cpu_processes={procs}", *overrides])
    launch(run_dir, config=config, cpu_processes=procs, shard_dir=shards, hooks=hooks)
    return json.loads((run_dir / "train" / "result.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["train/loss"] for s, r in read_metrics(run_dir / "train" / "metrics.jsonl").items()}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "train" / "model" / "model.safetensors")


ZERO_STEPS = ["train.steps=8", "train.grad_accum=2", "train.eval_every=0", "train.eval_batches=2",
              "train.save_every=0"]
# fp32 ZeRO stages differ only in reduction order (all-reduce vs reduce-scatter, bucket sums):
# ~1e-7 relative per step; after 8 steps of Adam at lr 3e-3 losses agree to well within 1e-3.
ZERO_TOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["xlstm", "xlstm_slstm"])
def test_zero_stages_follow_zero0(tmp_path, shards, arch):
    extra = ["model.slstm_at=[1]"] if arch == "xlstm_slstm" else []
    stages = (0, 1, 2, 3) if arch == "xlstm" else (0, 3)
    runs = {}
    for z in stages:
        run = tmp_path / f"z{z}"
        train(run, shards, [*ZERO_STEPS, *extra, f"train.zero_stage={z}"])
        runs[z] = run
    ref = losses(runs[0])
    assert sorted(ref) == list(range(1, 9)) and ref[8] < ref[1]
    for z in stages[1:]:
        got = losses(runs[z])
        assert sorted(got) == sorted(ref)
        for s in ref:
            assert abs(got[s] - ref[s]) < ZERO_TOL, (z, s, got[s], ref[s])
        # the consolidated model (gathered from ZeRO partitions/shards) matches ZeRO-0's. Compared per
        # tensor by relative norm: Adam turns reduction-order noise in near-zero gradients into
        # full-size (lr) steps of either sign, so single elements can differ by ~lr.
        w0, wz = weights(runs[0]), weights(runs[z])
        assert w0.keys() == wz.keys()
        for k in w0:
            assert wz[k].shape == w0[k].shape
            assert (wz[k] - w0[k]).norm() <= 1e-3 * max(w0[k].norm(), 1e-3), (z, k)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, shards):
    from xlp.pipeline.cluster.launch import RanksLost

    common = ["train.zero_stage=2", "train.steps=60", "train.save_every=30", "train.eval_every=20",
              "train.eval_batches=2", "train.keep_checkpoints=1", "model.d_model=16", "data.seq_len=16"]
    full = tmp_path / "full"
    train(full, shards, common)

    killed = tmp_path / "killed"
    with pytest.raises(RanksLost, match="SIGKILL"):  # every rank killed: the first is named, retryable
        train(killed, shards, common, hooks="train_faults:KILL_AFTER_SAVE_30")
    assert ckpt.complete_checkpoints(killed / "train" / "checkpoints")[-1][1].name == ckpt.name_of(30)
    assert max(read_metrics(killed / "train" / "metrics.jsonl")) == 30
    result = train(killed, shards, common)  # the rerun resumes from step 30
    assert result["step"] == 60
    assert "resumed from" in (killed / "train" / "logs" / "rank_0.log").read_text()

    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 61))
    assert [a[s] for s in range(31, 61)] == [b[s] for s in range(31, 61)]  # bitwise equal floats
    wa, wb = weights(full), weights(killed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_learns_and_logs_to_wandb_offline(tmp_path, shards):
    run = tmp_path / "learn"
    result = train(run, shards, ["train.zero_stage=1", "train.steps=150", "train.eval_every=50",
                                 "train.eval_batches=0", "train.save_every=0", "train.lr=1e-2", "train.min_lr=1e-3",
                                 "wandb.mode=offline", "wandb.tags=[test]", "model.d_model=48"])
    h = unigram_entropy(synthetic_docs(60, 1))  # the val split's documents
    assert result["val_loss"] < 0.6 * h, (result["val_loss"], h)

    files = list((run / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = read_wandb_history(files[0])
    keys = set().union(*rows)
    for key in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s", "throughput/mfu",
                "train/tokens_seen", "memory/rss_gib", "val/loss"):
        assert key in keys, key
    steps = [r["_step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 151))
    assert [r["val/loss"] for r in rows if "val/loss" in r][-1] == pytest.approx(result["val_loss"])
    assert all(r["throughput/mfu"] > 0 for r in rows if "throughput/mfu" in r)
    assert (run / "train" / "wandb_run_id").read_text().strip() in files[0].name


LAUNCH_SCRIPT = """
import sys
from pathlib import Path
from xlp.pipeline.cluster.launch import launch, TrainInterrupted
try:
    launch(Path(sys.argv[1]), config=Path(sys.argv[2]), cpu_processes=2, shard_dir=Path(sys.argv[3]))
except TrainInterrupted as e:
    print("INTERRUPTED", e, flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_sigterm_saves_checkpoint(tmp_path, shards):
    run = tmp_path / "term"
    config = write_config(run, ["train.cpu_processes=2", "train.zero_stage=3", "train.steps=100000",
                                "train.save_every=0", "train.eval_every=0"])
    p = subprocess.Popen([sys.executable, "-c", LAUNCH_SCRIPT, str(run), str(config), str(shards)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and max(read_metrics(metrics), default=0) >= 3):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 3, out
    assert "INTERRUPTED" in out and "stopped by SIGTERM" in out
    found = ckpt.complete_checkpoints(run / "train" / "checkpoints")
    assert found
    latest = found[-1][1]
    step = ckpt.read_meta(latest)["step"]
    assert step >= 3 and step == max(read_metrics(metrics))
    assert json.loads((run / "train" / "result.json").read_text())["stopped"] is True

    # the rerun resumes; then the launcher dies (SIGKILL, e.g. its Ray worker is killed): the ranks get
    # SIGTERM from the kernel (PR_SET_PDEATHSIG) and still save a checkpoint
    p = subprocess.Popen([sys.executable, "-c", LAUNCH_SCRIPT, str(run), str(config), str(shards)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while max(read_metrics(metrics), default=0) < step + 2:
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 120
    while ckpt.read_meta(ckpt.complete_checkpoints(run / "train" / "checkpoints")[-1][1])["step"] <= step:
        assert time.monotonic() < deadline, "no checkpoint after the launcher was killed"
        time.sleep(0.2)
    log = (run / "train" / "logs" / "rank_0.log").read_text()
    assert f"resumed from {latest}" in log and "stopped by SIGTERM" in log


@pytest.mark.slow
def test_a_step_out_of_memory_names_the_keys_that_size_it(tmp_path, shards):
    """Issue 29, item 10 (the GPU side): a step whose memory cannot be allocated failed with the
    allocator's own words only (CUDA's out-of-memory error, or torch's CPU allocator under a cgroup or
    ulimit the pre-check cannot see), naming no key. Reproduced for real on CPU: the rank's address space
    is capped after its first forward pass (RLIMIT_AS), so the backward pass cannot allocate. The failure
    names the rank, the step, train.micro_batch_size, data.seq_len and values to set."""
    from xlp.pipeline.cluster.launch import TrainFailed

    run = tmp_path / "oom"
    with pytest.raises(TrainFailed) as failed:
        train(run, shards, ["train.steps=2", "data.seq_len=4096", "train.micro_batch_size=8", "train.eval_every=0",
                            "train.save_every=0"], procs=1, hooks="train_faults:MEMORY_FULL_AT_1")
    said = str(failed.value)
    assert "StepOutOfMemory: step 1 ran out of CPU memory on rank 0 with train.micro_batch_size=8 rows of " \
           "data.seq_len=4096 tokens" in said, said
    assert "can't allocate memory" in said and "Set train.micro_batch_size=4 (raise train.grad_accum to keep the " \
           "batch), or data.seq_len=2048" in said, said


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_fail(tmp_path, shards):
    from xlp.pipeline.core.node import RetryableFault
    from xlp.pipeline.cluster.launch import TrainFailed

    common = ["train.steps=8", "train.eval_every=0", "train.save_every=0", "train.max_bad_steps=3"]
    # ZeRO-0 (our own check) with 2 ranks: rank 0's NaN must stop the step on both ranks
    run = tmp_path / "skip"
    result = train(run, shards, [*common, "train.zero_stage=0"], hooks="train_faults:NAN_LOSS_AT_3_4")
    m = read_metrics(run / "train" / "metrics.jsonl")
    assert result["skipped_steps"] == 2 and result["step"] == 8
    assert [m[s]["train/skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert math.isfinite(m[5]["train/loss"]) and math.isfinite(result["final_loss"])
    assert not math.isfinite(m[3]["train/grad_norm"])
    # ZeRO-2 (DeepSpeed's overflow check), one rank: 3 bad steps in a row fail the run, naming the step
    run = tmp_path / "fail"
    with pytest.raises(TrainFailed, match="at step 4.*steps 2-4.*train.max_bad_steps=3") as failed:
        train(run, shards, [*common, "train.zero_stage=2"], procs=1, hooks="train_faults:NAN_LOSS_AT_2_6")
    assert not isinstance(failed.value, RetryableFault)  # the run's own error: a rerun would fail again
