"""Rank processes for tests/test_sequence_parallel.py: each joins a gloo group, runs its slice of the
sequence through xlp.xlstm_model.sequence_parallel, and saves its outputs and gradients for the test
process to compare with one process on the whole sequence. The inputs come from fixed seeds, so every
process (and the test) builds the same ones."""
from __future__ import annotations

import os
from pathlib import Path

import torch

KERNEL_SHAPE = dict(B=2, NH=2, DQK=16, DV=16, chunk=16)


def kernel_doc_starts(S: int, N: int) -> torch.Tensor:
    """Row 0: a document starts in the first slice and runs across every cut. Row 1: starts in the second
    slice, exactly at a cut, and inside the last slice."""
    part = S // N
    ds = torch.zeros(2, S, dtype=torch.bool)
    ds[0, [0, 5]] = True
    ds[1, [0, part + 7]] = True
    if N > 2:
        ds[1, [2 * part, 2 * part + 5]] = True
    return ds


def kernel_inputs(S: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B, NH, DQK, DV = (KERNEL_SHAPE[k] for k in ("B", "NH", "DQK", "DV"))
    q, k = torch.randn(B, NH, S, DQK, generator=g), torch.randn(B, NH, S, DQK, generator=g)
    v = torch.randn(B, NH, S, DV, generator=g)
    i = torch.randn(B, NH, S, generator=g) * 2.0
    f = torch.randn(B, NH, S, generator=g) + 2.0
    w = torch.randn(B, NH, S, DV, generator=g)  # the loss's weights on h
    return [q, k, v, i, f, w]


def _join(rank: int, size: int, init: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    return dist


def _leave(dist) -> None:
    dist.barrier()  # never end on an all-gather (see Trainer.finish)
    dist.destroy_process_group()


def kernel_rank(rank: int, size: int, init: str, out: str, S: int, backends: list[str]) -> None:
    """This rank's h slice and the gradients of sum(h * w) over its slice, for each backend."""
    torch.set_num_threads(1)
    dist = _join(rank, size, init)
    from xlp.xlstm_model.sequence_parallel import SeqParallel, mlstm_chunkwise

    sp = SeqParallel(None, rank, size)
    ds = sp.take(kernel_doc_starts(S, size), 1)
    for backend in backends:
        *leaves, w = kernel_inputs(S)
        leaves = [t.requires_grad_() for t in leaves]
        q, k, v, i, f = (sp.take(t, 2) for t in leaves)
        h = mlstm_chunkwise(q, k, v, i, f, sp=sp, chunk_size=KERNEL_SHAPE["chunk"], doc_starts=ds, backend=backend)
        (h * sp.take(w, 2)).sum().backward()
        torch.save({"h": h.detach(), "grads": [t.grad for t in leaves]}, Path(out) / f"{backend}-{rank}.pt")
    _leave(dist)


def model_config(arch: str) -> dict:
    """A tiny model of `arch`; "xlstm/full" and "xlstm_large/selective": that arch with activation
    checkpointing (the recomputed forward all-gathers again in the backward, on every rank alike)."""
    arch, _, policy = arch.partition("/")
    cfg = dict(arch=arch, vocab_size=64, d_model=32, num_blocks=2, num_heads=2, mlstm_chunk_size=16)
    if policy:
        cfg.update(activation_checkpointing=True, checkpoint_policy=policy)
    if arch == "xlstm":
        cfg.update(conv_kernel=4, qkv_blocksize=4)
    return cfg


def model_batch(S: int) -> dict:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (2, S + 1), generator=g)
    ds = kernel_doc_starts(S, 2)
    ds[0, S // 2 - 2] = True  # starts inside the conv's reach before the cut: the halo is cut there
    ds[1, S // 2 + 1] = True  # starts one token after the cut
    targets = ids[:, 1:].clone()
    targets[0, 3] = -100  # ignored targets count in no slice's mean
    return {"input_ids": ids[:, :-1], "targets": targets, "doc_starts": ds}


def model_rank(rank: int, size: int, init: str, out: str, S: int, archs: list[str]) -> None:
    """This rank's loss (its slice's token loss sum / the row's target count x N) and its parameter
    gradients, for each architecture: DeepSpeed's average of these over the ranks is the full mean."""
    torch.set_num_threads(1)
    dist = _join(rank, size, init)
    from xlp.xlstm_model import build_model
    from xlp.xlstm_model.sequence_parallel import SeqParallel

    sp = SeqParallel(None, rank, size)
    batch = model_batch(S)
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(model_config(arch))
        model.set_sequence_parallel(sp)
        local = {k: sp.take(t, 1) for k, t in batch.items()}
        count = int((local["targets"] != -100).sum())
        total = int((batch["targets"] != -100).sum())
        loss = model(local["input_ids"], doc_starts=local["doc_starts"], targets=local["targets"]) * count / total * size
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"{arch.replace('/', '-')}-{rank}.pt")
    _leave(dist)


def spawn(fn, size: int, tmp: Path, *args) -> None:
    """Run fn(rank, size, init_file, out_dir, *args) in `size` fresh processes (gloo over a file)."""
    import torch.multiprocessing as mp

    init = tmp / "init"
    if init.exists():
        os.unlink(init)
    mp.start_processes(fn, args=(size, str(init), str(tmp)) + args, nprocs=size, join=True, start_method="spawn")
