"""Sequence parallelism (xlp.xlstm_model.sequence_parallel): N gloo processes, each with its slice of the
sequence, give the outputs, loss and every gradient of one process on the whole sequence."""
from __future__ import annotations

import pytest
import torch

import sp_workers
from xlp import kernels
from xlp.xlstm_model import build_model
from xlp.xlstm_model.sequence_parallel import SeqParallel

REL = 1e-5  # fp32 rounding of a different order of the same sums, relative to the tensor's largest entry


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= REL * scale + 1e-7, f"{what}: max abs error {err:.3g} (largest entry {scale:.3g})"


def _backends() -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["reference"]
    return ["reference", "triton"]


@pytest.mark.slow  # ~35 s on 2 cores: 3 processes running the Triton interpreter
def test_mlstm_state_passes_exactly_over_three_ranks(tmp_path):
    """3 ranks (the fold over two earlier slices), reference and Triton (interpreted on CPU): h and the
    gradients of q, k, v, i, f equal one process's; documents start in the first slice and run across
    both cuts, in the second slice, exactly at a cut, and in the last slice."""
    N, S = 3, 60  # 20 tokens a slice: a full chunk of 16 and a padded one
    backends = _backends()
    sp_workers.spawn(sp_workers.kernel_rank, N, tmp_path, S, backends)
    ds = sp_workers.kernel_doc_starts(S, N)
    for backend in backends:
        *leaves, w = sp_workers.kernel_inputs(S)
        leaves = [t.requires_grad_() for t in leaves]
        h = kernels.mlstm_chunkwise(*leaves, chunk_size=sp_workers.KERNEL_SHAPE["chunk"], doc_starts=ds,
                                    backend=backend)
        (h * w).sum().backward()
        parts = [torch.load(tmp_path / f"{backend}-{r}.pt") for r in range(N)]
        _close(torch.cat([p["h"] for p in parts], dim=2), h.detach(), f"{backend}: h")
        for name, leaf, grads in zip("qkvif", leaves, zip(*(p["grads"] for p in parts))):
            _close(sum(grads), leaf.grad, f"{backend}: d{name}")


@pytest.mark.slow  # 20-26 s: two spawned gloo processes per model variant
def test_language_model_loss_and_gradients_match_one_rank(tmp_path):
    """2 ranks: xlstm_large, xlstm (its causal conv reads over the cut) under full activation
    checkpointing, xlstm_large under selective checkpointing (the recomputed forwards exchange again in
    the backward): the ranks' losses (slice sum / row targets x N) average to the full loss, and their
    parameter gradients to the full ones."""
    N, S, archs = 2, 40, ["xlstm_large", "xlstm/full", "xlstm_large/selective"]
    sp_workers.spawn(sp_workers.model_rank, N, tmp_path, S, archs)
    batch = sp_workers.model_batch(S)
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(sp_workers.model_config(arch))
        loss = model(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])
        loss.backward()
        parts = [torch.load(tmp_path / f"{arch.replace('/', '-')}-{r}.pt") for r in range(N)]
        _close(sum(p["loss"] for p in parts) / N, loss.detach(), f"{arch}: loss")
        for name, p in model.named_parameters():
            _close(sum(part["grads"][name] for part in parts) / N, p.grad, f"{arch}: grad of {name}")


@pytest.mark.parametrize("arch, extra, needle", [
    ("llama", {}, "model.arch 'llama'"),
    ("xlstm", {"slstm_at": [1]}, "model.slstm_at=[1]"),
])
def test_architectures_without_a_parallel_form_are_refused(arch, extra, needle):
    cfg = dict(sp_workers.model_config(arch), **extra)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="train.sequence_parallel=2") as err:
        model.set_sequence_parallel(SeqParallel(None, 0, 2))
    assert needle in str(err.value)
    model.set_sequence_parallel(SeqParallel(None, 0, 1))  # one rank a group: nothing to refuse


def test_slice_bounds_name_the_fix():
    sp = SeqParallel(None, 1, 3)
    assert sp.bounds(12) == (4, 8)
    with pytest.raises(ValueError, match="data.seq_len divisible by train.sequence_parallel"):
        sp.bounds(10)


# ------------------------------------------------------------------------- training (DeepSpeed, gloo)
# 8 rows a step: 1 rank x 4 rows x grad_accum 2; 2 ranks of one sequence-parallel group, grad_accum 2;
# 4 ranks = 2 data-parallel groups x 2, grad_accum 1. Every run takes the same rows at every step.
SP_RUN = ["model.arch=xlstm_large", "model.mlstm_chunk_size=16", "train.global_batch_size=8",
          "train.micro_batch_size=4", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
          "train.keep_checkpoints=5", "data.streams=4", "train.min_lr=3e-3"]
SP_STEPS, SP_HALF = 20, 10


@pytest.fixture(scope="module")
def sp_shards(tmp_path_factory):
    from test_train import make_shards

    return make_shards(tmp_path_factory.mktemp("sp") / "shard")


@pytest.fixture(scope="module")
def one_rank_run(sp_shards, tmp_path_factory):
    from test_train import train

    run = tmp_path_factory.mktemp("sp-ref") / "ref"
    train(run, sp_shards, [*SP_RUN, f"train.steps={SP_STEPS}"], procs=1)
    return run


def _steps(run):
    from xlp.pipeline.train.monitor import read_metrics

    return read_metrics(run / "train" / "metrics.jsonl")


def _assert_same_steps(run, ref, steps, rel):
    got, want = _steps(run), _steps(ref)
    for s in steps:
        assert got[s]["data/batch_hash"] == want[s]["data/batch_hash"], s  # the same rows
        assert got[s]["train/loss"] == pytest.approx(want[s]["train/loss"], rel=rel), \
            (s, got[s]["train/loss"], want[s]["train/loss"])


# train.compile: the blocks through torch.compile (aot_eager: Dynamo and AOTAutograd as inductor runs them,
# PyTorch's kernels), the state exchange a graph break in each block
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]


@pytest.mark.slow
@pytest.mark.parametrize("zero, extra", [(0, []), (3, []), (1, COMPILED)], ids=["zero0", "zero3", "compiled"])
def test_two_sequence_parallel_ranks_train_as_one(sp_shards, one_rank_run, tmp_path, zero, extra, monkeypatch):
    """ZeRO-0; ZeRO-3 (its parameter gathers in module hooks interleave with the state exchange);
    compiled blocks under ZeRO-1 against the eager 1-rank run."""
    from test_train import train

    if extra:  # the ranks' logs say where Dynamo's graphs end (PyTorch's own logging)
        monkeypatch.setenv("TORCH_LOGS", "graph_breaks")
    run = tmp_path / "sp2"
    result = train(run, sp_shards, [*SP_RUN, f"train.steps={SP_STEPS}", "train.sequence_parallel=2",
                                     f"train.zero_stage={zero}", *extra], procs=2)
    assert result["sequence_parallel"] == 2 and result["world_size"] == 2 and result["grad_accum"] == 2
    log = (run / "train" / "logs" / "rank_0.log").read_text()
    assert "sequence_parallel 2 (1 data-parallel group(s) of 2 ranks, 16 tokens of each row a rank)" in log
    if extra:  # the blocks were traced by Dynamo, which broke its graph at the exchange only
        breaks = [line for line in log.splitlines() if "Graph break" in line]
        assert breaks and all("sequence_parallel.py" in line for line in breaks), log[-3000:]
    _assert_same_steps(run, one_rank_run, range(1, SP_STEPS + 1), rel=1e-5)


@pytest.mark.slow
def test_four_ranks_zero2_match_and_resume_without_sequence_parallel(sp_shards, one_rank_run, tmp_path):
    """2 data-parallel x 2 sequence-parallel ranks, ZeRO-2, to step 10; then on 2 ranks with
    sequence_parallel=1 (another world: the elastic state) to step 20; both match the 1-rank run."""
    from test_train import train

    run = tmp_path / "sp4"
    train(run, sp_shards, [*SP_RUN, f"train.steps={SP_HALF}", "train.sequence_parallel=2", "train.zero_stage=2"],
          procs=4)
    _assert_same_steps(run, one_rank_run, range(1, SP_HALF + 1), rel=1e-5)
    result = train(run, sp_shards, [*SP_RUN, f"train.steps={SP_STEPS}", "train.zero_stage=2"], procs=2)
    assert result["sequence_parallel"] == 1 and result["resumed_from_step"] == SP_HALF
    log = (run / "train" / "logs" / "rank_0.log").read_text()
    assert (f"resuming 4-rank checkpoint step {SP_HALF} on 2 ranks, sequence_parallel 2 -> 1 (global batch 8 rows, "
            "same order)") in log, log[-2000:]
    _assert_same_steps(run, one_rank_run, range(SP_HALF + 1, SP_STEPS + 1), rel=1e-5)


MIXTURE = "data.mixture={web: {sources: [web.jsonl], weight: 0.7}, code: {sources: [code.jsonl], weight: 0.3}}"
MIX_STEPS = 4


@pytest.mark.slow
def test_mixture_with_sequence_parallel_trains_as_one_rank(tmp_path):
    """A data.mixture run (two groups drawn by weight, validation per group) on 2 ranks of one
    sequence-parallel group: the same rows, losses, per-group tokens and per-group validation losses as
    1 rank; and `train/sequence_parallel` reaches the offline W&B run."""
    from test_train import make_shards, read_wandb_summary, train

    shards = tmp_path / "shard"
    make_shards(shards, train_docs=120, val_docs=20, group="web", partition=0)
    make_shards(shards, train_docs=120, val_docs=20, seed=10, group="code", partition=1)
    mix = [*SP_RUN, MIXTURE, f"train.steps={MIX_STEPS}", f"train.eval_every={MIX_STEPS}"]
    train(tmp_path / "ref", shards, mix, procs=1)
    result = train(tmp_path / "sp2", shards, [*mix, "train.sequence_parallel=2", "wandb.mode=offline"], procs=2)
    assert result["sequence_parallel"] == 2
    _assert_same_steps(tmp_path / "sp2", tmp_path / "ref", range(1, MIX_STEPS + 1), rel=1e-5)
    got, want = _steps(tmp_path / "sp2")[MIX_STEPS], _steps(tmp_path / "ref")[MIX_STEPS]
    for key in ("data/tokens/web", "data/tokens/code"):
        assert got[key] == want[key] > 0, key
    for key in ("val/loss", "val/loss/web", "val/loss/code"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    files = sorted((tmp_path / "sp2" / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    assert read_wandb_summary(files[0])["train/sequence_parallel"] == 2


def test_grid_and_config_errors_name_the_keys():
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.train.dist import grid

    g = grid(5, 8, 2, 64)
    assert (g.dp_rank, g.dp_size, g.sp_rank, g.sp_size) == (2, 4, 1, 2)
    with pytest.raises(ValueError, match=r"train.sequence_parallel=3 does not divide the 4 rank\(s\)"):
        grid(0, 4, 3, 60)
    with pytest.raises(ValueError, match="train.sequence_parallel=2 does not divide data.seq_len=33"):
        grid(0, 2, 2, 33)
    with pytest.raises(Exception, match="train.sequence_parallel"):
        load_config(None, ["train.sequence_parallel=0"])
    # what the sections cannot see alone is refused when the config loads, before any rank starts
    with pytest.raises(Exception, match="model.arch 'llama' is not supported"):
        load_config(None, ["train.sequence_parallel=2", "model.arch=llama"])
    with pytest.raises(Exception, match=r"model.slstm_at=\[1\]"):
        load_config(None, ["train.sequence_parallel=2", "model.arch=xlstm", "model.slstm_at=[1]"])
    with pytest.raises(Exception, match="does not divide data.seq_len=33"):
        load_config(None, ["train.sequence_parallel=2", "model.arch=xlstm_large", "data.seq_len=33"])
    load_config(None, ["train.sequence_parallel=2", "model.arch=xlstm_large", "data.seq_len=64"])
    load_config(None, ["train.sequence_parallel=2", "model.arch=xlstm_large", "data.seq_len=64", "train.compile=true"])
    with pytest.raises(Exception, match="use model.activation_checkpointing=false, or train.compile=false"):
        load_config(None, ["train.sequence_parallel=2", "model.arch=xlstm_large", "data.seq_len=64", "train.compile=true",
                           "model.activation_checkpointing=true"])


def test_sequence_parallel_continues_the_trajectory():
    """Another train.sequence_parallel reruns the train stage (another fingerprint) but continues the
    same trajectory (its checkpoints resume: the global batch and row order do not depend on it)."""
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.core.registry import STAGES
    from xlp.pipeline.core.stage import fingerprint

    stage = {s.name: s for s in STAGES}["train"]
    up = {"tokenizer": "t", "shard": "s"}

    def fp(sp: int, trajectory: bool) -> str:
        cfg = load_config(None, ["model.arch=xlstm_large", "data.seq_len=64", f"train.sequence_parallel={sp}"])
        return fingerprint(stage, cfg, up, trajectory=trajectory)

    assert fp(1, False) != fp(2, False)
    assert fp(1, True) == fp(2, True)
