"""Fused one-token decode kernels (no autograd): `decode_linear` and `mlstm_decode_mix`, same
arguments and results as kernels/reference/decode.py.

At batch 1 a step is bound by reading the weights once and by how many kernels it takes, not by
arithmetic. `decode_linear` is a matrix-vector product in which every program streams BN whole rows
of the weight (full K, fp32 accumulation) and does the rest itself: the RMSNorm of its input (its
1/rms is a scalar, so it factors out of the dot product: one pass over x), bias, SwiGLU (a program
owns gate row j and up row j + N/2), soft cap and residual. `mlstm_decode_mix` is one program per
(row, head): the two gate dot products from the normed input, the stabilised state update in place
(C in BK-row tiles), the read-out, the per-head norm and the output gate.

Latency, not arithmetic, decides the speed of such small kernels, so both keep loads in flight:
the next weight (or state) tile is requested before the current one is reduced, and the first
tile, which does not depend on the previous kernel, is requested before anything that does. Tile
sizes and warps are timed on the first call per shape (Triton's autotuner for `decode_linear`; for
`mlstm_decode_mix`, which updates the state in place, a few configs timed on a copy of it). With
programmatic dependent launch (pdl=True, Hopper and later; the decode.pdl config key) a kernel is launched
while its predecessor still runs; it streams its first weight tile, then waits (gdc_wait) for the
predecessor's results before it reads its input.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from xlp.kernels.triton._common import check_device, interpreting

try:  # grid dependency control (Triton >= 3.3); PDL is off where it is missing
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_wait = gdc_launch_dependents = None

# (BN rows per program, BK columns per load, warps): picked per (N, K) by triton.autotune on first use
# (before any CUDA-graph capture). Small BN with whole-K tiles gives many programs per SM, each with
# a large load in flight; large BN fewer, longer programs.
_LINEAR_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w)
    for bn, bk, w in ((1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4),
                      (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8))
]
_INTERPRETER_CONFIG = 5  # (8, 256, 4): the interpreter times nothing, one config there
# mlstm_decode_mix: (C elements (fp32) per state tile, warps), one program per head (each has an SM to
# itself). A head's whole C in one tile is requested at once, before the kernel waits for its inputs;
# smaller tiles keep two in flight. Which is faster is measured on the first call per head shape (on a
# copy of the state: the kernel updates it in place, so triton.autotune's repeated runs cannot be used
# on the real one). The interpreter, and a first call inside a graph capture, take the default;
# mix=(TILE, WARPS) (the decode.mix config key, e.g. 32768x8) fixes the choice (the timing sees the kernel
# alone, with a cold cache and no predecessor to overlap: `bench_decode --variant` compares choices within
# whole decode steps).
_MIX_CONFIGS = ((32768, 8), (32768, 16), (16384, 16), (16384, 8), (8192, 8), (4096, 4))
_MIX_DEFAULT = (16384, 16)
MIX_WARPS = (1, 2, 4, 8, 16, 32)
_mix_choice: dict[tuple, tuple[int, int]] = {}


def pdl_wanted(device: torch.device, requested: bool) -> bool:
    """Whether a kernel asked for programmatic dependent launch gets it: on a Hopper-or-later GPU with
    a Triton that has grid dependency control (never under the interpreter)."""
    if not requested or interpreting() or device.type != "cuda":
        return False
    return gdc_wait is not None and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _soft_cap(y, cap):
    return cap * (2.0 / (1.0 + tl.exp(-2.0 * y / cap)) - 1.0)  # cap * tanh(y / cap)


# cache_results (Triton >= 3.2): the choice is kept on disk beside the compiled kernels, so only a
# machine's first decoder pays for the tuning
_AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(configs=[_LINEAR_CONFIGS[_INTERPRETER_CONFIG]] if interpreting() else _LINEAR_CONFIGS,
                 key=["N_OUT", "K", "GLU", "NORM", "PDL"], **_AUTOTUNE_CACHE)
@triton.jit
def _linear_kernel(
    X, W, G, BIAS, R, Y, N_OUT, K, eps, cap,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, CAP: tl.constexpr, RES: tl.constexpr,
    PDL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    X += row * K
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N_OUT
    cols = tl.arange(0, BK)
    w_ptrs = W + rows[:, None] * K + cols[None, :]
    wmask = rmask[:, None] & (cols < K)[None, :]
    # the weights are not the previous kernel's output: start streaming them before waiting for it
    w = tl.load(w_ptrs, mask=wmask, other=0.0)
    wu = w
    if GLU:  # the up row that pairs with gate row `rows` sits N_OUT rows further down
        wu = tl.load(w_ptrs + N_OUT * K, mask=wmask, other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros([BN], dtype=tl.float32)
    acc_up = tl.zeros([BN], dtype=tl.float32)
    sum_sq = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        c = k0 + cols
        cmask = c < K
        x = tl.load(X + c, mask=cmask, other=0.0).to(tl.float32)
        # the next tile is in flight while this one is reduced (fully masked past K: no traffic)
        nmask = rmask[:, None] & (c + BK < K)[None, :]
        w_next = tl.load(w_ptrs + k0 + BK, mask=nmask, other=0.0)
        wu_next = w_next
        if GLU:
            wu_next = tl.load(w_ptrs + N_OUT * K + k0 + BK, mask=nmask, other=0.0)
        if NORM:  # RMSNorm(x) . w = (1/rms) * ((g * x) . w): the statistic is applied after the loop
            sum_sq += x * x
            x = x * tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if GLU:
            acc_up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        w = w_next
        wu = wu_next
    if NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)
        acc = acc * inv_rms
        acc_up = acc_up * inv_rms
    if HAS_BIAS:
        acc += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
        if GLU:
            acc_up += tl.load(BIAS + N_OUT + rows, mask=rmask, other=0.0).to(tl.float32)
    y = acc
    if GLU:
        y = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up
    if CAP:
        y = _soft_cap(y, cap)
    if RES:
        y += tl.load(R + row * N_OUT + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + row * N_OUT + rows, y.to(Y.dtype.element_ty), mask=rmask)


def decode_linear(
    x: Tensor,
    weight: Tensor,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-6,
    bias: Optional[Tensor] = None,
    glu: bool = False,
    soft_cap: float = 0.0,
    residual: Optional[Tensor] = None,
    pdl: bool = False,
) -> Tensor:
    """Fused matrix-vector product; see xlp.kernels.reference.decode.decode_linear. pdl: launched with
    programmatic dependent launch where the GPU has it."""
    check_device(x, weight)
    B, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"decode_linear: x has {K} features but weight is {tuple(weight.shape)}")
    if glu and N % 2:
        raise ValueError(f"decode_linear: glu needs an even number of weight rows, got {N}")
    n_out = N // 2 if glu else N
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(B, n_out, dtype=x.dtype, device=x.device)
    res = residual.contiguous() if residual is not None else y
    if residual is not None and tuple(res.shape) != (B, n_out):
        raise ValueError(f"decode_linear: residual {tuple(res.shape)} does not match the output {(B, n_out)}")
    def grid(meta):
        return (triton.cdiv(n_out, meta["BN"]), B)

    _linear_kernel[grid](
        x, weight, norm_weight if norm_weight is not None else x, bias if bias is not None else x, res, y,
        n_out, K, float(norm_eps), float(soft_cap or 1.0),
        NORM=norm_weight is not None, HAS_BIAS=bias is not None, GLU=bool(glu), CAP=bool(soft_cap),
        RES=residual is not None, **_pdl_args(x.device, pdl),
    )
    return y


def _pdl_args(device: torch.device, requested: bool) -> dict:
    pdl = pdl_wanted(device, requested)
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def _mix_kernel(
    X, QKVO, GW, GB, NW, HW, C, N_, M, OUT,
    D, norm_eps, head_eps, cap, qk_scale,
    NH: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
    BD: tl.constexpr, BK: tl.constexpr, CAP: tl.constexpr, LN: tl.constexpr, PDL: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)  # = row * NH + head
    row = pid // NH
    head = pid % NH
    X += row * D
    C += pid * DQK * DV
    N_ += pid * DQK
    offs_v = tl.arange(0, DV_P)
    vmask = offs_v < DV
    offs_t = tl.arange(0, BK)
    c_ptrs = C + offs_t[:, None] * DV + offs_v[None, :]
    # The state was last written by this block's previous step and the weights never change: request
    # them (the first C tile, the largest load) before waiting for this step's inputs. (Under
    # PDL only the kernel just before this one can still be running, and it does not write C, n or m:
    # nothing but this kernel may write them inside a decode step.)
    kmask = offs_t < DQK  # the first tile's rows of C (and of n, q, k)
    c = tl.load(c_ptrs, mask=kmask[:, None] & vmask[None, :], other=0.0)
    n_prev = tl.load(N_ + offs_t, mask=kmask, other=0.0)
    m_prev = tl.load(M + pid)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    g_norm = tl.load(NW + offs_d, mask=dmask, other=0.0)
    g_i = tl.load(GW + head * D + offs_d, mask=dmask, other=0.0)
    g_f = tl.load(GW + (NH + head) * D + offs_d, mask=dmask, other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    # this step's q, k (first tile), v and o are requested now, so that their latency overlaps the
    # gate dot products' instead of following it
    base = QKVO + row * (2 * NH * DQK + 2 * NH * DV)
    q = tl.load(base + head * DQK + offs_t, mask=kmask, other=0.0)
    k = tl.load(base + NH * DQK + head * DQK + offs_t, mask=kmask, other=0.0)
    v = tl.load(base + 2 * NH * DQK + head * DV + offs_v, mask=vmask, other=0.0).to(tl.float32)
    o = tl.load(base + 2 * NH * DQK + NH * DV + head * DV + offs_v, mask=vmask, other=0.0).to(tl.float32)
    # gates: [i~ | f~] = soft_cap(RMSNorm(x) . w + b) for this head; 1/rms applied after the sums
    acc_i = tl.zeros([BD], dtype=tl.float32)
    acc_f = tl.zeros([BD], dtype=tl.float32)
    sum_sq = tl.zeros([BD], dtype=tl.float32)
    for k0 in range(0, D, BD):
        cols = k0 + offs_d
        x = tl.load(X + cols, mask=cols < D, other=0.0).to(tl.float32)
        nmask = cols + BD < D  # the next chunk of the weights in flight (none past D)
        g_norm_next = tl.load(NW + BD + cols, mask=nmask, other=0.0)
        g_i_next = tl.load(GW + head * D + BD + cols, mask=nmask, other=0.0)
        g_f_next = tl.load(GW + (NH + head) * D + BD + cols, mask=nmask, other=0.0)
        sum_sq += x * x
        xg = x * g_norm.to(tl.float32)
        acc_i += xg * g_i.to(tl.float32)
        acc_f += xg * g_f.to(tl.float32)
        g_norm = g_norm_next
        g_i = g_i_next
        g_f = g_f_next
    inv_rms = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / D + norm_eps)
    i = tl.sum(acc_i, axis=0) * inv_rms + tl.load(GB + head).to(tl.float32)
    f = tl.sum(acc_f, axis=0) * inv_rms + tl.load(GB + NH + head).to(tl.float32)
    if CAP:
        i = _soft_cap(i, cap)
        f = _soft_cap(f, cap)
    # stabilised gates, xLSTM eqs. (15)-(17); logsigmoid(f) = min(f, 0) - log(1 + exp(-|f|))
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))
    m_new = tl.maximum(log_f + m_prev, i)
    f_s = tl.exp(log_f + m_prev - m_new)
    i_s = tl.exp(i - m_new)
    num = tl.zeros([DV_P], dtype=tl.float32)
    den = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DQK_P, BK):
        offs_k = k0 + offs_t
        kmask = offs_k < DQK
        cmask = kmask[:, None] & vmask[None, :]
        # the next state tile, q and k in flight while this one is updated (fully masked past DQK: no traffic)
        nkmask = (offs_k + BK) < DQK
        if ONE_TILE:  # no next tile (and no registers held for one)
            c_next = c
        else:
            c_next = tl.load(c_ptrs + (k0 + BK) * DV, mask=nkmask[:, None] & vmask[None, :], other=0.0)
        q_next = tl.load(base + head * DQK + BK + offs_k, mask=nkmask, other=0.0)
        k_next = tl.load(base + NH * DQK + head * DQK + BK + offs_k, mask=nkmask, other=0.0)
        n_next = tl.load(N_ + BK + offs_k, mask=nkmask, other=0.0)
        q = q.to(tl.float32)
        k = k.to(tl.float32) * qk_scale
        c = f_s * c + i_s * (k[:, None] * v[None, :])  # eq. (19)
        tl.store(c_ptrs + k0 * DV, c, mask=cmask)
        nn = f_s * n_prev + i_s * k  # eq. (20)
        # n's tile is a short vector that every warp holds a copy of, and one warp stores it: without
        # a barrier a lagging warp could still be reading the old n (this tile's, loaded one iteration
        # or more ago) when the new one lands
        tl.debug_barrier()
        tl.store(N_ + offs_k, nn, mask=kmask)
        num += tl.sum(q[:, None] * c, axis=0)
        den += q * nn
        c = c_next
        q = q_next
        k = k_next
        n_prev = n_next
    d = tl.sum(den, axis=0)
    h = num / tl.maximum(tl.abs(d), tl.exp(-m_new))  # eq. (21)
    if LN:
        mu = tl.sum(tl.where(vmask, h, 0.0), axis=0) / DV
        h = tl.where(vmask, h - mu, 0.0)
    h = h / tl.sqrt(tl.sum(h * h, axis=0) / DV + head_eps)
    w = tl.load(HW + head * DV + offs_v, mask=vmask, other=0.0).to(tl.float32)
    out = h * w / (1.0 + tl.exp(-o))  # sigmoid output gate
    tl.store(OUT + row * NH * DV + head * DV + offs_v, out.to(OUT.dtype.element_ty), mask=vmask)
    tl.store(M + pid, m_new)


def mix_tile_rows(dqk: int, dv: int, tile: int = _MIX_DEFAULT[0]) -> int:
    """Rows of C per state tile of `tile` elements (a head's whole C when it fits)."""
    dqk_p, dv_p = triton.next_power_of_2(dqk), triton.next_power_of_2(dv)
    return max(1, min(dqk_p, tile // dv_p))


def mlstm_decode_mix(
    x: Tensor,
    qkvo: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    state,
    *,
    num_heads: int,
    norm_weight: Tensor,
    norm_eps: float,
    gate_soft_cap: float,
    head_norm_weight: Tensor,
    head_norm_eps: float,
    head_norm: str = "layer",
    pdl: bool = False,
    mix: Optional[tuple[int, int]] = None,
) -> Tensor:
    """One-token mLSTM cell of an xLSTM-large block; see xlp.kernels.reference.decode.mlstm_decode_mix.
    pdl: programmatic dependent launch where the GPU has it; mix: (C elements per state tile, warps),
    None: the fastest of _MIX_CONFIGS, timed on the first GPU call per shape."""
    C, n, m = state
    check_device(x, qkvo, C)
    B, D = x.shape
    NH = num_heads
    dqk, dv = C.shape[-2], C.shape[-1]
    if C.dtype != torch.float32 or not (C.is_contiguous() and n.is_contiguous() and m.is_contiguous()):
        raise ValueError("mlstm_decode_mix: the state (C, n, m) must be contiguous float32 (it is updated in place)")
    if tuple(qkvo.shape) != (B, 2 * NH * (dqk + dv)):
        raise ValueError(f"mlstm_decode_mix: qkvo {tuple(qkvo.shape)} does not match {NH} heads of "
                         f"dqk={dqk}, dv={dv} (expected {(B, 2 * NH * (dqk + dv))})")
    args = (x.contiguous(), qkvo.contiguous(), gate_weight.contiguous(), gate_bias.contiguous(), norm_weight,
            head_norm_weight)
    consts = dict(norm_eps=norm_eps, head_eps=head_norm_eps, cap=gate_soft_cap, num_heads=NH, ln=head_norm != "rms")
    pdl = pdl_wanted(x.device, pdl)
    if mix is None:
        key = (B, NH, D, dqk, dv, x.dtype, consts["ln"], bool(gate_soft_cap), x.device, pdl)
        mix = _mix_choice.get(key) or _tune_mix(args, state, consts, key)
    else:
        check_mix(mix)
    return _mix(*args, state, **consts, tile=mix[0], warps=mix[1], pdl=pdl)


def check_mix(mix) -> None:
    """ValueError unless `mix` is (TILE, WARPS) with TILE a power of two and WARPS in MIX_WARPS."""
    try:
        tile, warps = (int(v) for v in mix)
    except (TypeError, ValueError):
        tile = warps = 0
    if tile < 1 or tile & (tile - 1) or warps not in MIX_WARPS:
        raise ValueError(f"mlstm_decode_mix: mix={mix!r}: expected (TILE, WARPS) with TILE a power of two "
                         f"(C elements per state tile) and WARPS one of {', '.join(map(str, MIX_WARPS))}")


def _mix(x, qkvo, gate_weight, gate_bias, norm_weight, head_norm_weight, state, *, norm_eps, head_eps, cap,
         num_heads, ln, tile, warps, pdl=False) -> Tensor:
    """One launch of _mix_kernel with `tile` C elements per state tile and `warps` warps."""
    C, n, m = state
    B, D = x.shape
    dqk, dv = C.shape[-2], C.shape[-1]
    dqk_p, dv_p = triton.next_power_of_2(dqk), triton.next_power_of_2(dv)
    bk = mix_tile_rows(dqk, dv, tile)
    out = torch.empty(B, num_heads * dv, dtype=x.dtype, device=x.device)
    _mix_kernel[(B * num_heads,)](
        x, qkvo, gate_weight, gate_bias, norm_weight, head_norm_weight, C, n, m, out, D, float(norm_eps),
        float(head_eps), float(cap or 1.0), dqk**-0.5,
        NH=num_heads, DQK=dqk, DV=dv, DQK_P=dqk_p, DV_P=dv_p, BD=min(triton.next_power_of_2(D), 1024), BK=bk,
        CAP=bool(cap), LN=ln, ONE_TILE=bk >= dqk_p, num_warps=warps, **_pdl_args(x.device, pdl),
    )
    return out


def mix_candidates(dqk: int, dv: int) -> list[tuple[int, int]]:
    """_MIX_CONFIGS less those that launch the same kernel as an earlier one for these head sizes
    (the same tile rows and warps)."""
    seen = {}
    for tile, warps in _MIX_CONFIGS:
        seen.setdefault((mix_tile_rows(dqk, dv, tile), warps), (tile, warps))
    return list(seen.values())


def _tune_mix(args, state, consts, key) -> tuple[int, int]:
    """The fastest of _MIX_CONFIGS for this shape, timed on a copy of the state (the default where
    nothing can be timed: under the interpreter, off CUDA, or while a CUDA graph is being captured)."""
    x = args[0]
    dqk, dv = state[0].shape[-2], state[0].shape[-1]
    say = os.environ.get("TRITON_PRINT_AUTOTUNING") == "1"
    if interpreting() or x.device.type != "cuda":
        return _MIX_DEFAULT
    if torch.cuda.is_current_stream_capturing():  # nothing can run now: the default, not remembered
        if say:
            print(f"mlstm_decode_mix: dqk={dqk} dv={dv}: first call inside a CUDA graph capture, default "
                  f"(tile, warps) {_MIX_DEFAULT}", flush=True)
        return _MIX_DEFAULT
    import triton.testing

    scratch = tuple(t.clone() for t in state)
    times, failed = {}, {}
    for tile, warps in mix_candidates(dqk, dv):
        try:
            times[tile, warps] = triton.testing.do_bench(
                lambda: _mix(*args, scratch, **consts, tile=tile, warps=warps, pdl=key[-1]), return_mode="median")
        except OutOfResources as e:  # too many registers or too much shared memory
            failed[tile, warps] = e
    if not times:
        raise RuntimeError(f"mlstm_decode_mix: no launch configuration fits dqk={dqk} dv={dv}: {failed}")
    best = min(times, key=times.get)
    _mix_choice[key] = best
    if say:
        print(f"mlstm_decode_mix: dqk={dqk} dv={dv} heads={consts['num_heads']}: (tile, warps) {best}; timed "
              + ", ".join(f"{c}: {t * 1e3:.2f} us" for c, t in times.items())
              + "".join(f"; {c} does not fit ({e})" for c, e in failed.items()), flush=True)
    return best
