"""GPU benchmark and correctness check of the Triton kernels.

    python -m kernels.bench                 # mLSTM timing table (issue 8 protocol)
    python -m kernels.bench --check         # Triton vs reference at real shapes (bf16 / fp32), then exit
    python -m kernels.bench --chunks 32,64  # also compare chunk sizes

Protocol: 65,536 tokens per step, S in {2k, 8k, 32k} (B = tokens / S), NH=16, DQK=128, DV=256, bf16;
forward and forward+backward in ms (triton.testing.do_bench, median) and the peak memory of a
forward+backward beyond the inputs; beside torch SDPA flash attention (NH=32, D=128, causal) and
the official `mlstm_kernels` package when it happens to be importable (never a dependency).
Needs CUDA; prints the device, torch and Triton versions with the table.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def _sync_ms(fn, warmup: int = 3, rep_ms: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup * 10, rep=rep_ms, return_mode="median"))


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _mlstm_inputs(B, NH, S, DQK, DV, dtype, grad=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s, sc=1.0, sh=0.0: (torch.randn(*s, device="cuda", generator=g) * sc + sh).to(dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, NH, S, DQK), mk(B, NH, S, DQK), mk(B, NH, S, DV), mk(B, NH, S, sc=1.0, sh=-2.0), mk(B, NH, S, sh=3.0)


def bench_mlstm(tokens, seqlens, NH, DQK, DV, dtype, chunks, rep_ms):
    from kernels.triton.mlstm import mlstm_chunkwise

    rows = []
    for S in seqlens:
        B = max(1, tokens // S)
        q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, dtype)
        dh = torch.randn(B, NH, S, DV, device="cuda", dtype=dtype)
        for L in chunks:
            def fwd():
                with torch.no_grad():
                    return mlstm_chunkwise(q, k, v, i, f, chunk_size=L)

            def fwdbwd():
                h = mlstm_chunkwise(q, k, v, i, f, chunk_size=L)
                torch.autograd.backward(h, dh)

            t0 = time.time()
            fwdbwd()  # compile
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            ms_f = _sync_ms(fwd, rep_ms=rep_ms)
            ms_fb = _sync_ms(fwdbwd, rep_ms=rep_ms)
            mem = _peak_mb(fwdbwd)
            rows.append((f"xlp triton mLSTM L={L}", S, B, ms_f, ms_fb, mem, f"compile {compile_s:.0f}s"))
            print(f"  mLSTM S={S} L={L}: fwd {ms_f:.2f} ms  fwd+bwd {ms_fb:.2f} ms  peak {mem:.0f} MiB", flush=True)
        del q, k, v, i, f, dh
        torch.cuda.empty_cache()
    return rows


def bench_sdpa(tokens, seqlens, rep_ms, NH=32, D=128, dtype=torch.bfloat16):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for S in seqlens:
        B = max(1, tokens // S)
        q, k, v = (torch.randn(B, NH, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, NH, S, D, device="cuda", dtype=dtype)

        def fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwdbwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.backward(o, do)

        try:
            fwdbwd()
            rows.append(("torch SDPA flash NH=32 D=128", S, B, _sync_ms(fwd, rep_ms=rep_ms),
                         _sync_ms(fwdbwd, rep_ms=rep_ms), _peak_mb(fwdbwd), ""))
        except Exception as exc:  # pragma: no cover - depends on the install
            rows.append(("torch SDPA flash NH=32 D=128", S, B, math.nan, math.nan, math.nan, repr(exc)[:60]))
        print(f"  SDPA S={S}: {rows[-1][3:6]}", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def bench_official(tokens, seqlens, NH, DQK, DV, dtype, rep_ms):
    """The official kernels, only when already installed (optional comparison, never a dependency)."""
    try:
        from mlstm_kernels.torch import get_mlstm_kernel  # type: ignore
    except Exception:
        return []
    rows = []
    for name in ("chunkwise--triton_limit_chunk", "chunkwise--triton_xl_chunk"):
        try:
            kernel = get_mlstm_kernel(name)
        except Exception as exc:
            rows.append((f"mlstm_kernels {name}", 0, 0, math.nan, math.nan, math.nan, repr(exc)[:60]))
            continue
        for S in seqlens:
            B = max(1, tokens // S)
            q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, dtype)
            dh = torch.randn(B, NH, S, DV, device="cuda", dtype=dtype)

            def fwd():
                with torch.no_grad():
                    return kernel(q=q, k=k, v=v, i=i, f=f, return_last_states=False)

            def fwdbwd():
                h = kernel(q=q, k=k, v=v, i=i, f=f, return_last_states=False)
                torch.autograd.backward(h, dh)

            try:
                fwdbwd()
                rows.append((f"mlstm_kernels {name}", S, B, _sync_ms(fwd, rep_ms=rep_ms),
                             _sync_ms(fwdbwd, rep_ms=rep_ms), _peak_mb(fwdbwd), ""))
            except Exception as exc:
                rows.append((f"mlstm_kernels {name}", S, B, math.nan, math.nan, math.nan, repr(exc)[:60]))
            print(f"  {name} S={S}: {rows[-1][3:6]}", flush=True)
            del q, k, v, i, f, dh
            torch.cuda.empty_cache()
    return rows


def print_table(rows, header):
    print("\n" + header)
    print(f"{'kernel':34s} {'S':>6s} {'B':>4s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MiB':>9s}  note")
    for name, S, B, f, fb, mem, note in rows:
        print(f"{name:34s} {S:6d} {B:4d} {f:9.2f} {fb:11.2f} {mem:9.0f}  {note}")


# ------------------------------------------------------------------------------------ correctness
def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def check(strict: bool = False) -> bool:
    """Triton vs reference at real shapes, bf16 and fp32; prints max-normalised errors."""
    from kernels.reference import cross_entropy as rce, mlstm as rm, norms as rn, slstm as rs
    from kernels.triton import cross_entropy as tce, mlstm as tm, norms as tn, slstm as ts

    ok = True

    def report(name, errs, tol):
        nonlocal ok
        worst = max(errs.values())
        good = worst < tol and all(math.isfinite(e) for e in errs.values())
        ok &= good
        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        print(f"  [{'ok' if good else 'FAIL'}] {name:38s} max {worst:.1e} (tol {tol:.0e})  {detail}", flush=True)

    torch.manual_seed(0)
    # mLSTM chunkwise, real head dims, documents, initial state, ragged S
    B, NH, S, DQK, DV = 2, 4, 1000, 128, 256
    base = [torch.randn(B, NH, S, DQK, device="cuda"), torch.randn(B, NH, S, DQK, device="cuda"),
            torch.randn(B, NH, S, DV, device="cuda"), torch.randn(B, NH, S, device="cuda") - 2,
            torch.randn(B, NH, S, device="cuda") + 3]
    st = (torch.randn(B, NH, DQK, DV, device="cuda") * 0.1, torch.randn(B, NH, DQK, device="cuda") * 0.1,
          torch.zeros(B, NH, device="cuda"))
    ds = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    ds[0, 300] = ds[0, 301] = ds[1, 777] = True
    dh = torch.randn(B, NH, S, DV, device="cuda")
    ins = [x.clone().requires_grad_() for x in base]
    h_r, (C_r, n_r, m_r) = rm.mlstm_chunkwise(*ins, chunk_size=64, initial_state=st, return_final_state=True, doc_starts=ds)
    g_r = torch.autograd.grad((h_r * dh).sum() + C_r.sum(), ins)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        ins_t = [x.to(dtype).requires_grad_() for x in base]
        h_t, (C_t, n_t, m_t) = tm.mlstm_chunkwise(*ins_t, chunk_size=64, initial_state=st, return_final_state=True, doc_starts=ds)
        g_t = torch.autograd.grad((h_t.float() * dh).sum() + C_t.sum(), ins_t)
        errs = {"h": _rel(h_t, h_r), "C": _rel(C_t, C_r), "n": _rel(n_t, n_r), "m": _rel(m_t, m_r)}
        errs.update({f"d{k}": _rel(a, b) for k, a, b in zip("qkvif", g_t, g_r)})
        report(f"mlstm_chunkwise {str(dtype)[6:]} DQK{DQK} DV{DV}", errs, tol)

    # mLSTM step
    args = [x[:, :, 0] for x in base]
    h_r, st_r = rm.mlstm_step(*args, st)
    h_t, st_t = tm.mlstm_step(*args, st)
    report("mlstm_step fp32", {"h": _rel(h_t, h_r), "C": _rel(st_t[0], st_r[0])}, 1e-4)

    # sLSTM
    B, S, NH, DH = 4, 256, 4, 64
    gates = torch.randn(B, S, 4, NH, DH, device="cuda")
    R = torch.randn(4, NH, DH, DH, device="cuda") * DH**-0.5
    dh = torch.randn(B, S, NH, DH, device="cuda")
    for fg in ("sigmoid", "exp"):
        gi, Ri = gates.clone().requires_grad_(), R.clone().requires_grad_()
        h_r = rs.slstm_sequence(gi, Ri, forget_gate=fg)
        g_r = torch.autograd.grad((h_r * dh).sum(), [gi, Ri])
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            gt, Rt = gates.to(dtype).requires_grad_(), R.clone().requires_grad_()
            h_t = ts.slstm_sequence(gt, Rt, forget_gate=fg)
            g_t = torch.autograd.grad((h_t.float() * dh).sum(), [gt, Rt])
            report(f"slstm_sequence {fg} {str(dtype)[6:]} DH{DH}",
                   {"h": _rel(h_t, h_r), "dgates": _rel(g_t[0], g_r[0]), "dR": _rel(g_t[1], g_r[1])}, tol)

    # norms
    x = torch.randn(8192, 2048, device="cuda")
    w, b = torch.randn(2048, device="cuda"), torch.randn(2048, device="cuda")
    dy = torch.randn_like(x)
    for name, fr, ft, extra in (("rms_norm", rn.rms_norm, tn.rms_norm, (w,)), ("layer_norm", rn.layer_norm, tn.layer_norm, (w, b))):
        xs = [x.clone().requires_grad_()] + [e.clone().requires_grad_() for e in extra]
        y_r = fr(*xs)
        g_r = torch.autograd.grad((y_r * dy).sum(), xs)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            xt = [xs[0].detach().to(dtype).requires_grad_()] + [e.detach().clone().requires_grad_() for e in extra]
            y_t = ft(*xt)
            g_t = torch.autograd.grad((y_t.float() * dy).sum(), xt)
            errs = {"y": _rel(y_t, y_r)}
            errs.update({f"d{i}": _rel(a, c) for i, (a, c) in enumerate(zip(g_t, g_r))})
            report(f"{name} {str(dtype)[6:]} 8192x2048", errs, tol)

    # fused linear + cross-entropy, 50k vocabulary
    N, D, V = 4096, 1024, 50304
    hid = torch.randn(N, D, device="cuda")
    W = torch.randn(V, D, device="cuda") * D**-0.5
    tgt = torch.randint(0, V, (N,), device="cuda")
    tgt[::17] = -100
    hr, Wr = hid.clone().requires_grad_(), W.clone().requires_grad_()
    l_r = rce.linear_cross_entropy(hr, Wr, tgt, soft_cap=30.0)
    g_r = torch.autograd.grad(l_r, [hr, Wr])
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        ht, Wt = hid.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
        torch.cuda.reset_peak_memory_stats()
        l_t = tce.linear_cross_entropy(ht, Wt, tgt, soft_cap=30.0)
        g_t = torch.autograd.grad(l_t, [ht, Wt])
        report(f"linear_cross_entropy {str(dtype)[6:]} V{V}",
               {"loss": _rel(l_t, l_r), "dh": _rel(g_t[0], g_r[0]), "dW": _rel(g_t[1], g_r[1])}, tol)
    print(f"  => {'ALL OK' if ok else 'SOME CHECKS FAILED'}", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seqlens", default="2048,8192,32768")
    p.add_argument("--nh", type=int, default=16)
    p.add_argument("--dqk", type=int, default=128)
    p.add_argument("--dv", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunks", default="64", help="comma-separated chunk sizes to time")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement")
    p.add_argument("--check", action="store_true", help="run the correctness checks and exit")
    p.add_argument("--no-baselines", action="store_true", help="skip SDPA and mlstm_kernels")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU (CPU correctness: pytest tests/test_kernels_triton.py)")
        return 2
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    if a.check:
        return 0 if check() else 1
    dtype = getattr(torch, a.dtype)
    seqlens = [int(s) for s in a.seqlens.split(",")]
    chunks = [int(c) for c in a.chunks.split(",")]
    rows = bench_mlstm(a.tokens, seqlens, a.nh, a.dqk, a.dv, dtype, chunks, a.rep_ms)
    if not a.no_baselines:
        rows += bench_sdpa(a.tokens, seqlens, a.rep_ms)
        rows += bench_official(a.tokens, seqlens, a.nh, a.dqk, a.dv, dtype, a.rep_ms)
    print_table(rows, f"{a.tokens} tokens/step, mLSTM NH={a.nh} DQK={a.dqk} DV={a.dv} {a.dtype}; "
                      f"device {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
