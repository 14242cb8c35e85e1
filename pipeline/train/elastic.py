"""Resizing a run: a checkpoint written by N ranks continues on M ranks.

What the trajectory keeps is the global batch G (rows per optimizer step): `train.global_batch_size`,
or, when it is null, train.micro_batch_size x train.grad_accum x ranks of the run that started it. With
`train.global_batch_size` set, grad_accum is derived on every launch, G / (micro_batch_size x ranks),
and the run can come back on any number of ranks M for which that divides; the loader's global order
(xlp.pipeline.data.order) gives every step the same rows whatever M is.

DeepSpeed's ZeRO-1/2/3 files hold each rank's partition of the optimizer (and under ZeRO-3 of the
parameters), which DeepSpeed loads only on the same number of ranks (its universal checkpoint needs an
offline conversion step). So a resizable run also writes `elastic.safetensors` into each checkpoint:
every parameter's fp32 master copy and Adam moments, whole (gathered with DeepSpeed's
safe_get_full_* API, collective under ZeRO-3), and the Adam step count. On another world size every
rank reads it and sets its own partitions (safe_set_full_*); DeepSpeed's own files are not read.
Safetensors: nothing is unpickled. Cost: one more copy of the fp32 model and two moments per
checkpoint, gathered on rank 0 (3 x 4 bytes per parameter of CPU memory there while saving).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from xlp.pipeline.core.config import section
from xlp.pipeline.train import checkpoint as ckpt
from xlp.pipeline.train.checkpoint import file_record
from xlp.pipeline.train.dist import grid

ELASTIC_FILE = "elastic.safetensors"


class ResizeError(ValueError):
    """A run that cannot continue on this number of ranks (the message names the numbers)."""


def grad_accum_for(tc: Any, world_size: int) -> int:
    """Micro-steps per optimizer step on `world_size` ranks: train.grad_accum, or derived from
    train.global_batch_size. ResizeError when the global batch does not split over the ranks."""
    if tc.global_batch_size is None:
        return int(tc.grad_accum)
    G, B = int(tc.global_batch_size), int(tc.micro_batch_size)
    if G % (B * world_size):
        fits = [m for m in range(1, G // B + 1) if (G // B) % m == 0]
        if G % world_size == 0:
            per_rank = G // world_size
            sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            other = (f"on {world_size} ranks, a train.micro_batch_size dividing {per_rank} "
                     f"({', '.join(map(str, sizes))}) works")
        else:
            other = f"no micro-batch size splits {G} rows over {world_size} ranks"
        raise ResizeError(
            f"train.global_batch_size={G} rows does not split over {world_size} rank(s) of "
            f"train.micro_batch_size={B}: {G} is not a multiple of {B} x {world_size} = {B * world_size}. "
            f"With micro_batch_size {B} the run continues on {', '.join(map(str, fits))} rank(s); {other}")
    return G // (B * world_size)


def check_resume(meta: dict, tc: Any, world_size: int) -> Optional[str]:
    """What changes when the checkpoint `meta` continues on `world_size` ranks with config `tc`: None
    when nothing does, else a line for the log. ResizeError when it cannot work. The global batch counts
    data-parallel groups (world / train.sequence_parallel); DeepSpeed's files count every rank."""
    sp = int(getattr(tc, "sequence_parallel", 1) or 1)
    old_sp = int(meta.get("sequence_parallel", 1))
    old_world = int(meta.get("world_size", world_size))
    old_ga = int(meta.get("grad_accum", tc.grad_accum))
    old_micro = int(meta.get("micro_batch_size", tc.micro_batch_size))
    old_G = int(meta.get("global_batch_size", old_micro * old_ga * (old_world // old_sp)))
    dp = world_size // sp
    ga = grad_accum_for(tc, dp)
    G = int(tc.micro_batch_size) * ga * dp
    step = meta.get("step")
    groups = (lambda n, s: f"{n} rank(s)" if s == 1 else f"{n // s} group(s) of {s} sequence-parallel ranks")
    if G != old_G:
        fix = (f"set train.global_batch_size={old_G} (grad_accum is then derived for any number of ranks "
               f"dividing it)" if tc.global_batch_size is None else
               f"set train.global_batch_size={old_G}, or start a fresh run.dir")
        raise ResizeError(
            f"the checkpoint of step {step} was trained with a global batch of {old_G} rows ({old_micro} x "
            f"grad_accum {old_ga} x {groups(old_world, old_sp)}); this launch would take {G} "
            f"({tc.micro_batch_size} x {ga} x {groups(world_size, sp)}): {fix}")
    if old_world == world_size and old_ga == ga and old_micro == tc.micro_batch_size and old_sp == sp:
        return None
    if old_world != world_size and not meta.get("elastic"):
        raise ResizeError(
            f"the checkpoint of step {step} was written by {old_world} rank(s) without the resizable state "
            f"(train.global_batch_size was null), so it loads on {old_world} rank(s) only; this launch has "
            f"{world_size}. Resume on {old_world} rank(s), or set train.global_batch_size from the start")
    changes = [f"grad_accum {old_ga} -> {ga}"] if old_ga != ga else []
    if old_micro != tc.micro_batch_size:
        changes.append(f"micro_batch_size {old_micro} -> {tc.micro_batch_size}")
    if old_sp != sp:
        changes.append(f"sequence_parallel {old_sp} -> {sp}")
    return (f"resuming {old_world}-rank checkpoint step {step} on {world_size} rank{'s' if world_size > 1 else ''}"
            + (", " + ", ".join(changes) if changes else "") + f" (global batch {G} rows, same order)")


def refuse_before_launch(cfg: Any, checkpoints: Path, world_size: int) -> Optional[str]:
    """The train stage's check before it starts any rank: the global batch splits over `world_size`
    ranks and matches the newest checkpoint's. Returns the resume line (or None); raises ResizeError."""
    tc = section(cfg, "train")
    split = grid(0, world_size, int(getattr(tc, "sequence_parallel", 1) or 1), int(section(cfg, "data").seq_len))
    grad_accum_for(tc, split.dp_size)
    found = ckpt.complete_checkpoints(checkpoints)
    if tc.resume_from_step is not None:
        found = [(s, p) for s, p in found if s == tc.resume_from_step]
    if not found:
        return None
    try:
        meta = ckpt.read_meta(found[-1][1])
    except (OSError, ValueError):
        return None  # the ranks' verification names it
    return check_resume(meta, tc, world_size)


# ---------------------------------------------------------------------------------------------
# The consolidated, world-size-free optimizer state


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the fp32 (partitioned) parameters and Adam states."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps: ZeRO-3's and ZeRO-1/2's flat fp32 partitions (ZeRO-3 puts
    them into its param groups only while it steps), or the parameters themselves (ZeRO-0)."""
    opt = engine.optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flats = getattr(opt, name, None)
        if flats:
            return list(flats)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def _link_optimizer_fragments(engine) -> None:
    """Point every parameter's ZeRO-1/2 (or bf16) fragment map at the optimizer states as they are now.
    DeepSpeed links them once, right after the first optimizer step of the first parameter group, when
    the other groups' Adam states do not exist yet (so safe_get_full_optimizer_state fails for every
    parameter outside group 0: "exp_avg not found"); linking again once all states exist fixes that.
    (ZeRO-3 reads the states directly.)"""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _adam_step(base: torch.optim.Optimizer) -> int:
    for state in base.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_state(engine, folder: Path, *, rank: int) -> dict[str, dict]:
    """Write `folder/elastic.safetensors` (rank 0; collective under ZeRO-3). Returns rank 0's file
    record {name: {bytes, sha256}} for the checkpoint's meta.json ({} on other ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    base = _base_optimizer(engine)
    _link_optimizer_fragments(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        partitioned = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        full = safe_get_full_fp32_param(p) if partitioned else p.detach().float()
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if partitioned:
                moments[key] = safe_get_full_optimizer_state(p, key)
            else:
                state = base.state.get(p, {})
                moments[key] = state.get(key)
        if rank == 0:
            tensors[f"param/{name}"] = full.detach().to("cpu", torch.float32).contiguous().clone()
            for key, value in moments.items():
                if value is None:
                    value = torch.zeros_like(tensors[f"param/{name}"])
                tensors[f"{key}/{name}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    if rank != 0:
        return {}
    path = Path(folder) / ELASTIC_FILE
    save_file(tensors, str(path), metadata={"adam_step": str(_adam_step(base))})
    return {ELASTIC_FILE: file_record(path)}


def load_state(engine, folder: Path, *, rank: int, step: int, grad_accum: int, global_batch_rows: int) -> None:
    """Set every rank's parameters, fp32 partitions and Adam moments from `folder/elastic.safetensors`
    (collective under ZeRO-3), and the engine's counters as if it had trained `step` steps here."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    path = Path(folder) / ELASTIC_FILE
    with safe_open(str(path), framework="pt") as f:
        adam_step = int((f.metadata() or {}).get("adam_step", 0))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    base = _base_optimizer(engine)
    for p in _optimized_tensors(engine):  # Adam initialises its state lazily, at the first step: do it now
        state = base.state[p]
        state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
        state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(adam_step))
    _link_optimizer_fragments(engine)
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        full = tensors[f"param/{name}"]
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(full.to(p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(full.to(p.dtype))
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, full)
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"], key)
        else:
            state = base.state[p]
            state["exp_avg"].copy_(tensors[f"exp_avg/{name}"])
            state["exp_avg_sq"].copy_(tensors[f"exp_avg_sq/{name}"])
    engine.global_steps = step
    engine.global_samples = step * global_batch_rows
    engine.micro_steps = step * grad_accum
