"""GPU benchmark and correctness check of the Triton kernels.

    python benchmarks/bench_kernels.py                 # mLSTM timing table (issue 8 protocol)
    python benchmarks/bench_kernels.py --check         # Triton vs reference at real shapes (bf16 / fp32), then exit
    python benchmarks/bench_kernels.py --chunks 32,64  # also compare chunk sizes (the effective L is printed)
    python benchmarks/bench_kernels.py --sweep         # time launch-config variants, then the table with the best
    python benchmarks/bench_kernels.py --mlstm bc_w=4,bc_s=2   # the table under a changed mLSTM launch configuration
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --check-cpu   # dry run of --check's code on CPU

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

from xlp.kernels.config import BWD_VARIANTS, FWD_VARIANTS, check_mlstm_launch, format_mlstm_launch


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


def bench_mlstm(tokens, seqlens, NH, DQK, DV, dtype, chunks, rep_ms, label=""):
    from xlp.kernels.triton.mlstm import mlstm_chunkwise, pick_chunk_size

    rows = []
    for S in seqlens:
        B = max(1, tokens // S)
        q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, dtype)
        dh = torch.randn(B, NH, S, DV, device="cuda", dtype=dtype)
        seen = set()
        for req in chunks:
            L = pick_chunk_size(S, DQK, DV, req)  # the chunk the kernels really use
            if L in seen:
                print(f"  (chunk {req} runs as L={L} at DQK={DQK} DV={DV}: already timed)", flush=True)
                continue
            seen.add(L)
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
            rows.append((f"xlp triton mLSTM L={L}{label}", S, B, ms_f, ms_fb, mem, f"compile {compile_s:.0f}s"))
            print(f"  mLSTM{label} S={S} L={L}: fwd {ms_f:.2f} ms  fwd+bwd {ms_fb:.2f} ms  peak {mem:.0f} MiB", flush=True)
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


# ------------------------------------------------------------------------------------ sweep
# The launch-config variants timed here (FWD_VARIANTS, BWD_VARIANTS) live in xlp.kernels.config, beside the
# table they change: xlp.kernels.triton.aot_check compiles every one of them. Forward variants are timed as
# the no-grad forward; backward variants as autograd.grad on ONE retained graph per length (the saved
# tensors do not depend on the launch configuration), so no forward is recomputed.


def sweep(tokens, seqlens, NH, DQK, DV, dtype, rep_ms, budget_s):
    """Times FWD_VARIANTS / BWD_VARIANTS at each length, checks each variant's results against the
    default's, combines the best change per kernel, and returns the best config dict."""
    from xlp.kernels.triton import mlstm as tm

    t_start = time.time()
    default = tm.mlstm_config()
    setups = []
    for S in seqlens:
        B = max(1, tokens // S)
        q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, dtype)
        dh = torch.randn(B, NH, S, DV, device="cuda", dtype=dtype)
        setups.append((S, (q, k, v, i, f), dh))

    def fwd_ms(cfg):
        tm.set_mlstm_config(cfg)
        out, ms = [], []
        for S, xs, dh in setups:
            with torch.no_grad():
                out.append(tm.mlstm_chunkwise(*xs))
                ms.append(_sync_ms(lambda: tm.mlstm_chunkwise(*xs), warmup=2, rep_ms=rep_ms))
        return ms, out

    graphs = []
    tm.set_mlstm_config(default)
    for S, xs, dh in setups:
        graphs.append((tm.mlstm_chunkwise(*xs), xs, dh))

    def bwd_ms(cfg):
        tm.set_mlstm_config(cfg)
        out, ms = [], []
        for h, xs, dh in graphs:
            run = lambda: torch.autograd.grad(h, xs, dh, retain_graph=True)  # noqa: E731
            out.append(run())
            ms.append(_sync_ms(run, warmup=2, rep_ms=rep_ms))
        return ms, out

    def agree(a, b):
        flat = lambda x: x if isinstance(x, torch.Tensor) else [t for y in x for t in flat(y)]  # noqa: E731
        errs = [float((p.float() - r.float()).abs().max() / (r.float().abs().max() + 1e-12))
                for p, r in zip(flat(a), flat(b))]
        return max(errs) if errs else 0.0

    best = {}
    for kind, variants, timer in (("fwd", FWD_VARIANTS, fwd_ms), ("bwd", BWD_VARIANTS, bwd_ms)):
        results = []  # (score, change, ms list)
        ref_out = None
        for change in variants:
            if time.time() - t_start > budget_s:
                print(f"  sweep {kind}: time budget {budget_s}s spent, {len(variants) - len(results)} variants skipped", flush=True)
                break
            t0 = time.time()
            try:
                ms, out = timer({**default, **change})
            except Exception as exc:  # a variant the compiler rejects (e.g. out of shared memory)
                print(f"  sweep {kind} {tm.format_cfg({**default, **change}):28s} failed: {repr(exc)[:100]}", flush=True)
                continue
            err = 0.0 if ref_out is None else agree(out, ref_out)
            ref_out = out if ref_out is None else ref_out
            if err > 2e-2:
                print(f"  sweep {kind} {tm.format_cfg({**default, **change}):28s} WRONG (rel diff {err:.1e} vs default): skipped", flush=True)
                continue
            results.append((max(ms), change, ms))
            print(f"  sweep {kind} {tm.format_cfg({**default, **change}):28s} " + " ".join(f"{x:6.2f}" for x in ms)
                  + f" ms (S={','.join(str(s[0]) for s in setups)})  {time.time() - t0:.0f}s", flush=True)
        if not results:
            continue
        base_ms = results[0][0] if results[0][1] == {} else math.inf
        # best single change per kernel (key prefix), then their union
        per_kernel = {}
        for score, change, _ in results:
            if change and score < base_ms:
                pre = next(iter(change))[:2]
                if pre not in per_kernel or score < per_kernel[pre][0]:
                    per_kernel[pre] = (score, change)
        union = {}
        for _, change in per_kernel.values():
            union.update(change)
        cands = sorted(results, key=lambda r: r[0])
        choice = cands[0]
        if len(per_kernel) > 1 and time.time() - t_start < budget_s + 30:
            try:
                ms, out = timer({**default, **union})
                if agree(out, ref_out) <= 2e-2 and max(ms) < choice[0]:
                    choice = (max(ms), union, ms)
                print(f"  sweep {kind} {tm.format_cfg({**default, **union}):28s} " + " ".join(f"{x:6.2f}" for x in ms) + " ms (union of the best per kernel)", flush=True)
            except Exception as exc:
                print(f"  sweep {kind} union failed: {repr(exc)[:100]}", flush=True)
        print(f"  sweep {kind}: best {tm.format_cfg({**default, **choice[1]})} {choice[0]:.2f} ms (default {base_ms:.2f} ms)", flush=True)
        best.update(choice[1])
    tm.set_mlstm_config(default)
    del setups, graphs
    torch.cuda.empty_cache()
    return {**default, **best}



def print_table(rows, header):
    print("\n" + header)
    print(f"{'kernel':34s} {'S':>6s} {'B':>4s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MiB':>9s}  note")
    for name, S, B, f, fb, mem, note in rows:
        print(f"{name:34s} {S:6d} {B:4d} {f:9.2f} {fb:11.2f} {mem:9.0f}  {note}")


# ------------------------------------------------------------------------------------ correctness
def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def check(strict: bool = False, dev: str = "cuda", small: bool = False) -> bool:
    """Triton vs reference at real shapes, bf16 and fp32; prints max-normalised errors.
    dev="cpu", small=True: a dry run of this check's own code under TRITON_INTERPRET=1 (tiny shapes)."""
    from xlp.kernels.reference import cross_entropy as rce, mlstm as rm, norms as rn, slstm as rs
    from xlp.kernels.triton import cross_entropy as tce, mlstm as tm, norms as tn, slstm as ts

    ok = True

    def report(name, errs, tol):
        nonlocal ok
        worst = max(errs.values())
        good = worst < tol and all(math.isfinite(e) for e in errs.values())
        ok &= good
        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        print(f"  [{'ok' if good else 'FAIL'}] {name:38s} max {worst:.1e} (tol {tol:.0e})  {detail}", flush=True)

    def report_fair(name, errs, tol):
        """errs: {quantity: (kernel error, yardstick error)} vs the float64 truth. A quantity passes
        when its error is under tol or within 2x of the yardstick (what the reference itself loses)."""
        nonlocal ok
        bad = [k for k, (e, y) in errs.items() if not (math.isfinite(e) and (e < tol or e <= 2 * y))]
        ok &= not bad
        worst = max(e for e, _ in errs.values())
        detail = " ".join(f"{k}={e:.1e}/{y:.0e}" for k, (e, y) in errs.items())
        flag = "ok" if not bad else "FAIL " + ",".join(bad)
        print(f"  [{flag}] {name:38s} max {worst:.1e} (tol {tol:.0e}; err/yardstick)  {detail}", flush=True)

    torch.manual_seed(0)
    # mLSTM chunkwise, real head dims, documents, initial state, ragged S.
    # Fair comparison: the truth is the reference in float64 on the SAME (dtype-rounded) inputs the
    # kernel gets; the yardstick is the reference itself fed those inputs (float32 math, output h in
    # the dtype: "ref-io") and under torch.autocast (bf16 tensor-core matmuls: "ref-ac"). Gate
    # gradients cancel heavily, so rounding the inputs alone moves them by ~10-100% of their max
    # ("input-rounding" line): comparing a bf16 run with a float32 run on unrounded inputs (the
    # first H100 check) measures the inputs, not the kernel.
    B, NH, S, DQK, DV = (1, 2, 100, 32, 32) if small else (2, 4, 1000, 128, 256)
    base = [torch.randn(B, NH, S, DQK, device=dev), torch.randn(B, NH, S, DQK, device=dev),
            torch.randn(B, NH, S, DV, device=dev), torch.randn(B, NH, S, device=dev) - 2,
            torch.randn(B, NH, S, device=dev) + 3]
    st = (torch.randn(B, NH, DQK, DV, device=dev) * 0.1, torch.randn(B, NH, DQK, device=dev) * 0.1,
          torch.zeros(B, NH, device=dev))
    ds = torch.zeros(B, S, dtype=torch.bool, device=dev)
    ds[0, S * 3 // 10] = ds[0, S * 3 // 10 + 1] = ds[-1, S * 7 // 9] = True
    dh = torch.randn(B, NH, S, DV, device=dev)
    names = ["h", "C", "n", "m"] + [f"d{x}" for x in "qkvif"]

    def run_mlstm(mod, xs, autocast=False):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        cdt = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            h, (C, n, m) = mod.mlstm_chunkwise(*xs, chunk_size=64, initial_state=tuple(x.to(cdt) for x in st),
                                               return_final_state=True, doc_starts=ds)
        g = torch.autograd.grad((h.to(cdt) * dh.to(cdt)).sum() + C.to(cdt).sum(), xs)
        return [h, C, n, m] + list(g)

    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        xs = [x.to(dtype) for x in base]
        truth = run_mlstm(rm, [x.double() for x in xs])
        got = run_mlstm(tm, xs)
        yard = run_mlstm(rm, xs)
        if dtype != torch.float32:
            yard_ac = run_mlstm(rm, xs, autocast=True)
            yard = [max(_rel(a, t), _rel(b, t)) for a, b, t in zip(yard, yard_ac, truth)]
            unr = run_mlstm(rm, [x.double() for x in base])
            print("  input-rounding (fp64 ref on unrounded vs rounded inputs): "
                  + " ".join(f"{k}={_rel(a, t):.1e}" for k, a, t in zip(names, unr, truth)), flush=True)
        else:
            yard = [_rel(a, t) for a, t in zip(yard, truth)]
        report_fair(f"mlstm_chunkwise {str(dtype)[6:]} DQK{DQK} DV{DV}",
                    {k: (_rel(a, t), y) for k, a, t, y in zip(names, got, truth, yard)}, tol)
        del truth, got

    # mLSTM step
    args = [x[:, :, 0] for x in base]
    h_r, st_r = rm.mlstm_step(*args, st)
    h_t, st_t = tm.mlstm_step(*args, st)
    report("mlstm_step fp32", {"h": _rel(h_t, h_r), "C": _rel(st_t[0], st_r[0])}, 1e-4)

    # sLSTM (same fairness: float64 truth on the rounded gates; R stays a float32 parameter)
    B, S, NH, DH = (1, 20, 2, 16) if small else (4, 256, 4, 64)
    gates = torch.randn(B, S, 4, NH, DH, device=dev)
    R = torch.randn(4, NH, DH, DH, device=dev) * DH**-0.5
    dh = torch.randn(B, S, NH, DH, device=dev)

    def run_slstm(mod, gx, Rx, fg, autocast=False):
        gx, Rx = gx.detach().clone().requires_grad_(), Rx.detach().clone().requires_grad_()
        cdt = torch.float64 if gx.dtype == torch.float64 else torch.float32
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            h = mod.slstm_sequence(gx, Rx, forget_gate=fg)
        return [h] + list(torch.autograd.grad((h.to(cdt) * dh.to(cdt)).sum(), [gx, Rx]))

    for fg in ("sigmoid", "exp"):
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            gx = gates.to(dtype)
            truth = run_slstm(rs, gx.double(), R.double(), fg)
            got = run_slstm(ts, gx, R, fg)
            yard = [_rel(a, t) for a, t in zip(run_slstm(rs, gx, R, fg), truth)]
            if dtype != torch.float32:
                yard = [max(y, _rel(a, t)) for y, a, t in zip(yard, run_slstm(rs, gx, R, fg, autocast=True), truth)]
            report_fair(f"slstm_sequence {fg} {str(dtype)[6:]} DH{DH}",
                        {k: (_rel(a, t), y) for k, a, t, y in zip(("h", "dgates", "dR"), got, truth, yard)}, tol)

    # norms
    ND = (64, 256) if small else (8192, 2048)
    x = torch.randn(*ND, device=dev)
    w, b = torch.randn(ND[1], device=dev), torch.randn(ND[1], device=dev)
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
            report(f"{name} {str(dtype)[6:]} {ND[0]}x{ND[1]}", errs, tol)

    # fused linear + cross-entropy, 50k vocabulary
    N, D, V = (64, 32, 500) if small else (4096, 1024, 50304)
    hid = torch.randn(N, D, device=dev)
    W = torch.randn(V, D, device=dev) * D**-0.5
    tgt = torch.randint(0, V, (N,), device=dev)
    tgt[::17] = -100
    hr, Wr = hid.clone().requires_grad_(), W.clone().requires_grad_()
    l_r = rce.linear_cross_entropy(hr, Wr, tgt, soft_cap=30.0)
    g_r = torch.autograd.grad(l_r, [hr, Wr])
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        ht, Wt = hid.to(dtype).requires_grad_(), W.to(dtype).requires_grad_()
        l_t = tce.linear_cross_entropy(ht, Wt, tgt, soft_cap=30.0)
        g_t = torch.autograd.grad(l_t, [ht, Wt])
        report(f"linear_cross_entropy {str(dtype)[6:]} V{V}",
               {"loss": _rel(l_t, l_r), "dh": _rel(g_t[0], g_r[0]), "dW": _rel(g_t[1], g_r[1])}, tol)
    print(f"  => {'ALL OK' if ok else 'SOME CHECKS FAILED'}", flush=True)
    return ok


def parse_launch(text: str) -> dict:
    """--mlstm 'bc_w=4,bc_s=2' -> {'bc_w': 4, 'bc_s': 2}, checked (the error names the bad key)."""
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, eq, val = item.partition("=")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            raise ValueError(f"--mlstm: {item!r} is not KEY=N") from None
    return check_mlstm_launch(out, "--mlstm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_kernels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seqlens", default="2048,8192,32768")
    p.add_argument("--nh", type=int, default=16)
    p.add_argument("--dqk", type=int, default=128)
    p.add_argument("--dv", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunks", default="64", help="comma-separated chunk sizes to time (128 runs as 64 at DV>=256)")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement")
    p.add_argument("--check", action="store_true", help="run the correctness checks and exit")
    p.add_argument("--check-cpu", action="store_true",
                   help="dry run of --check's code on CPU at tiny shapes (needs TRITON_INTERPRET=1)")
    p.add_argument("--no-baselines", action="store_true", help="skip SDPA and mlstm_kernels")
    p.add_argument("--sweep", action="store_true",
                   help="time launch-config variants of the mLSTM kernels (fwd and bwd separately), "
                        "then time the table with the best one beside the default")
    p.add_argument("--sweep-seqlens", default="2048,32768", help="lengths the sweep scores (worst one counts)")
    p.add_argument("--sweep-budget", type=float, default=120.0, help="seconds the sweep may take")
    p.add_argument("--sweep-rep-ms", type=int, default=40)
    p.add_argument("--mlstm", default="", metavar="KEY=N[,KEY=N]",
                   help="changes to the mLSTM launch table to time, e.g. bc_w=4,bc_s=2 (the pipeline's "
                        "kernels.mlstm config key; keys: kernels/config.py MLSTM_LAUNCH)")
    a = p.parse_args(argv)
    try:
        parse_launch(a.mlstm)
    except ValueError as e:
        p.error(str(e))
    if a.check_cpu:
        from xlp.kernels.triton._interp import patch_interpreter_bf16

        patch_interpreter_bf16()  # the interpreter's own bf16 dot is wrong; see _interp.py
        return 0 if check(dev="cpu", small=True) else 1
    if not torch.cuda.is_available():
        print("benchmarks/bench_kernels.py needs a CUDA GPU (CPU correctness: pytest tests/test_kernels_triton.py)")
        return 2
    import triton

    from xlp.kernels.triton import mlstm as tm

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    if a.check:
        return 0 if check() else 1
    dtype = getattr(torch, a.dtype)
    seqlens = [int(s) for s in a.seqlens.split(",")]
    chunks = [int(c) for c in a.chunks.split(",")]
    if a.mlstm:
        tm.set_mlstm_config(parse_launch(a.mlstm))
    current = tm.mlstm_config()
    print(f"mLSTM launch config: {tm.format_cfg(current)}", flush=True)
    rows = []
    tuned = None
    if a.sweep:
        t0 = time.time()
        tuned = sweep(a.tokens, [int(s) for s in a.sweep_seqlens.split(",")], a.nh, a.dqk, a.dv, dtype,
                      a.sweep_rep_ms, a.sweep_budget)
        print(f"  sweep took {time.time() - t0:.0f}s", flush=True)
        if tuned == current:
            tuned = None
    rows += bench_mlstm(a.tokens, seqlens, a.nh, a.dqk, a.dv, dtype, chunks, a.rep_ms,
                        label=" cfg=" + tm.format_cfg(current) if tuned else "")
    if tuned:
        tm.set_mlstm_config(tuned)
        rows += bench_mlstm(a.tokens, seqlens, a.nh, a.dqk, a.dv, dtype, chunks, a.rep_ms, label=" tuned")
    if not a.no_baselines:
        rows += bench_sdpa(a.tokens, seqlens, a.rep_ms)
        rows += bench_official(a.tokens, seqlens, a.nh, a.dqk, a.dv, dtype, a.rep_ms)
    print_table(rows, f"{a.tokens} tokens/step, mLSTM NH={a.nh} DQK={a.dqk} DV={a.dv} {a.dtype}; "
                      f"device {torch.cuda.get_device_name()}")
    # compact summary: the best mLSTM fwd+bwd per length against the 12 ms target
    worst = 0.0
    for S in seqlens:
        ml = [r for r in rows if r[0].startswith("xlp") and r[1] == S and math.isfinite(r[4])]
        if ml:
            b = min(ml, key=lambda r: r[4])
            worst = max(worst, b[4])
            print(f"SUMMARY S={S}: best {b[0]}  fwd {b[3]:.2f} ms  fwd+bwd {b[4]:.2f} ms", flush=True)
    print(f"SUMMARY worst fwd+bwd {worst:.2f} ms (target <= 12 ms: {'met' if worst <= 12 else 'NOT met'})", flush=True)
    if tuned:
        print(f"SUMMARY tuned config: {format_mlstm_launch(tuned)} "
              "(config overrides; paste into kernels/config.py MLSTM_LAUNCH to make it the default)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
