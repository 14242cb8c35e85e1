"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) compute bf16 the way the GPU does, so bf16
kernels can be tested on CPU:
  - tl.dot with bf16 operands: the interpreter stores bf16 as uint16 and multiplies the raw bits
    (garbage); here the operands are widened to fp32 first (= tensor cores: exact bf16 products,
    fp32 accumulation);
  - fp32 -> bf16 casts: the interpreter truncates; the GPU rounds to nearest even, as here.
Testing aid only (tests, `python benchmarks/bench_kernels.py --check-cpu`); a no-op when the interpreter
is not importable. Idempotent.
"""
from __future__ import annotations


def patch_interpreter_bf16() -> bool:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as I
    except Exception:  # pragma: no cover - depends on the Triton build
        return False
    B = I.InterpreterBuilder
    if getattr(B.create_dot, "_xlp_bf16", False):
        return True

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = np.ascontiguousarray(x.data).view(np.uint16).astype(np.uint32) << 16
        return I.TensorHandle(bits.view(np.float32), tl.float32)

    orig_dot = B.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    orig_cast = B.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            nan = np.isnan(src.data)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.astype(np.uint16)
            out = np.where(nan, np.uint16(0x7FC0), out)
            return I.TensorHandle(out.reshape(np.shape(src.data)), dst_type.scalar)
        return orig_cast(self, src, dst_type)

    create_dot._xlp_bf16 = True
    B.create_dot = create_dot
    B.cast_impl = cast_impl
    B.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    return True
