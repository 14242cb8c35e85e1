"""Training checkpoints: atomic, newest-N kept, resumable on the same number of ranks.

Layout of `RUN_DIR/train/checkpoints/`:
    step_00000030/            a complete checkpoint (it has meta.json)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (module, ZeRO optimizer
                                                       partitions, engine step counters)
        rank_00000.pt ...     ours, one per rank: RNG states, loader state
        meta.json             written last: step, tokens seen, ranks, ZeRO stage, W&B run id
    .tmp.step_00000060/       being written: ignored, removed on the next start

All ranks write into `.tmp.<name>`; after a barrier rank 0 writes meta.json and renames the folder
(one atomic rename on a POSIX file system), so a killed save never looks complete. The learning-rate
schedule is a function of the step, so the step restores it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from pipeline.stage import atomic_write_json

NAME_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp."
META = "meta.json"


def name_of(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = NAME_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> None:
    """Remove folders a killed save or prune left behind (rank 0, before anyone saves)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, *, rank: int, rank_state: dict, meta: dict, keep: int) -> Path:
    """Save a checkpoint of `step` (collective: every rank calls it). Returns its final path."""
    root = Path(root)
    name = name_of(step)
    tmp_name = TMP_PREFIX + name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_name, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_name, client_state={"step": step}, save_latest=False)
    rank_file = root / tmp_name / f"rank_{rank:05d}.pt"
    part = rank_file.with_suffix(".pt.part")
    torch.save(rank_state, part)
    os.replace(part, rank_file)
    _barrier()
    final = root / name
    if rank == 0:
        atomic_write_json(root / tmp_name / META, meta)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            trash = root / (TMP_PREFIX + "old." + name)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(root / tmp_name, final)
        _fsync_dir(root)
        prune(root, keep)
    _barrier()
    return final


def prune(root: Path, keep: int) -> None:
    found = complete_checkpoints(root)
    for _, path in found[:-keep] if keep > 0 else []:
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


def load(engine, path: Path, *, rank: int, world_size: int) -> tuple[dict, dict]:
    """Load model, optimizer and engine state from checkpoint `path`; returns (meta, this rank's state)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world_size") != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {world_size}. "
            "Resume with the same number of ranks (train.cpu_processes or GPUs), or start a fresh run dir."
        )
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    rank_state = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    return meta, rank_state


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
    from xlstm_model import build_model, save_model

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
