"""Compile every Triton kernel for an H100 (sm_90) without a GPU: catches compiler rejections
(non-constexpr globals, bad dot shapes, type errors) the CPU interpreter does not.
    python -m xlp.kernels.triton.aot_check [bf16|fp32]
"""
import itertools
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import xlp.kernels.triton.mlstm as M, xlp.kernels.triton.slstm as SL, xlp.kernels.triton.norms as N, xlp.kernels.triton.cross_entropy as CE
tgt = GPUTarget("cuda", 90, 32)
def resource_usage(k) -> str:
    """Registers / stack (spills) / shared memory per thread block, from the cubin (no GPU needed)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in k.asm or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(t.split(":", 1) for line in out.splitlines() if "REG:" in line for t in line.split() if ":" in t)
    return " ".join(f"{key.lower()}={fields[key]}" for key in ("REG", "STACK", "SHARED") if key in fields)


def comp(fn, sig, consts, name, opts=None, aligned=()):
    """aligned: arguments Triton would specialise as multiples of 16 at run time (pointers from torch,
    sizes like 1024), which decides whether loads are vectorised."""
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=tgt, options=opts or {"num_warps": 8 if 'chunk' in name else 4})
        print("OK", name, resource_usage(k))
    except Exception as e:
        global failed
        failed += 1
        print("FAIL", name, str(e)[-700:])
failed = 0
P=lambda t: "*"+t
dt = sys.argv[1] if len(sys.argv)>1 else "bf16"
PREC = "ieee" if dt=="fp32" else "tf32"
c = dict(DQK=128, DV=256, L=64, BK=64, BV=64, PREC=PREC)
names = lambda fn: fn.arg_names
def sig_for(fn, ptr_types, ints, consts):
    s = {}
    for a in fn.arg_names:
        if a in consts or a in ("BT", "HAS_DCF"): s[a] = "constexpr"
        elif a in ptr_types: s[a] = P(ptr_types[a])
        elif a in ints: s[a] = ints[a]
        else: s[a] = "*fp32"
    return s
ints = {"NH":"i32","S_P":"i32","NC":"i32","scale":"fp32"}
# every launch configuration benchmarks/bench_kernels.py --sweep can time (and the default), at the bench shape
import torch
from xlp.kernels.config import FWD_VARIANTS, BWD_VARIANTS
tdt = torch.float32 if dt == "fp32" else torch.bfloat16
seen = set()
for change in FWD_VARIANTS + BWD_VARIANTS:
    M.set_mlstm_config(change)
    for kname, fn, ptrs, extra in (
        ("fs", M._fwd_states_kernel, {"K":dt,"V":dt,"SEG":"i32","CST":dt}, {}),
        ("fo", M._fwd_out_kernel, {"Q":dt,"K":dt,"V":dt,"SEG":"i32","CST":dt,"H":dt}, {}),
        ("bs", M._bwd_states_kernel, {"Q":dt,"DH":dt,"SEG":"i32","DCST":dt}, {"HAS_DCF": False}),
        ("bc", M._bwd_chunk_kernel, {"Q":dt,"K":dt,"V":dt,"SEG":"i32","DH":dt,"CST":dt,"DCST":dt,"DQ":dt,"DK":dt,"DV_":dt}, {}),
    ):
        BK, BV, kw = M._kcfg(kname, 128, 256, 64, tdt)
        key = (kname, BK, BV, kw["num_warps"], kw["num_stages"])
        if key in seen:
            continue
        seen.add(key)
        consts = dict(c, BK=BK, BV=BV, **extra)
        comp(fn, sig_for(fn, ptrs, ints, consts), consts, f"{kname} BK{BK} BV{BV} w{kw['num_warps']} s{kw['num_stages']}", kw)
M.set_mlstm_config({})
consts = dict(c, HAS_DCF=True)
comp(M._bwd_states_kernel, sig_for(M._bwd_states_kernel, {"Q":dt,"DH":dt,"SEG":"i32","DCST":dt}, ints, consts), consts, "bs HAS_DCF", {"num_warps": 4, "num_stages": 2})
ks = {"GX":dt,"R":"fp32","RESET":"i32","HOUT":dt}
ints2 = {"S":"i32","NH":"i32","DH":"i32"}
def sig2(fn, pt, ints, cs):
    return {a: ("constexpr" if a in cs else (P(pt[a]) if a in pt else (ints[a] if a in ints else "*fp32"))) for a in fn.arg_names}
cs = dict(BD=64, EXP_F=False, R_REG=True, HAS_RESET=True)
comp(SL._slstm_fwd_kernel, sig2(SL._slstm_fwd_kernel, ks, ints2, cs), cs, "slstm_fwd")
comp(SL._slstm_bwd_kernel, sig2(SL._slstm_bwd_kernel, ks, ints2, cs), cs, "slstm_bwd")
cs2 = dict(cs, BD=256, R_REG=False)
comp(SL._slstm_fwd_kernel, sig2(SL._slstm_fwd_kernel, ks, ints2, cs2), cs2, "slstm_fwd DH256")
cn = dict(BD=2048, ROWS=4, HAS_W=True, HAS_B=True, LN=True)
comp(N._norm_fwd_kernel, sig2(N._norm_fwd_kernel, {"X":dt,"W":dt,"B_":dt,"Y":dt}, {"N":"i32","D":"i32","eps":"fp32"}, cn), cn, "norm_fwd")
comp(N._norm_bwd_kernel, sig2(N._norm_bwd_kernel, {"X":dt,"W":dt,"DY":dt,"DX":dt}, {"N":"i32","D":"i32"}, cn), cn, "norm_bwd")
cc = dict(BV=4096, HAS_CAP=True, GRAD=True)
comp(CE._ce_kernel, sig2(CE._ce_kernel, {"LOGITS":dt,"TGT":"i64"}, {"V":"i32","stride":"i32","ignore_index":"i32","inv_count":"fp32","soft_cap":"fp32"}, cc), cc, "ce")
comp(M._step_kernel, sig2(M._step_kernel, {"Q":dt,"K":dt,"V":dt,"H":dt}, {"scale":"fp32"}, dict(DQK=128,DV=256,BK=64,BV=64)), dict(DQK=128,DV=256,BK=64,BV=64), "step")
comp(M._bwd_prep_kernel, sig2(M._bwd_prep_kernel, {"H":dt,"DH":dt}, {"S_P":"i32"}, dict(DV=256,BT=64,BV=64)), dict(DV=256,BT=64,BV=64), "bwd_prep")
import xlp.kernels.triton.decode as DEC
lin = DEC._linear_kernel.fn  # under triton.autotune: the jit function itself
lp = {"X":dt,"W":dt,"G":dt,"BIAS":dt,"R":dt,"Y":dt}
li = {"N_OUT":"i32","K":"i32","eps":"fp32","cap":"fp32"}
for cfg in DEC._LINEAR_CONFIGS:
    for feats in (dict(NORM=True, HAS_BIAS=False, GLU=False, CAP=False, RES=False, PDL=False),
                  dict(NORM=False, HAS_BIAS=False, GLU=False, CAP=False, RES=True, PDL=True),
                  dict(NORM=True, HAS_BIAS=True, GLU=True, CAP=True, RES=True, PDL=True)):
        cl = dict(feats, **cfg.kwargs)
        comp(lin, sig2(lin, lp, li, cl), cl, f"decode_linear {cfg.kwargs} {feats}",
             {"num_warps": cfg.num_warps, "launch_pdl": feats["PDL"]}, aligned=(*lp, "N_OUT", "K"))
mp = {"X":dt,"QKVO":dt,"GW":dt,"GB":dt,"NW":dt,"HW":dt,"OUT":dt}
mi = {"D":"i32","norm_eps":"fp32","head_eps":"fp32","cap":"fp32","qk_scale":"fp32"}
# every (tile, warps) the first call may pick, for xlstm_large_400m's heads (dqk 128, dv 256) and
# xLSTM 7B's (dqk 256, dv 512), with and without PDL and the layer norm
mix_launches = {(shape, DEC.mix_tile_rows(shape[1], shape[2], tile), warps)
                for shape, (tile, warps) in itertools.product(((4, 128, 256, 1024), (8, 256, 512, 4096)), DEC._MIX_CONFIGS)}
for (nh, dqk, dv, d), bk, warps in sorted(mix_launches):
    for ln, pdl in ((True, True), (False, False))[:2 if nh == 4 else 1]:
        cm = dict(NH=nh, DQK=dqk, DV=dv, DQK_P=dqk, DV_P=dv, BD=min(d, 1024), BK=bk, CAP=True, LN=ln, PDL=pdl,
                  ONE_TILE=bk >= dqk)
        comp(DEC._mix_kernel, sig2(DEC._mix_kernel, mp, mi, cm), cm,
             f"mlstm_decode_mix dqk={dqk} dv={dv} BK={bk} warps={warps} LN={ln} PDL={pdl}",
             {"num_warps": warps, "launch_pdl": pdl}, aligned=(*mp, "C", "N_", "M", "D"))
print("aot_check:", "ALL OK" if not failed else f"{failed} FAILED")
sys.exit(1 if failed else 0)
