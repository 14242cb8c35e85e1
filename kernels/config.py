"""The kernels' settings as config keys (`kernels.*`), with their defaults.

- `kernels.backend`: auto | reference | triton, the backend ops use when called without `backend=`
  ("auto": Triton for CUDA tensors where the op has a kernel, the pure-PyTorch reference otherwise).
- `kernels.mlstm`: changes to the launch table of the chunkwise mLSTM Triton kernels (block caps,
  num_warps, num_stages per kernel; see MLSTM_LAUNCH), e.g. `kernels.mlstm.bc_w=4 kernels.mlstm.bc_s=2`
  on the command line, `kernels: {mlstm: {bc_w: 4, bc_s: 2}}` in YAML; empty: the built-in table.
  `python benchmarks/bench_kernels.py --sweep` prints a tuned table in this form.

Every process that runs a model from a pipeline config (train ranks, eval, `xlp generate`) calls
`KernelsConfig.apply()` first, so the config, not the environment, decides how it computes. Code
that calls the kernel functions directly keeps the process defaults (xlp.kernels.dispatch: the
XLP_KERNEL_BACKEND environment variable, else "auto"; MLSTM_LAUNCH).

Pure Python (no Triton import): the pipeline validates configs on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

BACKENDS = ("auto", "reference", "triton")

# Launch configuration of the four chunkwise mLSTM kernels (kernels/triton/mlstm.py): block caps (the
# largest power of two <= cap dividing the head dim is used), num_warps (w) and num_stages (s).
# fs = _fwd_states_kernel, fo = _fwd_out_kernel, bs = _bwd_states_kernel, bc = _bwd_chunk_kernel;
# chunk = 0 lets pick_chunk_size decide, else it forces L (a power of two >= 16; tuning only).
# Tuned on an H100 80GB HBM3 (torch 2.11, Triton 3.6) by `python benchmarks/bench_kernels.py --sweep` at
# 65,536 tokens, NH=16, DQK=128, DV=256, bf16: fwd+bwd 10.6 -> 9.3 ms against the previous table
# (benchmarks/results/gpu_check_h100_run2.log, ..._run3_tuned.log).
MLSTM_LAUNCH = dict(
    fs_bk=64, fs_bv=64, fs_w=4, fs_s=3,
    fo_bk=64, fo_bv=128, fo_w=4, fo_s=2,
    bs_bk=64, bs_bv=64, bs_w=4, bs_s=3,
    bc_bk=64, bc_bv=128, bc_w=8, bc_s=1,
    chunk=0,
)

# Launch-config variants that `python benchmarks/bench_kernels.py --sweep` times: single-key changes from
# MLSTM_LAUNCH, plus a few combinations; FWD_ for the forward kernels (fs, fo), BWD_ for the backward (bc, bs).
# xlp.kernels.triton.aot_check compiles every one of them for sm_90.
FWD_VARIANTS = [
    {}, {"fs_w": 8}, {"fs_s": 1}, {"fs_s": 3}, {"fs_bv": 128}, {"fs_bv": 32}, {"fs_bk": 128},
    {"fo_bv": 256}, {"fo_bv": 64}, {"fo_w": 4}, {"fo_s": 1}, {"fo_s": 3}, {"fo_bk": 128},
]
BWD_VARIANTS = [
    {}, {"bc_w": 4}, {"bc_s": 2}, {"bc_bv": 128}, {"bc_bk": 128}, {"bc_bv": 32}, {"bc_bv": 128, "bc_w": 4},
    {"bc_bv": 128, "bc_s": 2}, {"bs_w": 8}, {"bs_s": 1}, {"bs_s": 3}, {"bs_bv": 128}, {"bs_bv": 32},
    {"bs_bk": 128},
]

# The table the mLSTM kernels of this process launch with (xlp.kernels.triton.mlstm reads this dict;
# set_mlstm_launch replaces its contents in place).
mlstm_launch: dict[str, int] = dict(MLSTM_LAUNCH)


def check_mlstm_launch(changes: Optional[Mapping[str, int]], where: str = "kernels.mlstm") -> dict[str, int]:
    """`changes` as a plain dict, or ValueError naming `where`, the bad key and the valid ones."""
    out = {}
    for key, value in dict(changes or {}).items():
        if key not in MLSTM_LAUNCH:
            raise ValueError(f"{where}: unknown key {key!r}; valid: {', '.join(MLSTM_LAUNCH)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{key} is {value!r}; expected an integer")
        if key == "chunk":
            if value and (value < 16 or value & (value - 1)):
                raise ValueError(f"{where}.chunk is {value}; expected 0 (automatic) or a power of two >= 16")
        elif key.endswith("_w") and (value < 1 or value & (value - 1)):
            raise ValueError(f"{where}.{key} is {value}; expected a power of two (warps)")
        elif value < 1:
            raise ValueError(f"{where}.{key} is {value}; expected at least 1")
        out[key] = value
    return out


def set_mlstm_launch(changes: Optional[Mapping[str, int]] = None, **kw: int) -> dict[str, int]:
    """Make the process's mLSTM launch table MLSTM_LAUNCH with `changes` applied; returns the previous
    table (a full one, which may be passed back to restore it)."""
    new = dict(MLSTM_LAUNCH)
    new.update(check_mlstm_launch({**dict(changes or {}), **kw}, "mLSTM launch table"))
    previous = dict(mlstm_launch)
    mlstm_launch.clear()
    mlstm_launch.update(new)
    return previous


def format_mlstm_launch(table: Mapping[str, int]) -> str:
    """The entries of `table` that differ from MLSTM_LAUNCH as command-line config overrides, e.g.
    'kernels.mlstm.bc_w=4 kernels.mlstm.bc_s=2' ('kernels.mlstm={}': the built-in table)."""
    changed = " ".join(f"kernels.mlstm.{k}={v}" for k, v in table.items() if MLSTM_LAUNCH.get(k) != v)
    return changed or "kernels.mlstm={}"


# The process's default backend (what ops use when called without `backend=`). Plain Python state, here
# beside the settings that set it, so that applying a config needs no torch.
ENV_VAR = "XLP_KERNEL_BACKEND"
_default_override: Optional[str] = None  # set_default_backend; None: the environment variable, else "auto"


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def set_default_backend(name: Optional[str]) -> None:
    """Set the backend ops use when called without `backend=` (name in BACKENDS), or None to go
    back to the environment variable XLP_KERNEL_BACKEND (else "auto")."""
    global _default_override
    _default_override = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """`set_default_backend(name)` for the duration of a `with` block, then the previous setting."""
    global _default_override
    previous = _default_override
    set_default_backend(name)
    try:
        yield
    finally:
        _default_override = previous


def default_backend() -> str:
    if _default_override is not None:
        return _default_override
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | reference | triton (auto: Triton on CUDA tensors, else reference)
    mlstm: dict[str, int] = field(default_factory=dict)  # changes to MLSTM_LAUNCH (empty: the built-in table)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"config key `kernels.backend` is {self.backend!r}; valid values: {', '.join(BACKENDS)}")
        check_mlstm_launch(self.mlstm)

    def apply(self) -> None:
        """Make these the process's kernel settings: the default backend (always, "auto" included,
        so that XLP_KERNEL_BACKEND in the environment cannot change a pipeline run) and the mLSTM
        launch table."""
        self.validate()
        set_default_backend(self.backend)
        set_mlstm_launch(self.mlstm)
