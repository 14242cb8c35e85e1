"""The reference kernels checked against each other: chunkwise and step forms against the parallel
ground truth, state passing, document resets, sLSTM sequence vs steps, gradients, dispatch."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from xlp import kernels
from xlp.kernels import dispatch
from xlp.kernels.reference import (
    layer_norm,
    linear_cross_entropy,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_step,
    rms_norm,
    slstm_sequence,
    slstm_step,
)

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-8, F32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def mlstm_inputs(B=2, NH=2, S=16, DQK=8, DV=6, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, S, DQK, generator=g, dtype=F64)
    k = torch.randn(B, NH, S, DQK, generator=g, dtype=F64)
    v = torch.randn(B, NH, S, DV, generator=g, dtype=F64)
    i = 2.0 * torch.randn(B, NH, S, generator=g, dtype=F64)  # wide range: exercises the stabiliser
    f = 3.0 + 2.0 * torch.randn(B, NH, S, generator=g, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, i, f)]


def slice_t(xs, a, b):
    return [x[:, :, a:b] for x in xs]


def state_after_prefix(B=2, NH=2, DQK=8, DV=6, dtype=F64, seed=1):
    """A realistic carried state: the final state of a random 9-token prefix."""
    pre = mlstm_inputs(B, NH, 9, DQK, DV, F64, seed)
    _, st = mlstm_parallel(*pre, return_final_state=True)
    return tuple(x.to(dtype) for x in st)


def assert_states_close(a, b, tol):
    for x, y in zip(a, b):
        assert rel_err(x, y) < tol


# ------------------------------------------------------------------------------- mLSTM forms
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("S", [1, 7, 64, 257])
def test_mlstm_chunkwise_and_step_equal_parallel(S, with_state, dtype):
    x64 = mlstm_inputs(S=S)
    st64 = state_after_prefix() if with_state else None
    h_ref, st_ref = mlstm_parallel(*x64, initial_state=st64, return_final_state=True)  # float64 truth

    x = [t.to(dtype) for t in x64]
    st = tuple(t.to(dtype) for t in st64) if with_state else None
    h_par, st_par = mlstm_parallel(*x, initial_state=st, return_final_state=True)
    assert h_par.dtype == dtype and rel_err(h_par, h_ref) < TOL[dtype]
    assert_states_close(st_par, st_ref, TOL[dtype])

    # chunk sizes that divide S and that do not (incl. larger than S)
    for chunk in (1, 5, 16, 64):
        h, st_c = mlstm_chunkwise(*x, chunk_size=chunk, initial_state=st, return_final_state=True)
        assert h.shape == h_ref.shape and h.dtype == dtype
        assert rel_err(h, h_ref) < TOL[dtype], (chunk, rel_err(h, h_ref))
        assert_states_close(st_c, st_ref, TOL[dtype])

    hs, state = [], st
    for t in range(S):
        h_t, state = mlstm_step(*[u[:, :, t] for u in x], state)
        hs.append(h_t)
    assert rel_err(torch.stack(hs, dim=2), h_ref) < TOL[dtype]
    assert_states_close(state, st_ref, TOL[dtype])


@pytest.mark.parametrize("chunk", [4, 7])
def test_mlstm_state_passing(chunk):
    """Running [x1; x2] equals running x1, then x2 from the carried state."""
    x = mlstm_inputs(S=30)
    h, st = mlstm_chunkwise(*x, chunk_size=chunk, return_final_state=True)
    h1, st1 = mlstm_chunkwise(*slice_t(x, 0, 11), chunk_size=chunk, return_final_state=True)
    h2, st2 = mlstm_chunkwise(*slice_t(x, 11, 30), chunk_size=chunk, initial_state=st1, return_final_state=True)
    assert rel_err(torch.cat([h1, h2], dim=2), h) < 1e-10
    assert_states_close(st2, st, 1e-10)
    # and across forms: parallel for x1, chunkwise for x2
    _, st1p = mlstm_parallel(*slice_t(x, 0, 11), return_final_state=True)
    h2p = mlstm_chunkwise(*slice_t(x, 11, 30), chunk_size=chunk, initial_state=st1p)
    assert rel_err(h2p, h[:, :, 11:]) < 1e-10


def test_mlstm_doc_starts_packed_equals_separate():
    """A packed row of documents gives each document's outputs as if it ran alone."""
    lengths = [5, 1, 13, 9]  # 28 tokens
    S = sum(lengths)
    x = mlstm_inputs(B=1, S=S)
    starts = torch.zeros(1, S, dtype=torch.bool)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    starts[0, cu[:-1]] = True
    init = tuple(t[:1] for t in state_after_prefix())

    outs = {
        "parallel": mlstm_parallel(*x, doc_starts=starts, return_final_state=True),
        "chunk4": mlstm_chunkwise(*x, chunk_size=4, doc_starts=starts, return_final_state=True),
        "chunk16_cu": mlstm_chunkwise(*x, chunk_size=16, doc_starts=cu, return_final_state=True),
        # a document start at token 0 also drops the initial state
        "chunk6_init": mlstm_chunkwise(*x, chunk_size=6, doc_starts=starts, initial_state=init, return_final_state=True),
    }
    for name, (h, st) in outs.items():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            h_doc, st_doc = mlstm_parallel(*slice_t(x, a, b), return_final_state=True)
            assert rel_err(h[:, :, a:b], h_doc) < 1e-10, name
        assert_states_close(st, st_doc, 1e-10)  # final state = the last document's own

    # batch rows with different boundaries, continuing from an initial state in row 0
    x2 = mlstm_inputs(B=2, S=20, seed=3)
    starts2 = torch.zeros(2, 20, dtype=torch.bool)
    starts2[0, 12] = True
    starts2[1, [0, 3, 4]] = True
    init2 = state_after_prefix()
    h_p = mlstm_parallel(*x2, doc_starts=starts2, initial_state=init2)
    h_c = mlstm_chunkwise(*x2, chunk_size=8, doc_starts=starts2, initial_state=init2)
    assert rel_err(h_c, h_p) < 1e-10
    h_first = mlstm_parallel(*[t[:1] for t in slice_t(x2, 0, 12)], initial_state=tuple(s[:1] for s in init2))
    assert rel_err(h_c[:1, :, :12], h_first) < 1e-10


def test_mlstm_bf16_inputs():
    x = mlstm_inputs(S=40, dtype=torch.bfloat16)
    h, (C, n, m) = mlstm_chunkwise(*x, chunk_size=16, return_final_state=True)
    assert h.dtype == torch.bfloat16 and C.dtype == F32 and m.dtype == F32
    h_ref = mlstm_parallel(*[t.double() for t in x])
    assert rel_err(h, h_ref) < 2e-2  # bf16 output rounding only; gates and states run in float32


def test_mlstm_rejects_bad_doc_starts():
    x = mlstm_inputs(B=2, S=8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mlstm_chunkwise(*x, doc_starts=torch.tensor([0, 4, 8]))  # B = 2: ambiguous
    with pytest.raises(ValueError, match="rise from 0"):
        mlstm_chunkwise(*[t[:1] for t in x], doc_starts=torch.tensor([0, 4, 7]))


# ------------------------------------------------------------------------------------- sLSTM
def slstm_inputs(B=2, S=12, NH=2, DH=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = torch.randn(B, S, 4, NH, DH, generator=g, dtype=F64)
    gates[:, :, 1] += 2.0  # forget gates mostly open
    R = 0.5 * torch.randn(4, NH, DH, DH, generator=g, dtype=F64)
    return gates.to(dtype), R.to(dtype)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_slstm_sequence_equals_steps(forget_gate):
    gates, R = slstm_inputs()
    gates[:, :, 1] -= 2.0 if forget_gate == "exp" else 0.0  # exp forget gate: keep f near 1
    _, init = slstm_sequence(slstm_inputs(S=5, seed=1)[0], R, forget_gate=forget_gate, return_final_state=True)
    for st0 in (None, init):
        h, st = slstm_sequence(gates, R, forget_gate=forget_gate, initial_state=st0, return_final_state=True)
        hs, state = [], st0
        for t in range(gates.shape[1]):
            h_t, state = slstm_step(gates[:, t], R, state, forget_gate=forget_gate)
            hs.append(h_t)
        assert rel_err(torch.stack(hs, dim=1), h) < 1e-12
        assert_states_close(state, st, 1e-12)
        # state passing
        h1, st1 = slstm_sequence(gates[:, :5], R, forget_gate=forget_gate, initial_state=st0, return_final_state=True)
        h2 = slstm_sequence(gates[:, 5:], R, forget_gate=forget_gate, initial_state=st1)
        assert rel_err(torch.cat([h1, h2], dim=1), h) < 1e-12


def test_slstm_stabiliser_matches_unstabilised_formula():
    """The stabilised recurrence equals the plain eqs. (8)-(10) with i = exp(i~), f = sigmoid(f~)."""
    gates, R = slstm_inputs(B=1, S=6)
    h_ref = slstm_sequence(gates, R)
    h, c, n = torch.zeros(3, 1, 2, 3, dtype=F64)
    out = []
    for t in range(6):
        raw = gates[:, t] + torch.einsum("bhd,ghde->bghe", h, R)
        i, f, z, o = raw.exp()[:, 0], torch.sigmoid(raw[:, 1]), torch.tanh(raw[:, 2]), torch.sigmoid(raw[:, 3])
        c, n = f * c + i * z, f * n + i
        h = o * c / n
        out.append(h)
    assert rel_err(torch.stack(out, dim=1), h_ref) < 1e-12


def test_slstm_doc_starts_packed_equals_separate():
    gates, R = slstm_inputs(B=1, S=15)
    starts = torch.zeros(1, 15, dtype=torch.bool)
    starts[0, [0, 4, 10]] = True
    h = slstm_sequence(gates, R, doc_starts=starts)
    h_cu = slstm_sequence(gates, R, doc_starts=torch.tensor([0, 4, 10, 15]))
    for a, b in ((0, 4), (4, 10), (10, 15)):
        assert rel_err(h[:, a:b], slstm_sequence(gates[:, a:b], R)) < 1e-12
        assert rel_err(h_cu[:, a:b], slstm_sequence(gates[:, a:b], R)) < 1e-12


# ---------------------------------------------------------------------------------- gradients
def _req(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def test_gradcheck_mlstm_parallel_and_chunkwise():
    x = _req(*mlstm_inputs(B=1, NH=2, S=6, DQK=3, DV=2, seed=5))
    C0, n0, m0 = _req(*state_after_prefix(B=1, NH=2, DQK=3, DV=2, seed=6))
    starts = torch.tensor([[False, False, False, True, False, False]])

    def par(q, k, v, i, f, C, n, m):
        h, st = mlstm_parallel(q, k, v, i, f, initial_state=(C, n, m), return_final_state=True, doc_starts=starts)
        return (h, *st)

    def chunk(q, k, v, i, f, C, n, m):
        h, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=4, initial_state=(C, n, m), return_final_state=True)
        return (h, *st)

    assert gradcheck(par, (*x, C0, n0, m0))
    assert gradcheck(chunk, (*x, C0, n0, m0))
    assert gradcheck(lambda *a: mlstm_chunkwise(*a, chunk_size=4, doc_starts=starts), tuple(x))  # no initial state


def test_gradcheck_mlstm_step():
    x = _req(*[t[:, :, 0] for t in mlstm_inputs(B=2, NH=2, S=1, DQK=3, DV=2, seed=7)])
    st = _req(*state_after_prefix(B=2, NH=2, DQK=3, DV=2, seed=8))

    def step(q, k, v, i, f, C, n, m):
        h, (C, n, m) = mlstm_step(q, k, v, i, f, (C, n, m))
        return h, C, n, m

    assert gradcheck(step, (*x, *st))
    assert gradcheck(lambda *a: mlstm_step(*a, None)[0], tuple(x))


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_gradcheck_slstm(forget_gate):
    gates, R = _req(*slstm_inputs(B=1, S=4, NH=2, DH=2, seed=9))
    starts = torch.tensor([[False, False, True, False]])
    assert gradcheck(
        lambda g, r: slstm_sequence(g, r, forget_gate=forget_gate, doc_starts=starts, return_final_state=True)[1],
        (gates, R),
    )
    assert gradcheck(lambda g, r: slstm_sequence(g, r, forget_gate=forget_gate), (gates, R))
    _, st = slstm_sequence(*slstm_inputs(B=1, S=3, NH=2, DH=2, seed=10), return_final_state=True)
    st = _req(*st)

    def step(g, r, *s):
        h, new_state = slstm_step(g, r, tuple(s), forget_gate=forget_gate)
        return (h, *new_state)

    assert gradcheck(step, (gates[:, 0].detach().requires_grad_(), R, *st))


def test_gradcheck_norms_and_cross_entropy():
    g = torch.Generator().manual_seed(11)
    x, w, b = _req(torch.randn(3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64),
                   torch.randn(5, generator=g, dtype=F64))
    assert gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    assert gradcheck(lambda x, w, b: layer_norm(x, w, b, 1e-5), (x, w, b))
    hidden, weight = _req(torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(7, 4, generator=g, dtype=F64))
    targets = torch.tensor([[1, 6, -100], [0, 2, 3]])
    for cap in (None, 2.0):
        assert gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, soft_cap=cap), (hidden, weight))


def test_cross_entropy_matches_torch_and_all_ignored():
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(2, 5, 4, generator=g), torch.randn(9, 4, generator=g)
    targets = torch.randint(0, 9, (2, 5), generator=g)
    targets[0, 1] = -100
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).reshape(-1, 9), targets.reshape(-1))
    assert torch.allclose(linear_cross_entropy(hidden, weight, targets), ref, atol=1e-6)
    assert linear_cross_entropy(hidden, weight, torch.full((2, 5), -100)).item() == 0.0


# ----------------------------------------------------------------------------------- dispatch
def test_dispatch_backends(monkeypatch):
    kernels.set_default_backend(None)  # an earlier test in this process may have applied a run's kernels.*
    x = mlstm_inputs(S=5, dtype=F32)
    h_auto = kernels.mlstm_chunkwise(*x)  # CPU tensors: auto -> reference
    assert torch.equal(h_auto, mlstm_chunkwise(*x))
    assert dispatch.resolve("mlstm_step", "auto", x[0]) is kernels.reference.mlstm_step
    with pytest.raises(ValueError, match="valid: auto, reference, triton"):
        kernels.mlstm_chunkwise(*x, backend="cuda")

    monkeypatch.setenv("XLP_KERNEL_BACKEND", "reference")
    assert kernels.default_backend() == "reference"
    monkeypatch.setenv("XLP_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.rms_norm(x[0], None)
    kernels.set_default_backend("reference")  # an explicit setting wins over the environment
    try:
        assert kernels.default_backend() == "reference"
        kernels.rms_norm(x[0], None)
    finally:
        kernels.set_default_backend(None)

    # a Triton op that does not exist: a clear error for "triton"
    monkeypatch.setitem(dispatch.TRITON_MODULES, "rms_norm", "no_such_module")
    monkeypatch.setattr(dispatch, "_triton_cache", {})
    with pytest.raises(RuntimeError, match="xlp.kernels.triton.no_such_module.rms_norm is not available"):
        kernels.rms_norm(x[0], None, backend="triton")
