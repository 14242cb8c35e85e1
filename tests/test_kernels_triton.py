"""Triton backend vs the pure-PyTorch reference: outputs and gradients, small shapes, fp32.

Without a GPU the kernels run in Triton's CPU interpreter. Triton decides interpreter-or-compiler
when a kernel is *decorated* (@triton.jit reads TRITON_INTERPRET then), i.e. when xlp.kernels.triton.*
is first imported, so the variable must be set before that import -- hence the setdefault below,
before any kernels import. If another test module already imported xlp.kernels.triton without it (on a
machine with no GPU), the kernels in this process cannot run; then every test here is skipped and
`test_rerun_in_subprocess` runs this file again in a fresh interpreter with the variable set.
On a CUDA machine nothing is forced and the same tests run on the GPU.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first xlp.kernels.triton import

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from xlp.kernels import dispatch  # noqa: E402
from xlp.kernels.reference import cross_entropy as ref_ce  # noqa: E402
from xlp.kernels.reference import mlstm as ref_mlstm  # noqa: E402
from xlp.kernels.reference import norms as ref_norms  # noqa: E402
from xlp.kernels.reference import slstm as ref_slstm  # noqa: E402
from xlp.kernels.triton import cross_entropy as tri_ce  # noqa: E402
from xlp.kernels.triton import mlstm as tri_mlstm  # noqa: E402
from xlp.kernels.triton import norms as tri_norms  # noqa: E402
from xlp.kernels.triton import slstm as tri_slstm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_runnable() -> bool:
    if DEVICE == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tri_mlstm._fwd_states_kernel, InterpretedFunction)


RUNNABLE = _kernels_runnable()
needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="xlp.kernels.triton was imported before TRITON_INTERPRET=1; see test_rerun_in_subprocess"
)


@pytest.mark.skipif(RUNNABLE, reason="kernels run in this process")
def test_rerun_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_every_kernel_compiles_for_h100():
    """The interpreter runs no compiler: compiling each kernel (every launch configuration it may
    use) for sm_90 catches what only the compiler rejects. Needs no GPU (ptxas ships with Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "xlp.kernels.triton.aot_check"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "decode_linear" in proc.stdout and "mlstm_decode_mix" in proc.stdout


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max() / (b.detach().float().abs().max() + 1e-12))


def _assert_close(got, want, name, tol=2e-5):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = _rel(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def _leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).requires_grad_()


# ------------------------------------------------------------------------------------ mLSTM
MLSTM_CASES = {
    # name: (B, NH, S, DQK, DV, chunk, init_state, doc_mode)
    "plain": (1, 2, 40, 16, 32, 16, False, None),
    "states_in_out": (2, 1, 37, 16, 16, 16, True, None),
    "docs_and_state": (2, 1, 37, 16, 16, 16, True, "mask"),
    "docs_reset_at_0": (1, 2, 33, 16, 16, 16, True, "mask0"),
    "cu_seqlens": (1, 1, 29, 16, 16, 16, False, "cu"),
    "odd_dims_short": (1, 1, 5, 12, 20, 16, True, None),
    "chunk_32": (1, 1, 45, 32, 16, 32, False, "mask"),
}


def _doc_starts(mode, B, S):
    if mode is None:
        return None
    if mode == "cu":
        return torch.tensor([0, 7, 8, 20, S], device=DEVICE)
    ds = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    ds[0, 5] = True
    ds[0, S // 2] = True
    ds[-1, S - 3] = True
    if mode == "mask0":
        ds[:, 0] = True
    return ds


@needs_kernels
@pytest.mark.parametrize("case", list(MLSTM_CASES))
def test_mlstm_chunkwise_matches_reference(case):
    torch.manual_seed(0)
    B, NH, S, DQK, DV, L, init, doc = MLSTM_CASES[case]
    q, k = _leaf(B, NH, S, DQK), _leaf(B, NH, S, DQK)
    v = _leaf(B, NH, S, DV)
    i = _leaf(B, NH, S, scale=2.0)
    f = _leaf(B, NH, S, shift=2.0)
    state = (_leaf(B, NH, DQK, DV), _leaf(B, NH, DQK), _leaf(B, NH)) if init else None
    ds = _doc_starts(doc, B, S)
    inputs = [q, k, v, i, f] + (list(state) if state else [])
    wh = torch.randn(B, NH, S, DV, device=DEVICE)
    results = []
    for mod in (ref_mlstm, tri_mlstm):
        h, (C, n, m) = mod.mlstm_chunkwise(
            q, k, v, i, f, chunk_size=L, initial_state=state, return_final_state=True, doc_starts=ds
        )
        # a loss that touches every output, the final state (m included) too
        loss = (h * wh).sum() + 0.3 * C.sum() + 0.2 * n.sum() + 0.7 * m.sum()
        results.append([h, C, n, m] + list(torch.autograd.grad(loss, inputs)))
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]
    for name, got, want in zip(names, results[1], results[0]):
        _assert_close(got, want, f"{case}/{name}")


@needs_kernels
def test_mlstm_chunkwise_h_only_and_parallel_alias():
    torch.manual_seed(1)
    B, NH, S, D = 1, 1, 20, 16
    q, k, v = _leaf(B, NH, S, D), _leaf(B, NH, S, D), _leaf(B, NH, S, D)
    i, f = _leaf(B, NH, S), _leaf(B, NH, S, shift=1.0)
    want = ref_mlstm.mlstm_parallel(q, k, v, i, f)
    got = tri_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    _assert_close(got, want, "h")
    _assert_close(tri_mlstm.mlstm_parallel(q, k, v, i, f), want, "parallel alias")
    gw = torch.autograd.grad(want.square().sum(), [q, k, v, i, f])
    gg = torch.autograd.grad(got.square().sum(), [q, k, v, i, f])
    for name, a, b in zip("qkvif", gg, gw):
        _assert_close(a, b, "d" + name)


@needs_kernels
@pytest.mark.parametrize("with_state", [False, True])
def test_mlstm_step_matches_reference(with_state):
    torch.manual_seed(2)
    B, NH, DQK, DV = 2, 2, 16, 32
    args = [torch.randn(B, NH, DQK, device=DEVICE), torch.randn(B, NH, DQK, device=DEVICE),
            torch.randn(B, NH, DV, device=DEVICE), torch.randn(B, NH, device=DEVICE), torch.randn(B, NH, device=DEVICE)]
    state = None
    if with_state:
        state = (torch.randn(B, NH, DQK, DV, device=DEVICE), torch.randn(B, NH, DQK, device=DEVICE),
                 torch.randn(B, NH, device=DEVICE))
    h_r, st_r = ref_mlstm.mlstm_step(*args, state)
    h_t, st_t = tri_mlstm.mlstm_step(*args, state)
    _assert_close(h_t, h_r, "h")
    for name, a, b in zip("Cnm", st_t, st_r):
        _assert_close(a, b, name)


@needs_kernels
def test_mlstm_step_continues_chunkwise():
    """Prefill with the chunkwise kernel, then step: the same as running the reference on it all."""
    torch.manual_seed(3)
    B, NH, S, D = 1, 2, 18, 16
    q, k, v = (torch.randn(B, NH, S + 1, D, device=DEVICE) for _ in range(3))
    i, f = torch.randn(B, NH, S + 1, device=DEVICE), torch.randn(B, NH, S + 1, device=DEVICE) + 1
    _, st = tri_mlstm.mlstm_chunkwise(q[:, :, :S], k[:, :, :S], v[:, :, :S], i[..., :S], f[..., :S],
                                      chunk_size=16, return_final_state=True)
    h_step, _ = tri_mlstm.mlstm_step(q[:, :, S], k[:, :, S], v[:, :, S], i[..., S], f[..., S], st)
    h_ref = ref_mlstm.mlstm_parallel(q, k, v, i, f)[:, :, S]
    _assert_close(h_step, h_ref, "h")


# ------------------------------------------------------------------------------------ sLSTM
@needs_kernels
@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("init_and_docs", [False, True])
def test_slstm_sequence_matches_reference(forget_gate, init_and_docs):
    torch.manual_seed(4)
    B, S, NH, DH = 2, 9, 2, 8
    gates = _leaf(B, S, 4, NH, DH)
    R = (torch.randn(4, NH, DH, DH, device=DEVICE) * 0.3).requires_grad_()
    state, ds = None, None
    if init_and_docs:
        state = tuple(_leaf(B, NH, DH) for _ in range(4))
        ds = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        ds[0, 3] = True
        ds[1, 0] = True
    inputs = [gates, R] + (list(state) if state else [])
    wh = torch.randn(B, S, NH, DH, device=DEVICE)
    results = []
    for mod in (ref_slstm, tri_slstm):
        h, (hf, cf, nf, mf) = mod.slstm_sequence(
            gates, R, forget_gate=forget_gate, initial_state=state, return_final_state=True, doc_starts=ds
        )
        loss = (h * wh).sum() + 0.5 * hf.sum() + 0.3 * cf.sum() + 0.2 * nf.sum() + 0.1 * mf.sum()
        results.append([h, hf, cf, nf, mf] + list(torch.autograd.grad(loss, inputs)))
    names = ["h", "hf", "cf", "nf", "mf", "dgates", "dR", "dh0", "dc0", "dn0", "dm0"]
    for name, got, want in zip(names, results[1], results[0]):
        _assert_close(got, want, f"{forget_gate}/{name}")


@needs_kernels
def test_slstm_step_matches_reference():
    torch.manual_seed(5)
    B, NH, DH = 2, 2, 8
    gates = torch.randn(B, 4, NH, DH, device=DEVICE)
    R = torch.randn(4, NH, DH, DH, device=DEVICE) * 0.3
    h_r, st_r = ref_slstm.slstm_step(gates, R)
    h_t, st_t = tri_slstm.slstm_step(gates, R)
    _assert_close(h_t, h_r, "h")
    h_r, _ = ref_slstm.slstm_step(gates, R, st_r)
    h_t, _ = tri_slstm.slstm_step(gates, R, st_t)
    _assert_close(h_t, h_r, "h2")


# ------------------------------------------------------------------------------------ norms, loss
@needs_kernels
@pytest.mark.parametrize("kind", ["rms", "rms_noweight", "ln", "ln_noaffine"])
def test_norms_match_reference(kind):
    torch.manual_seed(6)
    x = _leaf(3, 5, 40)
    w, b = _leaf(40), _leaf(40)
    if kind == "rms":
        fr, ft, args = ref_norms.rms_norm, tri_norms.rms_norm, (w,)
    elif kind == "rms_noweight":
        fr, ft, args = ref_norms.rms_norm, tri_norms.rms_norm, (None,)
    elif kind == "ln":
        fr, ft, args = ref_norms.layer_norm, tri_norms.layer_norm, (w, b)
    else:
        fr, ft, args = ref_norms.layer_norm, tri_norms.layer_norm, (None, None)
    inputs = [x] + [a for a in args if a is not None]
    gy = torch.randn(3, 5, 40, device=DEVICE)
    res = []
    for fn in (fr, ft):
        y = fn(x, *args)
        res.append([y] + list(torch.autograd.grad((y * gy).sum(), inputs)))
    for name, got, want in zip(["y", "dx", "dw", "db"], res[1], res[0]):
        _assert_close(got, want, f"{kind}/{name}")


@needs_kernels
@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_linear_cross_entropy_matches_reference(soft_cap):
    torch.manual_seed(7)
    h = _leaf(2, 7, 24)
    W = _leaf(50, 24)
    t = torch.randint(0, 50, (2, 7), device=DEVICE)
    t[0, 2] = -100
    res = []
    for fn in (ref_ce.linear_cross_entropy, tri_ce.linear_cross_entropy):
        loss = fn(h, W, t, soft_cap=soft_cap)
        res.append([loss] + list(torch.autograd.grad(1.7 * loss, [h, W])))
    for name, got, want in zip(["loss", "dh", "dW"], res[1], res[0]):
        _assert_close(got, want, name)


@needs_kernels
def test_linear_cross_entropy_chunks_rows_and_all_ignored(monkeypatch):
    torch.manual_seed(8)
    monkeypatch.setattr(tri_ce, "_rows_per_chunk", lambda N, V, D: 3)  # several row chunks
    h, W = _leaf(10, 16), _leaf(33, 16)
    t = torch.randint(0, 33, (10,), device=DEVICE)
    want = ref_ce.linear_cross_entropy(h, W, t)
    got = tri_ce.linear_cross_entropy(h, W, t)
    _assert_close(got, want, "loss")
    for a, b in zip(torch.autograd.grad(got, [h, W]), torch.autograd.grad(want, [h, W])):
        _assert_close(a, b, "grad")
    t_ign = torch.full_like(t, -100)
    assert float(tri_ce.linear_cross_entropy(h, W, t_ign)) == 0.0


@needs_kernels
def test_linear_cross_entropy_under_autocast_multiplies_in_its_dtype():
    """Under bf16 autocast the fused head takes its products in bf16 (autocast reaches the matmuls
    inside the custom op), as the reference's matmul (an nn.Linear head) does, not in float32: a
    float32 head would be the slowest part of a bf16 training step. Same loss and gradients as the
    reference to bf16 rounding, gradients in the float32 parameters' dtype."""
    if DEVICE == "cpu":
        from xlp.kernels.triton._interp import patch_interpreter_bf16

        patch_interpreter_bf16()
    torch.manual_seed(10)
    h, W = _leaf(2, 9, 32), _leaf(40, 32)
    t = torch.randint(0, 40, (2, 9), device=DEVICE)
    res = []
    for fn in (ref_ce.linear_cross_entropy, tri_ce.linear_cross_entropy):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = fn(h, W, t, soft_cap=30.0)
        res.append([loss] + list(torch.autograd.grad(loss, [h, W])))
    exact = tri_ce.linear_cross_entropy(h, W, t, soft_cap=30.0)  # float32 products
    assert all(g.dtype == torch.float32 for g in res[1][1:])
    assert (res[1][0] - res[0][0]).abs() < 1e-4 < (exact - res[0][0]).abs()  # bf16 products, like the reference's
    for got, want in zip(res[1][1:], res[0][1:]):
        assert (got - want).norm() <= 1e-2 * want.norm()


# ------------------------------------------------------------------------------------ integration
@needs_kernels
def test_dispatch_forced_triton():
    torch.manual_seed(9)
    from xlp import kernels

    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    got = kernels.rms_norm(x, w, backend="triton")
    _assert_close(got, ref_norms.rms_norm(x, w), "rms via dispatch")
    assert dispatch.TRITON_MODULES["mlstm_chunkwise"] == "mlstm"


@needs_kernels
def test_torch_compile_traces_custom_ops():
    """aot_eager runs the fake (meta) implementations and the registered autograd: no graph breaks."""
    torch.manual_seed(10)
    B, NH, S, D = 1, 1, 20, 16
    q, k, v = _leaf(B, NH, S, D), _leaf(B, NH, S, D), _leaf(B, NH, S, D)
    i, f = _leaf(B, NH, S), _leaf(B, NH, S, shift=1.0)
    w = _leaf(D)

    def fn(q, k, v, i, f, w):
        h = tri_mlstm.mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
        return tri_norms.rms_norm(h, w).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, i, f, w)
    want = fn(q, k, v, i, f, w)
    _assert_close(got, want, "loss")
    g_c = torch.autograd.grad(got, [q, v, f, w])
    g_e = torch.autograd.grad(want, [q, v, f, w])
    for a, b in zip(g_c, g_e):
        _assert_close(a, b, "grad")


# ------------------------------------------------------------------------------------ bf16
@needs_kernels
@pytest.mark.parametrize("L,init,docs", [(16, True, True), (32, False, False)])
def test_mlstm_chunkwise_bf16_within_reference_yardstick(L, init, docs):
    """bf16 inputs: the kernel's error vs a float64 truth on the SAME rounded inputs must stay near
    what the reference itself loses in bf16 (yardstick: bf16 in/out, and torch.autocast matmuls).
    A kernel that rounds a stabiliser, an exp or a state to bf16 where it must not is 10-1000x off.
    On CPU the interpreter's bf16 dot is patched to behave like tensor cores (kernels/triton/_interp.py)."""
    if DEVICE == "cpu":
        from xlp.kernels.triton._interp import patch_interpreter_bf16

        patch_interpreter_bf16()
    torch.manual_seed(0)
    B, NH, S, DQK, DV = 1, 2, 100, 32, 32
    base = [torch.randn(B, NH, S, DQK, device=DEVICE), torch.randn(B, NH, S, DQK, device=DEVICE),
            torch.randn(B, NH, S, DV, device=DEVICE), torch.randn(B, NH, S, device=DEVICE) - 2,
            torch.randn(B, NH, S, device=DEVICE) + 3]
    xs = [x.bfloat16() for x in base]
    st = (torch.randn(B, NH, DQK, DV, device=DEVICE) * 0.1, torch.randn(B, NH, DQK, device=DEVICE) * 0.1,
          torch.zeros(B, NH, device=DEVICE)) if init else None
    ds = _doc_starts("mask", B, S) if docs else None
    dh = torch.randn(B, NH, S, DV, device=DEVICE, dtype=torch.float64)

    def run(mod, ins, autocast=False):
        ins = [x.detach().clone().requires_grad_() for x in ins]
        cdt = torch.float64 if ins[0].dtype == torch.float64 else torch.float32
        state = tuple(x.to(cdt) for x in st) if st else None
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            h, (C, n, m) = mod.mlstm_chunkwise(*ins, chunk_size=L, initial_state=state,
                                               return_final_state=True, doc_starts=ds)
        g = torch.autograd.grad((h.to(cdt) * dh.to(cdt)).sum() + C.to(cdt).sum(), ins)
        return [h, C, n, m] + list(g)

    truth = run(ref_mlstm, [x.double() for x in xs])
    got = run(tri_mlstm, xs)
    yard_io = run(ref_mlstm, xs)
    yard_ac = run(ref_mlstm, xs, autocast=True)
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df"]
    msgs = []
    for name, g_, t, a, b in zip(names, got, truth, yard_io, yard_ac):
        err, yard = _rel(g_, t), max(_rel(a, t), _rel(b, t))
        if not (math.isfinite(err) and err <= max(2.5 * yard, 8e-3)):
            msgs.append(f"{name}: {err:.1e} vs yardstick {yard:.1e}")
    assert not msgs, "; ".join(msgs)


# ------------------------------------------------------------------------- fused one-token decode
@needs_kernels
@pytest.mark.parametrize("B,K,N", [(1, 96, 40), (3, 130, 66), (1, 600, 18)])  # K=600: three weight tiles
@pytest.mark.parametrize("parts", ["plain", "norm", "bias_cap", "norm_glu_residual", "norm_bias_residual"])
def test_decode_linear_matches_reference(B, K, N, parts):
    """Every prologue/epilogue of the fused matrix-vector product, on sizes that fit no block."""
    from xlp.kernels.reference import decode as ref_decode
    from xlp.kernels.triton import decode as tri_decode

    torch.manual_seed(0)
    x = torch.randn(B, K, device=DEVICE)
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    out_n = N // 2 if "glu" in parts else N
    kw = {}
    if "norm" in parts:
        kw.update(norm_weight=torch.rand(K, device=DEVICE) + 0.5, norm_eps=1e-5)
    if "bias" in parts:
        kw["bias"] = torch.randn(N, device=DEVICE)
    if "cap" in parts:
        kw["soft_cap"] = 2.0
    if "glu" in parts:
        kw["glu"] = True
    if "residual" in parts:
        kw["residual"] = torch.randn(B, out_n, device=DEVICE)
    want = ref_decode.decode_linear(x, w, **kw)
    _assert_close(tri_decode.decode_linear(x, w, **kw), want, f"decode_linear[{parts}]")
    if parts == "norm_glu_residual":  # bf16 weights and activations, as decoding runs on GPU
        if DEVICE == "cpu":
            from xlp.kernels.triton._interp import patch_interpreter_bf16

            patch_interpreter_bf16()
        kb = {k: (v.bfloat16() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        got = tri_decode.decode_linear(x.bfloat16(), w.bfloat16(), **kb)
        want = ref_decode.decode_linear(x.bfloat16(), w.bfloat16(), **kb)
        assert got.dtype == torch.bfloat16
        _assert_close(got, want, "decode_linear bf16", tol=1e-2)


@needs_kernels
def test_decode_linear_every_autotune_config():
    """Each launch configuration the GPU autotuner may pick (the interpreter runs only one through
    decode_linear) computes the same product: norm + SwiGLU + bias + cap + residual, K = 1100 ends
    every tile size part-way."""
    from xlp.kernels.reference import decode as ref_decode
    from xlp.kernels.triton import decode as tri_decode

    torch.manual_seed(0)
    B, K, N = 2, 1100, 18
    x, w = torch.randn(B, K, device=DEVICE), torch.randn(N, K, device=DEVICE) / K**0.5
    g, bias, res = torch.rand(K, device=DEVICE) + 0.5, torch.randn(N, device=DEVICE), torch.randn(B, N // 2, device=DEVICE)
    want = ref_decode.decode_linear(x, w, norm_weight=g, norm_eps=1e-5, bias=bias, glu=True, soft_cap=3.0,
                                    residual=res)
    for cfg in tri_decode._LINEAR_CONFIGS:
        y = torch.empty(B, N // 2, device=DEVICE)
        grid = (triton.cdiv(N // 2, cfg.kwargs["BN"]), B)
        tri_decode._linear_kernel.fn[grid](x, w, g, bias, res, y, N // 2, K, 1e-5, 3.0, NORM=True, HAS_BIAS=True,
                                           GLU=True, CAP=True, RES=True, PDL=False, num_warps=cfg.num_warps,
                                           **cfg.kwargs)
        _assert_close(y, want, f"decode_linear {cfg}")


@needs_kernels
@pytest.mark.parametrize("head_norm", ["layer", "rms"])
@pytest.mark.parametrize("dqk,dv", [(8, 12), (40, 600)])  # 40 x 600: C in three tiles, the last part-filled
def test_mlstm_decode_mix_matches_reference(head_norm, dqk, dv):
    """Gates, in-place state update, read-out, head norm and output gate of one token, from a
    non-empty state; head sizes that are no power of two."""
    from xlp.kernels.reference import decode as ref_decode
    from xlp.kernels.triton import decode as tri_decode

    torch.manual_seed(0)
    B, D, NH = 2, 48, 3
    if dqk > 8:
        assert tri_decode.mix_tile_rows(dqk, dv) < dqk
    x = torch.randn(B, D, device=DEVICE)
    qkvo = torch.randn(B, 2 * NH * (dqk + dv), device=DEVICE)
    gw, gb = torch.randn(2 * NH, D, device=DEVICE) / 7, torch.randn(2 * NH, device=DEVICE)
    kw = dict(num_heads=NH, norm_weight=torch.rand(D, device=DEVICE) + 0.5, norm_eps=1e-6, gate_soft_cap=15.0,
              head_norm_weight=torch.rand(NH * dv, device=DEVICE) + 0.5, head_norm_eps=1e-6, head_norm=head_norm)
    start = (torch.randn(B, NH, dqk, dv, device=DEVICE), torch.randn(B, NH, dqk, device=DEVICE),
             torch.randn(B, NH, device=DEVICE))
    s_ref = tuple(t.clone() for t in start)
    s_tri = tuple(t.clone() for t in start)
    want = ref_decode.mlstm_decode_mix(x, qkvo, gw, gb, s_ref, **kw)
    _assert_close(tri_decode.mlstm_decode_mix(x, qkvo, gw, gb, s_tri, **kw), want, "h")
    for name, got, ref, old in zip("Cnm", s_tri, s_ref, start):
        assert not torch.equal(ref, old), f"{name} was not updated in place"
        _assert_close(got, ref, name)
    # every (tile, warps) that the first call on a GPU may pick
    consts = dict(norm_eps=1e-6, head_eps=1e-6, cap=15.0, num_heads=NH, ln=head_norm != "rms")
    candidates = tri_decode.mix_candidates(dqk, dv)
    launches = {(tri_decode.mix_tile_rows(dqk, dv, t), w) for t, w in candidates}
    assert len(launches) == len(candidates) and (dqk > 8 or len(candidates) < len(tri_decode._MIX_CONFIGS))
    for tile, warps in candidates:
        s_cfg = tuple(t.clone() for t in start)
        h = tri_decode._mix(x, qkvo, gw, gb, kw["norm_weight"], kw["head_norm_weight"], s_cfg, **consts,
                            tile=tile, warps=warps)
        _assert_close(h, want, f"h, tile {tile}, {warps} warps")
        for name, got, ref in zip("Cnm", s_cfg, s_ref):
            _assert_close(got, ref, f"{name}, tile {tile}, {warps} warps")


@needs_kernels
def test_mlstm_decode_mix_launch_from_config():
    """decode.mix fixes the state tile and warps (here: C in tiles of 64 elements, 4 rows each); a bad
    value is refused with its key, and a bad (tile, warps) passed to the kernel itself too."""
    from xlp.kernels.reference import decode as ref_decode
    from xlp.kernels.triton import decode as tri_decode
    from xlp.xlstm_model.decode import DecodeConfig

    torch.manual_seed(2)
    B, D, NH, dqk, dv = 1, 32, 2, 12, 16
    x, qkvo = torch.randn(B, D, device=DEVICE), torch.randn(B, 2 * NH * (dqk + dv), device=DEVICE)
    gw, gb = torch.randn(2 * NH, D, device=DEVICE) / 5, torch.randn(2 * NH, device=DEVICE)
    kw = dict(num_heads=NH, norm_weight=torch.rand(D, device=DEVICE) + 0.5, norm_eps=1e-6, gate_soft_cap=15.0,
              head_norm_weight=torch.rand(NH * dv, device=DEVICE) + 0.5, head_norm_eps=1e-6)
    start = (torch.randn(B, NH, dqk, dv, device=DEVICE), torch.randn(B, NH, dqk, device=DEVICE),
             torch.randn(B, NH, device=DEVICE))
    want = ref_decode.mlstm_decode_mix(x, qkvo, gw, gb, tuple(t.clone() for t in start), **kw)
    mix = DecodeConfig(mix="64x4").mix_launch()
    assert mix == (64, 4) and tri_decode.mix_tile_rows(dqk, dv, 64) == 4 and DecodeConfig().mix_launch() is None
    _assert_close(tri_decode.mlstm_decode_mix(x, qkvo, gw, gb, tuple(t.clone() for t in start), mix=mix, **kw),
                  want, "h")
    for bad in ("64", "48x4", "64x3", "bigx8", "64,4"):
        with pytest.raises(ValueError, match=f"decode.mix='{bad}'"):
            DecodeConfig(mix=bad).validate()
    for bad in ((48, 4), (64, 3), (64,)):
        with pytest.raises(ValueError, match=re.escape(f"mlstm_decode_mix: mix={bad!r}")):
            tri_decode.mlstm_decode_mix(x, qkvo, gw, gb, tuple(t.clone() for t in start), mix=bad, **kw)


@needs_kernels
def test_mlstm_decode_mix_gate_weights_in_chunks():
    """A model width over 1024: the gate dot products run over several chunks of x (the last part-filled)."""
    from xlp.kernels.reference import decode as ref_decode
    from xlp.kernels.triton import decode as tri_decode

    torch.manual_seed(1)
    B, D, NH, dqk, dv = 1, 2100, 2, 8, 16
    x = torch.randn(B, D, device=DEVICE)
    qkvo = torch.randn(B, 2 * NH * (dqk + dv), device=DEVICE)
    gw, gb = torch.randn(2 * NH, D, device=DEVICE) / 30, torch.randn(2 * NH, device=DEVICE)
    kw = dict(num_heads=NH, norm_weight=torch.rand(D, device=DEVICE) + 0.5, norm_eps=1e-6, gate_soft_cap=15.0,
              head_norm_weight=torch.rand(NH * dv, device=DEVICE) + 0.5, head_norm_eps=1e-6)
    start = (torch.randn(B, NH, dqk, dv, device=DEVICE), torch.randn(B, NH, dqk, device=DEVICE),
             torch.randn(B, NH, device=DEVICE))
    s_ref, s_tri = tuple(t.clone() for t in start), tuple(t.clone() for t in start)
    want = ref_decode.mlstm_decode_mix(x, qkvo, gw, gb, s_ref, **kw)
    _assert_close(tri_decode.mlstm_decode_mix(x, qkvo, gw, gb, s_tri, **kw), want, "h")
    for name, got, ref in zip("Cnm", s_tri, s_ref):
        _assert_close(got, ref, name)


@needs_kernels
def test_fused_decode_step_matches_model_step():
    """A tiny xlstm_large decoding through the Triton fused step gives model.step's logits."""
    from xlp.xlstm_model.config import ModelConfig
    from xlp.xlstm_model.decode import StepDecoder, prefill
    from xlp.xlstm_model.lm import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="xlstm_large", vocab_size=96, d_model=64, num_blocks=2,
                                    num_heads=2)).to(DEVICE).eval()
    for p in model.parameters():  # away from the small init, so every part of the block matters
        p.data.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 96, (2, 20), device=DEVICE)
    with torch.no_grad():
        _, state = prefill(model, ids)
        _, ref_state = model.forward_with_state(ids)
        with dispatch.use_backend("triton"):
            decoder = StepDecoder(model, state, 2, use_fused=True, use_graph=False)
            token = ids[:, -1]
            for _ in range(3):
                want, ref_state = model.step(token, ref_state)
                _assert_close(decoder.step(token), want, "logits", tol=1e-4)
                token = want.argmax(-1)
